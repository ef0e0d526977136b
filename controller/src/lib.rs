//! holdfast's CSI controller.
//!
//! - [`args`]: the command line.
//! - [`controller_service`] / [`ControllerService`]: the CSI Controller service over
//!   the directory [`Backend`] (also served by the node plugin's standalone mode).
//! - [`ControllerError`]: the crate's errors and their one mapping to gRPC codes.
//! - [`run`]: what the binary does — serve Identity + Controller until SIGTERM.

pub mod args;
mod convert;
mod error;
mod service;

use std::sync::Arc;

use holdfast_core::backend::{Backend, BackendError};
use holdfast_core::csi::identity::{IdentityService, Readiness};
use holdfast_core::csi::serve::{self, CsiCallLog, Endpoint, EndpointError, ServeError};
use holdfast_core::logging::{self, LoggingError};

pub use error::ControllerError;
pub use service::{controller_service, ControllerService};

/// Why the controller could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Logging(#[from] LoggingError),
    #[error(transparent)]
    Endpoint(#[from] EndpointError),
    #[error("cannot open the backend root: {0}")]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Serves Identity (advertising CONTROLLER_SERVICE) and Controller on the endpoint
/// until SIGTERM or SIGINT, then removes the socket.
pub async fn run(args: args::Args) -> Result<(), RunError> {
    logging::init(&args.log_level, args.log_format)?;
    let endpoint = Endpoint::parse(&args.endpoint)?;
    let backend = Arc::new(Backend::open(&args.backend_root)?);
    tracing::info!(backend_root = %backend.root().display(), "backend opened");
    let readiness = Readiness::new();
    let router = tonic::transport::Server::builder()
        .layer(CsiCallLog)
        .add_service(IdentityService::new(true, readiness.clone()).into_server())
        .add_service(controller_service(backend));
    // The controller keeps no lease or session: it can serve as soon as it listens.
    readiness.set(true);
    serve::serve_unix(&endpoint, router, serve::shutdown_signal()).await?;
    Ok(())
}
