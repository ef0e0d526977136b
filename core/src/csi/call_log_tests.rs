//! Tests for the call-log layer: the status is found in headers (trailers-only
//! responses) and in trailers, each call is logged once, and a body dropped early
//! is reported rather than silently forgotten.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::executor::block_on;
use futures::future::poll_fn;
use http::{HeaderMap, HeaderValue, Request, Response};
use http_body::{Body, Frame};
use tower::{service_fn, Layer, Service, ServiceExt};

use super::*;

/// A body that yields a fixed list of frames.
struct FramesBody(VecDeque<Frame<&'static [u8]>>);

impl Body for FramesBody {
    type Data = &'static [u8];
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }
}

fn status_headers(code: &'static str, message: Option<&'static str>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("grpc-status", HeaderValue::from_static(code));
    if let Some(message) = message {
        headers.insert("grpc-message", HeaderValue::from_static(message));
    }
    headers
}

#[derive(Clone)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Runs `f` with a subscriber that records log lines; returns the recorder.
fn with_log<R>(f: impl FnOnce(&Captured) -> R) -> R {
    let captured = Captured(Arc::default());
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    tracing::subscriber::with_default(subscriber, || f(&captured))
}

/// Calls a layered service that answers with `headers` and `frames`.
fn call(headers: HeaderMap, frames: Vec<Frame<&'static [u8]>>) -> Response<LoggedBody<FramesBody>> {
    // Frames are not Clone; the service answers once, so hand them over once.
    let frames = Mutex::new(Some(frames));
    let inner = service_fn(move |_req: Request<()>| {
        let frames = frames.lock().unwrap().take().expect("one call per service");
        let mut response = Response::new(FramesBody(frames.into()));
        *response.headers_mut() = headers.clone();
        async move { Ok::<_, Infallible>(response) }
    });
    let mut svc = CsiCallLog.layer(inner);
    let request = Request::builder()
        .uri("/csi.v1.Node/NodePublishVolume")
        .body(())
        .unwrap();
    block_on(async { svc.ready().await.unwrap().call(request).await.unwrap() })
}

fn drain<B: Body>(body: B) {
    let mut body = std::pin::pin!(body);
    block_on(poll_fn(|cx| loop {
        match body.as_mut().poll_frame(cx) {
            Poll::Ready(Some(_)) => continue,
            Poll::Ready(None) => return Poll::Ready(()),
            Poll::Pending => return Poll::Pending,
        }
    }));
}

#[test]
fn trailers_only_error_is_logged_from_headers_once() {
    with_log(|log| {
        let response = call(status_headers("5", Some("volume%20gone")), vec![]);
        // Logged as soon as the headers are seen, before the body is read.
        let text = log.text();
        assert!(text.contains("WARN"), "{text}");
        assert!(text.contains("/csi.v1.Node/NodePublishVolume"), "{text}");
        assert!(text.contains("NOT_FOUND"), "{text}");
        assert!(text.contains("volume gone"), "{text}");
        drain(response.into_body());
        assert_eq!(log.text().lines().count(), 1, "{}", log.text());
    });
}

#[test]
fn ok_status_is_logged_from_trailers() {
    with_log(|log| {
        let frames = vec![
            Frame::data(&b"\0\0\0\0\0"[..]),
            Frame::trailers(status_headers("0", None)),
        ];
        let response = call(HeaderMap::new(), frames);
        assert_eq!(log.text(), "", "nothing is known before the trailers");
        drain(response.into_body());
        let text = log.text();
        assert!(text.contains("INFO"), "{text}");
        assert!(text.contains("code=\"OK\""), "{text}");
        assert!(text.contains("elapsed_ms="), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    });
}

#[test]
fn error_in_trailers_is_logged_as_warning() {
    with_log(|log| {
        let frames = vec![Frame::trailers(status_headers("10", Some("busy")))];
        drain(call(HeaderMap::new(), frames).into_body());
        let text = log.text();
        assert!(text.contains("WARN"), "{text}");
        assert!(text.contains("ABORTED"), "{text}");
        assert!(text.contains("busy"), "{text}");
    });
}

#[test]
fn body_dropped_before_trailers_is_reported() {
    with_log(|log| {
        let frames = vec![
            Frame::data(&b"x"[..]),
            Frame::trailers(status_headers("0", None)),
        ];
        drop(call(HeaderMap::new(), frames));
        let text = log.text();
        assert!(text.contains("without a gRPC status"), "{text}");
        assert_eq!(text.lines().count(), 1, "{text}");
    });
}

#[test]
fn code_names_are_canonical() {
    assert_eq!(code_name(Code::Ok), "OK");
    assert_eq!(code_name(Code::FailedPrecondition), "FAILED_PRECONDITION");
    assert_eq!(code_name(Code::ResourceExhausted), "RESOURCE_EXHAUSTED");
    assert_eq!(code_name(Code::Unauthenticated), "UNAUTHENTICATED");
}
