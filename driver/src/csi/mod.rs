//! The CSI boundary of the node plugin: the Node service and the one place where the
//! node's errors become gRPC statuses.

pub mod error;
pub mod node;
