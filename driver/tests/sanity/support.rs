//! Shared helpers for the conformance suite: one [`Sanity`] fixture per test (a fresh
//! `holdfast-driver --standalone` process from the common harness plus a private
//! directory for publish targets), request builders that mirror what the upstream
//! suite sends, error-code assertions, and mount-table inspection.
//!
//! Mount cleanup is the harness's: dropping its `Plugin` kills the process and lazily
//! unmounts everything under its directory (publish targets included), so a failing test
//! never leaves a stale FUSE or bind mount behind.

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use holdfast_core::csi::v1::{
    controller_client::ControllerClient, controller_service_capability,
    identity_client::IdentityClient, node_client::NodeClient, node_service_capability,
    plugin_capability, volume_capability, CapacityRange, ControllerGetCapabilitiesRequest,
    ControllerPublishVolumeRequest, CreateVolumeRequest, CreateVolumeResponse,
    GetPluginCapabilitiesRequest, NodeGetCapabilitiesRequest, NodeGetInfoRequest,
    NodePublishVolumeRequest, Volume, VolumeCapability,
};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::common::Plugin;

pub use controller_service_capability::rpc::Type as ControllerCap;
pub use node_service_capability::rpc::Type as NodeCap;
pub use plugin_capability::service::Type as PluginService;

/// The size csi-sanity provisions by default (`--csi.testvolumesize`): 10 GiB.
pub const TEST_VOLUME_SIZE: i64 = 10 * 1024 * 1024 * 1024;
/// csi-sanity expands by 1 GiB unless told otherwise (`--csi.testvolumeexpandsize`).
pub const TEST_EXPAND_SIZE: i64 = TEST_VOLUME_SIZE + 1024 * 1024 * 1024;
/// How often csi-sanity repeats a call in its idempotency cases (`IdempotentCount`).
pub const REPEAT: usize = 10;
/// No single test may take longer than this; a hung RPC fails the test instead of the run.
const TEST_DEADLINE: Duration = Duration::from_secs(30);

/// Runs one test body under [`TEST_DEADLINE`].
pub async fn bounded<F: Future>(body: F) -> F::Output {
    match tokio::time::timeout(TEST_DEADLINE, body).await {
        Ok(out) => out,
        Err(_) => panic!("test did not finish within {TEST_DEADLINE:?} (an RPC hung?)"),
    }
}

/// A running standalone plugin and a channel to it.
pub struct Sanity {
    channel: Channel,
    plugin: Plugin,
}

impl Sanity {
    pub async fn start() -> Self {
        let plugin = Plugin::start_standalone().await;
        let channel = plugin.channel().await;
        Sanity { channel, plugin }
    }

    /// The last lines the plugin logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let logs = self.plugin.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel.clone())
    }

    pub fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel.clone())
    }

    pub fn node(&self) -> NodeClient<Channel> {
        NodeClient::new(self.channel.clone())
    }

    /// A target path that does not exist yet; its parent does (csi-sanity's default).
    pub fn fresh_target(&self) -> PathBuf {
        let path = self.plugin.target();
        assert!(
            !path.exists(),
            "harness target {} already exists",
            path.display()
        );
        path
    }

    pub async fn controller_caps(&self) -> Vec<ControllerCap> {
        let caps = self
            .controller()
            .controller_get_capabilities(ControllerGetCapabilitiesRequest {})
            .await
            .expect("ControllerGetCapabilities")
            .into_inner()
            .capabilities;
        caps.into_iter()
            .map(|c| match c.r#type {
                Some(controller_service_capability::Type::Rpc(rpc)) => {
                    ControllerCap::try_from(rpc.r#type)
                        .unwrap_or_else(|_| panic!("unknown controller capability {}", rpc.r#type))
                }
                None => panic!("controller capability without a type"),
            })
            .collect()
    }

    pub async fn has_controller_cap(&self, cap: ControllerCap) -> bool {
        self.controller_caps().await.contains(&cap)
    }

    pub async fn node_caps(&self) -> Vec<NodeCap> {
        let caps = self
            .node()
            .node_get_capabilities(NodeGetCapabilitiesRequest {})
            .await
            .expect("NodeGetCapabilities")
            .into_inner()
            .capabilities;
        caps.into_iter()
            .map(|c| match c.r#type {
                Some(node_service_capability::Type::Rpc(rpc)) => NodeCap::try_from(rpc.r#type)
                    .unwrap_or_else(|_| panic!("unknown node capability {}", rpc.r#type)),
                None => panic!("node capability without a type"),
            })
            .collect()
    }

    pub async fn has_node_cap(&self, cap: NodeCap) -> bool {
        self.node_caps().await.contains(&cap)
    }

    pub async fn plugin_services(&self) -> Vec<PluginService> {
        let caps = self
            .identity()
            .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
            .await
            .expect("GetPluginCapabilities")
            .into_inner()
            .capabilities;
        caps.into_iter()
            .filter_map(|c| match c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(
                    PluginService::try_from(s.r#type)
                        .unwrap_or_else(|_| panic!("unknown plugin service {}", s.r#type)),
                ),
                _ => None,
            })
            .collect()
    }

    pub async fn node_id(&self) -> String {
        let id = self
            .node()
            .node_get_info(NodeGetInfoRequest {})
            .await
            .expect("NodeGetInfo")
            .into_inner()
            .node_id;
        assert!(!id.is_empty(), "NodeGetInfo returned an empty node_id");
        id
    }

    /// CreateVolume that must succeed; returns the volume.
    pub async fn create(&self, req: CreateVolumeRequest) -> Volume {
        let name = req.name.clone();
        let resp: CreateVolumeResponse = self
            .controller()
            .create_volume(req)
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "CreateVolume {name}: {}\nplugin log:\n{}",
                    show(&s),
                    self.log_tail()
                )
            })
            .into_inner();
        let vol = resp.volume.expect("CreateVolume response without a volume");
        assert!(
            !vol.volume_id.is_empty(),
            "CreateVolume returned an empty volume_id"
        );
        vol
    }

    /// ControllerPublishVolume to `node_id` that must succeed; returns the publish context.
    pub async fn controller_publish(&self, vol: &Volume, node_id: &str) -> HashMap<String, String> {
        self.controller()
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: vol.volume_id.clone(),
                node_id: node_id.to_string(),
                volume_capability: Some(single_writer()),
                readonly: false,
                volume_context: vol.volume_context.clone(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "ControllerPublishVolume {}: {}\nplugin log:\n{}",
                    vol.volume_id,
                    show(&s),
                    self.log_tail()
                )
            })
            .into_inner()
            .publish_context
    }

    /// NodePublishVolume as csi-sanity sends it (no pod information) that must succeed.
    pub async fn node_publish(
        &self,
        vol: &Volume,
        publish_context: &HashMap<String, String>,
        target: &Path,
    ) {
        self.node()
            .node_publish_volume(publish_request(vol, publish_context, target))
            .await
            .unwrap_or_else(|s| {
                panic!(
                    "NodePublishVolume {} at {}: {}\nplugin log:\n{}",
                    vol.volume_id,
                    target.display(),
                    show(&s),
                    self.log_tail()
                )
            });
    }
}

/// A name no other test (or earlier run) uses.
pub fn unique(label: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{label}-{}-{n}", std::process::id())
}

/// The capability csi-sanity uses everywhere: a mounted filesystem, single-node writer.
pub fn single_writer() -> VolumeCapability {
    capability(volume_capability::access_mode::Mode::SingleNodeWriter)
}

pub fn capability(mode: volume_capability::access_mode::Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(volume_capability::AccessMode { mode: mode as i32 }),
        access_type: Some(volume_capability::AccessType::Mount(
            volume_capability::MountVolume::default(),
        )),
    }
}

/// A CreateVolume request with one single-writer capability and no parameters.
pub fn create_request(name: &str, required_bytes: Option<i64>) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_string(),
        volume_capabilities: vec![single_writer()],
        capacity_range: required_bytes.map(|b| CapacityRange {
            required_bytes: b,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

pub fn publish_request(
    vol: &Volume,
    publish_context: &HashMap<String, String>,
    target: &Path,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: vol.volume_id.clone(),
        target_path: target.to_string_lossy().into_owned(),
        volume_capability: Some(single_writer()),
        readonly: false,
        // No pod UID, as csi-sanity sends none: --standalone claims an exclusive volume
        // for the node's workload when pod info is missing.
        volume_context: vol.volume_context.clone(),
        publish_context: publish_context.clone(),
        ..Default::default()
    }
}

/// Asserts that an RPC failed with exactly `want`.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(
    what: &str,
    got: Result<tonic::Response<T>, Status>,
    want: Code,
) {
    match got {
        Ok(resp) => panic!(
            "{what}: expected {want:?}, but the call succeeded: {:?}",
            resp.into_inner()
        ),
        Err(s) => assert_eq!(
            s.code(),
            want,
            "{what}: expected {want:?}, got {}",
            show(&s)
        ),
    }
}

/// Asserts that an RPC succeeded and returns the message.
#[track_caller]
pub fn assert_ok<T>(what: &str, got: Result<tonic::Response<T>, Status>) -> T {
    match got {
        Ok(resp) => resp.into_inner(),
        Err(s) => panic!("{what}: expected OK, got {}", show(&s)),
    }
}

pub fn show(s: &Status) -> String {
    format!("{:?} \"{}\"", s.code(), s.message())
}

/// How many mounts sit exactly at `path` (stacked mounts count more than once).
pub fn mount_count(path: &Path) -> usize {
    mount_points()
        .iter()
        .filter(|p| p.as_path() == path)
        .count()
}

/// Mount points of this process's mount namespace, from /proc/self/mountinfo (field 5,
/// with the kernel's octal escapes for space, tab, newline and backslash undone).
fn mount_points() -> Vec<PathBuf> {
    let table = std::fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    table
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match (bytes[i], octal) {
            (b'\\', Some(d)) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A volume ID in valid form that names nothing (the shape csi-sanity generates).
pub fn absent_volume_id() -> String {
    unique("fake-vol-id")
}
