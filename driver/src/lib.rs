//! holdfast's node plugin (`holdfast-driver`).
//!
//! Four rooms, one folder each:
//!
//! - [`csi`]: the CSI boundary. [`csi::node`] is the Node service (the gRPC surface and
//!   its request checks); [`csi::error`] is the node's error type and its one mapping to
//!   gRPC statuses.
//! - [`lock`]: the lock on this node. [`lock::claims`] holds the claims this node owns
//!   and their gates; [`lock::epoch_file`] is the fencing epoch on the volume's storage;
//!   [`lock::enforcer`] fences gates (higher epoch on storage, claim lost, node fenced);
//!   [`lock::holders`] finds and kills the processes using a fenced bind volume;
//!   [`lock::gone_pods`] watches this node's pods and releases the claim of a gone pod
//!   kubelet did not unpublish, once no process uses its mounts;
//!   [`lock::lock_request`] is what a publish asks of the lock (pod, context, wait budget).
//! - [`publish`]: what publish, unpublish and stats do on the node.
//!   [`publish::publisher`] runs them (bind mount or FUSE); [`publish::published`] is the
//!   table of published targets and the per-volume locks; [`publish::kernel_mounts`] holds
//!   every kernel mount syscall and reads the mount table; [`publish::fuse_targets`] is
//!   the node-local record of which volume each FUSE target shows.
//! - [`datapath`]: the fenced FUSE data path (the daemon, its FUSE mount, the kernel
//!   fence).
//!
//! [`args`] is the command line and [`plugin`] the process: [`run`] serves the services on
//! one socket and stops gracefully. [`pod_event`] builds the Events the plugin posts on
//! pods it acted for.

pub mod args;
pub mod csi;
pub mod datapath;
pub mod lock;
pub mod metrics;
pub mod plugin;
pub mod pod_event;
pub mod publish;

pub use plugin::{run, RunError};
