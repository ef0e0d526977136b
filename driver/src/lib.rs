//! holdfast's node plugin (`holdfast-driver`).
//!
//! - [`args`]: the command line and the checked [`args::Config`].
//! - [`mount`]: every mount syscall and the mount table (the only place they happen).
//! - [`plugin`]: [`run`], the process: services on one socket, graceful stop.
//! - [`node`]: the CSI Node service (the gRPC boundary); [`publisher`]: what publish,
//!   unpublish and stats do on the node (bind mount or FUSE); [`published`]: the table
//!   of published targets and the per-volume locks; [`error`]: the node's error type
//!   and its one mapping to gRPC statuses.
//! - [`datapath`]: the fenced FUSE data path; [`fuse_targets`]: the node-local record
//!   of which volume each FUSE target shows.
//! - [`claims`]: the claims this node holds and their gates; [`epoch_file`]: the
//!   fencing epoch on the volume's storage; [`enforcer`]: the task that fences gates
//!   (higher epoch on storage, claim lost, node fenced); [`holders`]: finding and
//!   killing the processes that use a fenced bind volume; [`lock_request`]: what a
//!   publish asks of the lock (pod UID, context check, wait budget).

pub mod args;
pub mod claims;
pub mod datapath;
pub mod enforcer;
pub mod epoch_file;
pub mod error;
pub mod fuse_targets;
pub mod holders;
pub mod lock_request;
pub mod mount;
pub mod node;
pub mod plugin;
pub mod published;
pub mod publisher;

pub use plugin::{run, RunError};
