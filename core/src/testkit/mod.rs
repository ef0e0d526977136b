//! Test harnesses shared by every crate's tests (cargo feature `testkit`):
//!
//! - [`etcd`]: [`etcd::EtcdServer`], a real etcd process on free loopback ports, with
//!   pause / resume / kill for fault tests.
//! - [`kube`]: [`kube::ControlPlane`], a real etcd + kube-apiserver (and optionally
//!   kube-controller-manager and kube-scheduler) with a test PKI and per-identity
//!   kubeconfigs; skips, or fails under `HOLDFAST_REQUIRE_KUBE=1`, without binaries.
//! - [`conformance`]: the behaviour every [`crate::store::LeaseStore`] must show, as one
//!   suite: `conformance::run(store).await`.
//! - [`cargo`]: a nested `cargo` for tests that need other binaries built.

pub mod cargo;
pub mod conformance;
pub mod etcd;
pub mod kube;
