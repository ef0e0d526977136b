//! A tower layer that logs every CSI call once, with its outcome.
//!
//! Each call is logged as: gRPC method path, time from request to final status, and
//! the gRPC status (`OK`, or the code name and message), at `info` for `OK` and
//! `warn` otherwise. Request and response bodies are never logged: CSI requests
//! carry secrets.
//!
//! gRPC puts the status in one of two places. A "trailers-only" response (how tonic
//! sends most errors) has `grpc-status` in its headers; every other response sends
//! it in the trailers after the body. The layer checks the headers first and
//! otherwise wraps the body to read the trailers as they pass. A body dropped before
//! its trailers (the client went away) is logged as unfinished.
//!
//! Use: `Server::builder().layer(CsiCallLog)`.

use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;
use tonic::{Code, Status};
use tower::{Layer, Service};

/// The layer; see the module docs.
#[derive(Clone, Copy, Debug, Default)]
pub struct CsiCallLog;

impl<S> Layer<S> for CsiCallLog {
    type Service = CsiCallLogService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CsiCallLogService { inner }
    }
}

/// The service produced by [`CsiCallLog`].
#[derive(Clone, Debug)]
pub struct CsiCallLogService<S> {
    inner: S,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for CsiCallLogService<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Error: Display,
{
    type Response = Response<LoggedBody<ResBody>>;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let call = CallRecord {
            method: request.uri().path().to_owned(),
            started: Instant::now(),
        };
        ResponseFuture {
            inner: self.inner.call(request),
            call: Some(call),
        }
    }
}

pin_project! {
    /// Future of [`CsiCallLogService`]: the inner response with its body wrapped.
    pub struct ResponseFuture<F> {
        #[pin]
        inner: F,
        call: Option<CallRecord>,
    }
}

impl<F, B, E> Future for ResponseFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Display,
{
    type Output = Result<Response<LoggedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.inner.poll(cx));
        let call = this
            .call
            .take()
            .expect("ResponseFuture polled after completion");
        match result {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let call = match Status::from_header_map(&parts.headers) {
                    Some(status) => {
                        call.finish(status.code(), status.message());
                        None
                    }
                    None => Some(call),
                };
                let body = LoggedBody { inner: body, call };
                Poll::Ready(Ok(Response::from_parts(parts, body)))
            }
            Err(error) => {
                call.failed(&error);
                Poll::Ready(Err(error))
            }
        }
    }
}

pin_project! {
    /// A response body that logs the call when its trailers pass by.
    pub struct LoggedBody<B> {
        #[pin]
        inner: B,
        call: Option<CallRecord>,
    }

    impl<B> PinnedDrop for LoggedBody<B> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(call) = this.project().call.take() {
                call.unfinished();
            }
        }
    }
}

impl<B> Body for LoggedBody<B>
where
    B: Body,
    B::Error: Display,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.project();
        let frame = ready!(this.inner.poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(trailers) = frame.trailers_ref() {
                    if let Some(call) = this.call.take() {
                        match Status::from_header_map(trailers) {
                            Some(status) => call.finish(status.code(), status.message()),
                            None => call.unfinished(),
                        }
                    }
                }
            }
            Some(Err(error)) => {
                if let Some(call) = this.call.take() {
                    call.failed(error);
                }
            }
            None => {
                if let Some(call) = this.call.take() {
                    call.unfinished();
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// One call in flight: what was called and when.
#[derive(Debug)]
pub struct CallRecord {
    method: String,
    started: Instant,
}

impl CallRecord {
    fn elapsed_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    fn finish(self, code: Code, message: &str) {
        let elapsed_ms = self.elapsed_ms();
        if code == Code::Ok {
            tracing::info!(method = %self.method, elapsed_ms, code = "OK", "CSI call");
        } else {
            tracing::warn!(
                method = %self.method,
                elapsed_ms,
                code = code_name(code),
                message,
                "CSI call failed"
            );
        }
    }

    fn failed(self, error: &dyn Display) {
        let elapsed_ms = self.elapsed_ms();
        tracing::warn!(
            method = %self.method,
            elapsed_ms,
            error = %error,
            "CSI call failed in transport"
        );
    }

    fn unfinished(self) {
        let elapsed_ms = self.elapsed_ms();
        tracing::warn!(
            method = %self.method,
            elapsed_ms,
            "CSI call ended without a gRPC status (client gone?)"
        );
    }
}

/// The canonical gRPC name of a status code, as the CSI spec writes it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

#[cfg(test)]
#[path = "call_log_tests.rs"]
mod tests;
