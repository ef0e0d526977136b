//! The lease protocol.
//!
//! - [`types`]: the records kept in the store (sessions, claims, node fences).
//! - [`gate`]: the cheap "may I still write?" check the data path makes.
//! - [`params`]: D, ε and margin, and the check that keeps the windows disjoint.
//! - [`decide`]: the pure acquire / release / fence / status decisions.
//! - [`attach`]: the controller's attach gate, as that same acquire decision.
//! - [`session`]: pure renewal bookkeeping and predecessor-death proofs.
//! - [`flow`]: one acquire attempt as an I/O-free step machine.
//! - [`node_lock`]: the per-instance flock that proves a same-boot predecessor dead.
//! - [`client`]: [`SessionLease`], the async shell that drives all of it against a
//!   [`crate::store::LeaseStore`]; [`fence`]: fencing a whole node.
//!
//! How the binaries use it:
//! - node plugin: [`SessionLease::start`] once; per NodePublishVolume
//!   [`SessionLease::acquire`] → [`Grant`] (its epoch goes onto the storage), a
//!   [`VolumeGate`] over [`SessionLease::deadline`]; now and then
//!   [`SessionLease::claim_status`], fencing the gate unless [`ClaimStatus::Held`];
//!   per NodeUnpublishVolume stop the data path, then [`SessionLease::release`] (if the
//!   store is down, retry later: a re-acquire meanwhile takes a new epoch, so the late
//!   release cannot free it); at exit [`SessionLease::shutdown`].
//! - controller: per ControllerPublishVolume, read the volume's claim, its holder's
//!   session (timed in its own [`SessionObserver`]) and fence, and ask [`decide_attach`]
//!   — the node's acquire decision on behalf of a newcomer of the attaching node;
//!   [`fence_node`] / [`unfence_node`] for the out-of-service taint or explicit fences.
//!
//! Everything that decides (may this pod take the claim? may this holder still write?)
//! is pure: it takes the records and a reading of [`crate::clock::Mono`] as arguments
//! and does no I/O, so that the simulation drives exactly the code the binaries run.

pub mod types;

pub use types::{
    ClaimRecord, ClaimState, Epoch, Holder, NodeFence, PodName, SessionKey, SessionRecord,
};

pub mod gate;

pub use gate::{FenceCause, SessionDeadline, VolumeGate};

pub mod attach;
pub mod client;
pub mod decide;
pub mod error;
pub mod fence;
pub mod flow;
pub mod identity;
pub mod node_lock;
pub mod params;
pub mod recovery;
pub mod session;
pub mod session_lease;

pub use attach::{decide_attach, AttachDecision, AttachGrant, AttachInput};
pub use client::LeaseClient;
pub use decide::{ClaimStatus, Observations, SessionObserver, SessionView};
pub use error::LeaseError;
pub use fence::{fence_node, unfence_node, FenceReport};
pub use flow::Grant;
pub use identity::NodeIdentity;
pub use params::{InvalidParams, LeaseParams};
pub use recovery::RecoveryReport;
pub use session_lease::{DataPaths, SessionLease, SessionOptions};
