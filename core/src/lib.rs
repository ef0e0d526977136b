//! holdfast's shared library.
//!
//! - [`csi`]: the CSI v1 gRPC bindings, generated at build time from `proto/csi.proto`.
//! - [`lease`]: the lease protocol — sessions, claims, fencing epochs and the acquire
//!   decision — as pure code, plus the client that drives it against a store.
//! - [`lease_config`]: the lease store and timing flags both binaries flatten into their
//!   command lines.
//! - [`store`]: the [`store::LeaseStore`] trait and its backends (memory, etcd, kubernetes).
//! - `testkit` (feature `testkit`): a real etcd for tests and the store conformance suite.
//! - [`sim`]: a deterministic simulation of the lease protocol under faults.
//! - [`clock`]: the one clock the protocol trusts (CLOCK_BOOTTIME).

pub mod backend;
pub mod clock;
pub mod csi;
pub mod lease;
pub mod lease_config;
pub mod logging;
pub mod metrics_http;
pub mod sim;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
