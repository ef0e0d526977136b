//! What the controller does with Kubernetes itself: leader election on a Lease, and the
//! Node watch that fences a node carrying the out-of-service taint (only the leader
//! acts).

pub mod leader;
pub mod node_watch;
pub mod taint_fence;
