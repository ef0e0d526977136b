//! The `/metrics` endpoint of the controller and the node plugin: `--metrics-address`
//! parsing and a small HTTP/1.1 server (hyper, already in the tree under tonic and
//! kube) that answers `GET /metrics` with whatever text the process renders. The
//! series themselves (prometheus-client registries) live with each binary.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Renders the process's metrics in the OpenMetrics text format, at each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// `--metrics-address`: `:PORT` (every interface), `host:port`, or empty / `0` for off.
pub fn parse_address(text: &str) -> Result<Option<SocketAddr>, String> {
    let text = text.trim();
    if text.is_empty() || text == "0" {
        return Ok(None);
    }
    let full = match text.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => text.to_string(),
    };
    full.parse().map(Some).map_err(|e| {
        format!("{text:?} is not an address to listen on (e.g. :9809, 127.0.0.1:9809, or 0 for off): {e}")
    })
}

/// Binds `address` now (so a taken port stops the process at start, naming it), and
/// serves `GET /metrics` on it, answered by `render`, until `stop` turns true.
pub async fn serve(
    address: SocketAddr,
    render: Render,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "serving metrics on /metrics");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(err) => {
                        tracing::warn!(%err, "metrics: accept failed");
                        continue;
                    }
                },
                _ = stop.wait_for(|s| *s) => return,
            };
            let io = hyper_util::rt::TokioIo::new(stream);
            let render = render.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let render = render.clone();
                    async move { answer(request, &render) }
                });
                if let Err(err) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await
                {
                    tracing::debug!(%err, "metrics: connection ended with an error");
                }
            });
        }
    }))
}

fn answer(
    request: Request<hyper::body::Incoming>,
    render: &Render,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if request.uri().path() == "/metrics" {
        Response::builder()
            .header(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(render())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(
                b"only /metrics is served here\n",
            )))
    };
    Ok(response.expect("a response built from valid parts"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(parse_address("").unwrap(), None);
        assert_eq!(parse_address("0").unwrap(), None);
        assert_eq!(
            parse_address(":9809").unwrap(),
            Some("0.0.0.0:9809".parse().unwrap())
        );
        assert_eq!(
            parse_address("127.0.0.1:1234").unwrap(),
            Some("127.0.0.1:1234".parse().unwrap())
        );
        assert!(parse_address("nonsense").is_err());
    }
}
