//! The lease protocol.
//!
//! - [`types`]: the records kept in the store (sessions, claims, node fences).
//! - [`gate`]: the cheap "may I still write?" check the data path makes.
//!
//! Everything that decides (may this pod take the claim? may this holder still write?)
//! is pure: it takes the records and a reading of [`crate::clock::Mono`] as arguments
//! and does no I/O, so that the simulation drives exactly the code the binaries run.

pub mod types;

pub use types::{ClaimRecord, ClaimState, Epoch, Holder, NodeFence, SessionKey, SessionRecord};

pub mod gate;

pub use gate::{FenceCause, SessionDeadline, VolumeGate};
