//! Serving CSI on a unix socket, the way kubelet and the sidecars reach a driver.
//!
//! Owns: parsing `--endpoint` values ([`Endpoint`]), taking over the socket path
//! ([`serve_unix`]), shutdown on SIGTERM/SIGINT ([`shutdown_signal`]) and client
//! channels to such a socket ([`connect_unix`]).
//!
//! Taking over the path is careful on purpose: a leftover socket from a dead
//! process is replaced, but a regular file is never deleted (a mistyped endpoint
//! must not destroy data), and a socket that still answers is left alone (another
//! live plugin instance owns it). On shutdown the socket is removed only if it is
//! still the one this process bound, so a successor's socket is never unlinked.
//!
//! The call-log layer lives in [`super::call_log`] and is re-exported here.

use std::fmt;
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::body::Body as GrpcBody;
use tonic::codegen::{Bytes, StdError};
use tonic::service::Routes;
use tonic::transport::server::Router;
use tonic::transport::Channel;
use tower::{Layer, Service};

pub use super::call_log::CsiCallLog;

/// The longest path a unix socket address can hold (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A CSI endpoint: an absolute unix socket path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    path: PathBuf,
}

/// Why an `--endpoint` value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid CSI endpoint {value:?}: {reason}; expected unix:///absolute/path/csi.sock \
     (unix:/absolute/path and a bare absolute path are also accepted)"
)]
pub struct EndpointError {
    value: String,
    reason: &'static str,
}

impl Endpoint {
    /// Parses `unix:///abs/path`, `unix:/abs/path` or `/abs/path`.
    pub fn parse(value: &str) -> Result<Self, EndpointError> {
        let fail = |reason| EndpointError {
            value: value.to_owned(),
            reason,
        };
        let path = if let Some(rest) = value.strip_prefix("unix://") {
            rest
        } else if let Some(rest) = value.strip_prefix("unix:") {
            rest
        } else if value.contains("://") {
            return Err(fail("only unix sockets are supported"));
        } else {
            value
        };
        if !path.starts_with('/') {
            return Err(fail("the socket path must be absolute"));
        }
        if path.ends_with('/') {
            return Err(fail("the socket path names a directory"));
        }
        if path.contains('\0') {
            return Err(fail("the socket path contains a NUL byte"));
        }
        if path.len() > MAX_SOCKET_PATH {
            return Err(fail("the socket path is longer than 107 bytes"));
        }
        Ok(Self { path: path.into() })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        Self::parse(value)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "unix://{}", self.path.display())
    }
}

/// Why serving or connecting failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot create socket directory {}: {source}", path.display())]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot inspect {}: {source}", path.display())]
    Inspect { path: PathBuf, source: io::Error },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("{} is a live socket that another server answers on; refusing to take it over", path.display())]
    InUse { path: PathBuf },
    #[error("cannot remove stale socket {}: {source}", path.display())]
    RemoveStale { path: PathBuf, source: io::Error },
    #[error("cannot listen on {}: {source}", path.display())]
    Bind { path: PathBuf, source: io::Error },
    #[error("gRPC server on {} failed: {source}", path.display())]
    Serve {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
}

/// Serves `router` on the endpoint's unix socket until `shutdown` completes, then
/// lets in-flight calls finish and removes the socket file.
pub async fn serve_unix<L, ResBody>(
    endpoint: &Endpoint,
    router: Router<L>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError>
where
    L: Layer<Routes>,
    L::Service: Service<http::Request<GrpcBody>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    <L::Service as Service<http::Request<GrpcBody>>>::Future: Send,
    <L::Service as Service<http::Request<GrpcBody>>>::Error: Into<StdError> + Send,
    ResBody: http_body::Body<Data = Bytes> + Send + 'static,
    ResBody::Error: Into<StdError>,
{
    let path = endpoint.path();
    let (listener, bound) = bind_socket(path).await?;
    tracing::info!(endpoint = %endpoint, "serving CSI");
    let result = router
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
        .await;
    remove_if_ours(path, bound);
    tracing::info!(endpoint = %endpoint, "CSI server stopped");
    result.map_err(|source| ServeError::Serve {
        path: path.to_owned(),
        source,
    })
}

/// Completes on the first SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(term), Ok(int)) => (term, int),
        (Err(e), _) | (_, Err(e)) => {
            // Without handlers the default action (exit) still applies; waiting
            // forever is then the correct "no graceful signal" behaviour.
            tracing::error!(error = %e, "cannot install signal handlers");
            return std::future::pending().await;
        }
    };
    let name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    tracing::info!(signal = name, "shutting down");
}

/// A client channel to a CSI server on the unix socket at `path`.
pub async fn connect_unix(path: impl AsRef<Path>) -> Result<Channel, ServeError> {
    let path = path.as_ref();
    let connect_error = |source| ServeError::Connect {
        path: path.to_owned(),
        source,
    };
    let uri = format!("unix:{}", path.display());
    tonic::transport::Endpoint::from_shared(uri)
        .map_err(connect_error)?
        .connect()
        .await
        .map_err(connect_error)
}

/// Identity of a socket file we bound: (device, inode).
type BoundSocket = (u64, u64);

async fn bind_socket(path: &Path) -> Result<(UnixListener, BoundSocket), ServeError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| ServeError::CreateDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    clear_stale_socket(path).await?;
    let listener = UnixListener::bind(path).map_err(|source| ServeError::Bind {
        path: path.to_owned(),
        source,
    })?;
    let meta = std::fs::symlink_metadata(path).map_err(|source| ServeError::Inspect {
        path: path.to_owned(),
        source,
    })?;
    Ok((listener, (meta.dev(), meta.ino())))
}

/// Removes a leftover socket at `path` if nothing answers on it.
async fn clear_stale_socket(path: &Path) -> Result<(), ServeError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ServeError::Inspect {
                path: path.to_owned(),
                source,
            })
        }
    };
    if !meta.file_type().is_socket() {
        return Err(ServeError::NotASocket {
            path: path.to_owned(),
        });
    }
    match UnixStream::connect(path).await {
        Ok(_) => Err(ServeError::InUse {
            path: path.to_owned(),
        }),
        // Refused: the socket file outlived its server. Anything else (e.g.
        // permission denied) is not proof of that, so report it instead.
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing stale socket");
            match std::fs::remove_file(path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(source) => Err(ServeError::RemoveStale {
                    path: path.to_owned(),
                    source,
                }),
            }
        }
        Err(source) => Err(ServeError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes the socket file if it is still the one we bound.
fn remove_if_ours(path: &Path, bound: BoundSocket) {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if (meta.dev(), meta.ino()) == bound => {
            if let Err(e) = std::fs::remove_file(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove socket");
            }
        }
        Ok(_) => tracing::info!(path = %path.display(), "socket was replaced; leaving it"),
        Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_three_spellings() {
        for value in [
            "unix:///run/csi/csi.sock",
            "unix:/run/csi/csi.sock",
            "/run/csi/csi.sock",
        ] {
            let ep = Endpoint::parse(value).unwrap();
            assert_eq!(ep.path(), Path::new("/run/csi/csi.sock"), "{value}");
            assert_eq!(ep.to_string(), "unix:///run/csi/csi.sock");
        }
        let ep: Endpoint = "unix:///csi.sock".parse().unwrap();
        assert_eq!(ep.path(), Path::new("/csi.sock"));
    }

    #[test]
    fn rejects_everything_else_with_the_expected_form() {
        let long = format!("/{}", "x".repeat(MAX_SOCKET_PATH));
        for value in [
            "",
            "csi.sock",
            "unix://run/csi.sock",
            "unix:relative.sock",
            "tcp://127.0.0.1:10000",
            "127.0.0.1:10000",
            "/run/csi/",
            "/run/\0/csi.sock",
            long.as_str(),
        ] {
            let err = Endpoint::parse(value).unwrap_err();
            let text = err.to_string();
            assert!(
                text.contains("expected unix:///absolute/path/csi.sock"),
                "{value}: {text}"
            );
        }
        let text = Endpoint::parse("tcp://h:1").unwrap_err().to_string();
        assert!(text.contains("only unix sockets"), "{text}");
    }
}
