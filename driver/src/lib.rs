//! holdfast's node plugin (`holdfast-driver`).
//!
//! - [`args`]: the command line and the checked [`args::Config`].
//! - [`mount`]: every mount syscall and the mount table (the only place they happen).
//! - [`plugin`]: [`run`], the process: services on one socket, graceful stop.
//! - [`node`]: the CSI Node service; [`published`]: its table of published targets and
//!   per-volume locks; [`error`]: its error type and the one mapping to gRPC statuses.

pub mod args;
pub mod datapath;
pub mod error;
pub mod mount;
pub mod node;
pub mod published;
pub mod plugin;

pub use plugin::{run, RunError};
