//! The end-to-end harness: the whole system on one machine, with faults.
//!
//! A [`Cluster`] runs one real lease store (etcd, or a kube-apiserver for the
//! kubernetes store), the real `holdfast-controller` and N real
//! `holdfast-driver` node plugins, each plugin in its own network namespace (so a
//! partition cuts exactly one node off the store), all over one backend root standing in
//! for the shared filesystem. Tests drive it as a CO would (CreateVolume, attach,
//! NodePublish/Unpublish over the real unix sockets), run [`Writer`] workloads on the
//! published FUSE mounts, inject faults (`kill`, `pause`/`resume`, `restart`,
//! `partition`/`heal`, `fence`) and finally read the backing file with the
//! [`checker`].
//!
//! Modules:
//! - [`cluster`]: [`Cluster`], [`cluster::LeaseTiming`], the fault controls;
//! - [`csi`]: the CO's requests ([`Cluster::create_volume`], [`Cluster::publish`], …);
//! - [`demo`]: the failover story `scripts/demo.sh` tells (the `holdfast-demo` binary);
//! - [`netns`]: namespaces, veth links, partition / heal, stale cleanup;
//! - [`process`]: a CSI daemon process with kill / pause / resume / restart;
//! - [`writer`] and the `hf-e2e-writer` binary: the workload; [`records`]: its format;
//! - [`checker`]: what must (and must not) have landed;
//! - [`mounts`]: mount-table reading and the lazy-unmount sweep;
//! - [`bins`]: finding (and building) the node plugin and controller binaries;
//! - [`stale`]: removing what a killed earlier run left behind.
//!
//! Running: `cargo test -p holdfast-e2e -- --nocapture` (each test prints what it
//! measured: takeover latency, time to EIO, …) and `cargo bench -p holdfast-e2e --bench
//! failover`. Everything needs root (namespaces, veths, mounts, /dev/fuse), `ip` and
//! `nsenter`. The node plugin and controller are (re)built by the harness on first use
//! (see [`bins`]); `HOLDFAST_E2E_NO_BUILD=1` skips that. Clusters run one at a time
//! (see [`cluster`]), so the tests of one file run in sequence whatever the thread
//! count. Cleanup happens on drop, after a failed assertion too; namespaces and veths
//! of a run that was itself killed are removed by the next run.

pub mod bins;
pub mod checker;
pub mod cluster;
pub mod csi;
pub mod demo;
pub mod mounts;
pub mod netns;
pub mod process;
pub mod records;
pub mod stale;
pub mod writer;

pub use checker::Landed;
pub use cluster::{Cluster, LeaseTiming, StoreKind};
pub use csi::Volume;
pub use writer::Writer;

/// errno values the tests expect.
pub mod errno {
    pub const EIO: i32 = libc::EIO;
    pub const ENOTCONN: i32 = libc::ENOTCONN;
    pub const ECONNABORTED: i32 = libc::ECONNABORTED;
}

/// Runs a scenario `async fn name(cluster: Cluster)` on both lease stores, as the tests
/// `name::etcd` and `name::kubernetes` (the latter skips without Kubernetes binaries,
/// unless `HOLDFAST_REQUIRE_KUBE=1`): the same faults, invariant checks and failover
/// bounds on each.
#[macro_export]
macro_rules! on_both_stores {
    ($scenario:ident, $nodes:expr) => {
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn etcd() {
                super::$scenario($crate::Cluster::start($nodes).await).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn kubernetes() {
                let test = concat!(stringify!($scenario), "::kubernetes");
                if let Some(cluster) = $crate::Cluster::start_kubernetes(test, $nodes).await {
                    super::$scenario(cluster).await;
                }
            }
        }
    };
}
