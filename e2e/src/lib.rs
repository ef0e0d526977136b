//! The end-to-end harness: the whole system on one machine, with faults.
//!
//! A [`Cluster`] runs one real etcd, the real `holdfast-controller` and N real
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
//! - [`netns`]: namespaces, veth links, partition / heal, stale cleanup;
//! - [`process`]: a CSI daemon process with kill / pause / resume / restart;
//! - [`writer`] and the `hf-e2e-writer` binary: the workload; [`records`]: its format;
//! - [`checker`]: what must (and must not) have landed;
//! - [`mounts`]: mount-table reading and the lazy-unmount sweep;
//! - [`bins`]: finding (and building) the node plugin and controller binaries.
//!
//! Everything needs root (namespaces, mounts, /dev/fuse).

pub mod bins;
pub mod checker;
pub mod cluster;
pub mod csi;
pub mod mounts;
pub mod netns;
pub mod process;
pub mod records;
pub mod writer;

pub use checker::Landed;
pub use cluster::{Cluster, LeaseTiming};
pub use csi::Volume;
pub use writer::Writer;

/// errno values the tests expect.
pub mod errno {
    pub const EIO: i32 = libc::EIO;
    pub const ENOTCONN: i32 = libc::ENOTCONN;
    pub const ECONNABORTED: i32 = libc::ECONNABORTED;
}
