//! CSI conformance suite for `holdfast-driver --standalone`, run black-box over its real
//! unix socket with real mounts.
//!
//! It checks what the upstream CSI sanity suite (`csi-sanity`, from
//! kubernetes-csi/csi-test) checks, for every capability holdfast advertises: which RPC,
//! which input, which gRPC code comes back. Capability-gated cases follow what the
//! plugin reports; an RPC it does not advertise must answer UNIMPLEMENTED. Where
//! csi-sanity sends a minimal request (say, a random volume id and nothing else), the
//! same request is sent here, so an implementation that checks existence before
//! required fields fails here as it would there.
//!
//! Some cases go further, where the CSI spec is explicit or csi-sanity depends on it
//! without a case of its own: NOT_FOUND for unknown volumes on NodePublish and
//! ControllerExpand; no stacked mounts on a repeated NodePublish; data written through
//! one target read back through the next; one target path reused by successive volumes
//! (csi-sanity's `<mountdir>/target`); a NodeUnpublish naming another volume leaving the
//! mount alone; the MUSTs of LIST_VOLUMES_PUBLISHED_NODES, GET_VOLUME,
//! SINGLE_NODE_MULTI_WRITER and VOLUME_CONDITION; and holdfast's own StorageClass
//! parameters. Lifecycles run on both data paths (`fuse`, the default, and `bind`).
//!
//! Each test starts its own plugin process (the harness in `tests/common`), so tests are
//! independent and run in parallel; mounts left by a failing test are detached when the
//! harness's plugin drops.
//!
//! ```text
//! cargo test -p holdfast-driver --test sanity     # as root: NodePublish really mounts
//! ```
//!
//! # Running the real csi-sanity
//!
//! Where Go is available, build csi-sanity from kubernetes-csi/csi-test (`make -C
//! cmd/csi-sanity`) and point it at a standalone plugin:
//!
//! ```text
//! mkdir -p /tmp/holdfast-sanity/backend /tmp/holdfast-sanity/state
//! holdfast-driver --standalone \
//!     --endpoint unix:///tmp/holdfast-sanity/csi.sock \
//!     --node-id sanity-node \
//!     --backend-root /tmp/holdfast-sanity/backend \
//!     --state-dir /tmp/holdfast-sanity/state &
//! cat > /tmp/holdfast-sanity/params.yaml <<'EOF'
//! exclusive: "true"
//! onConflict: "fail"
//! dataPath: "fuse"
//! fenceAction: "error"
//! EOF
//! csi-sanity \
//!     --csi.endpoint=unix:///tmp/holdfast-sanity/csi.sock \
//!     --csi.mountdir=/tmp/holdfast-sanity/mount \
//!     --csi.stagingdir=/tmp/holdfast-sanity/staging \
//!     --csi.testvolumeparameters=/tmp/holdfast-sanity/params.yaml \
//!     --ginkgo.v
//! ```
//!
//! csi-sanity sends no `csi.storage.k8s.io/pod.uid`; `--standalone` then claims an
//! exclusive volume for the node's workload (cluster mode refuses such a publish), so the
//! volumes stay exclusive during the run and this suite sends no UID either.
//!
//! csi-sanity creates `--csi.mountdir` itself (it must not exist beforehand) and
//! publishes to `<mountdir>/target`, which the plugin must create and, on unpublish,
//! remove. Its defaults (10 GiB volumes, expansion by 1 GiB, ten repeats in the
//! idempotency cases) are the values this suite uses.

mod common;

#[path = "sanity/support.rs"]
mod support;

#[path = "sanity/identity.rs"]
mod identity;

#[path = "sanity/controller.rs"]
mod controller;

#[path = "sanity/volumes.rs"]
mod volumes;

#[path = "sanity/publish.rs"]
mod publish;

#[path = "sanity/node.rs"]
mod node;

#[path = "sanity/stats.rs"]
mod stats;

#[path = "sanity/status.rs"]
mod status;

#[path = "sanity/lifecycle.rs"]
mod lifecycle;
