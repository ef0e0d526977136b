//! What the controller does with Kubernetes itself: leader election on a Lease, the
//! Node watch that fences a node carrying the out-of-service taint, and the Events that
//! say why a pod waits for its volume (only the leader acts).

pub mod attach_watch;
pub mod events;
pub mod leader;
pub mod lease_watch;
pub mod node_watch;
pub mod refusal;
pub mod taint_fence;
