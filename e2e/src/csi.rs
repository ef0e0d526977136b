//! The CO's side of the conversation, as kubelet and the external-attacher would hold
//! it: CreateVolume and ControllerPublishVolume to the controller, NodePublishVolume /
//! NodeUnpublishVolume to a node plugin, each over a fresh connection to the real unix
//! socket (a restarted plugin is reached without reconnect logic).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use holdfast_core::csi::serve::connect_unix;
use holdfast_core::csi::v1::controller_client::ControllerClient;
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::volume_capability::{AccessMode, AccessType, MountVolume};
use holdfast_core::csi::v1::{
    ControllerPublishVolumeRequest, ControllerUnpublishVolumeRequest, CreateVolumeRequest,
    NodePublishVolumeRequest, NodeUnpublishVolumeRequest, VolumeCapability,
};
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::cluster::Cluster;

/// The pod UID key kubelet puts in the volume context (podInfoOnMount).
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";

/// A created volume: its id and the volume context CreateVolume returned.
#[derive(Clone, Debug)]
pub struct Volume {
    pub id: String,
    pub context: BTreeMap<String, String>,
}

pub fn capability() -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume::default())),
    }
}

async fn channel(socket: &Path) -> Result<Channel, Status> {
    connect_unix(socket)
        .await
        .map_err(|e| Status::unavailable(e.to_string()))
}

impl Cluster {
    /// CreateVolume with StorageClass `params` (e.g. `("onConflict", "wait")`).
    pub async fn create_volume(&self, name: &str, params: &[(&str, &str)]) -> Volume {
        let mut client = ControllerClient::new(
            channel(&self.controller.socket)
                .await
                .expect("controller socket"),
        );
        let volume = client
            .create_volume(CreateVolumeRequest {
                name: name.into(),
                volume_capabilities: vec![capability()],
                parameters: params
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("CreateVolume {name}: {e}"))
            .into_inner()
            .volume
            .expect("CreateVolume returned no volume");
        Volume {
            id: volume.volume_id,
            context: volume.volume_context.into_iter().collect(),
        }
    }

    /// ControllerPublishVolume of `volume` to node `k` (the attach step).
    pub async fn attach(&self, volume: &Volume, k: usize) -> Result<(), Status> {
        let mut client = ControllerClient::new(channel(&self.controller.socket).await?);
        client
            .controller_publish_volume(ControllerPublishVolumeRequest {
                volume_id: volume.id.clone(),
                node_id: self.node(k).id.clone(),
                volume_capability: Some(capability()),
                volume_context: volume.context.clone().into_iter().collect(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// ControllerUnpublishVolume from node `k` (also what a force-detach does).
    pub async fn detach(&self, volume: &Volume, k: usize) -> Result<(), Status> {
        let mut client = ControllerClient::new(channel(&self.controller.socket).await?);
        client
            .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
                volume_id: volume.id.clone(),
                node_id: self.node(k).id.clone(),
                ..Default::default()
            })
            .await
            .map(|_| ())
    }

    /// NodePublishVolume of `volume` for `pod` on node `k` at a fresh target; returns
    /// the target.
    pub async fn publish(&self, k: usize, volume: &Volume, pod: &str) -> Result<PathBuf, Status> {
        let target = self.target(k, pod);
        self.publish_at(k, volume, pod, &target, None).await?;
        Ok(target)
    }

    /// NodePublishVolume at `target`, with a gRPC deadline if `timeout` is given (the
    /// call is also abandoned client-side a little after it).
    pub async fn publish_at(
        &self,
        k: usize,
        volume: &Volume,
        pod: &str,
        target: &Path,
        timeout: Option<Duration>,
    ) -> Result<(), Status> {
        let mut context = volume.context.clone();
        context.insert(POD_UID_KEY.into(), pod.into());
        context.insert("csi.storage.k8s.io/pod.name".into(), pod.into());
        context.insert("csi.storage.k8s.io/pod.namespace".into(), "e2e".into());
        context.insert("csi.storage.k8s.io/ephemeral".into(), "false".into());
        let mut request = Request::new(NodePublishVolumeRequest {
            volume_id: volume.id.clone(),
            target_path: target.display().to_string(),
            volume_capability: Some(capability()),
            volume_context: context.into_iter().collect(),
            ..Default::default()
        });
        if let Some(t) = timeout {
            request.set_timeout(t);
        }
        let mut client = NodeClient::new(channel(&self.node(k).plugin.socket).await?);
        let call = client.node_publish_volume(request);
        let result = match timeout {
            Some(t) => tokio::time::timeout(t + Duration::from_secs(2), call)
                .await
                .unwrap_or_else(|_| Err(Status::deadline_exceeded("client-side timeout"))),
            None => call.await,
        };
        result.map(|_| ())
    }

    /// NodeUnpublishVolume of `volume` at `target` on node `k`.
    pub async fn unpublish(&self, k: usize, volume: &Volume, target: &Path) -> Result<(), Status> {
        let mut client = NodeClient::new(channel(&self.node(k).plugin.socket).await?);
        client
            .node_unpublish_volume(NodeUnpublishVolumeRequest {
                volume_id: volume.id.clone(),
                target_path: target.display().to_string(),
            })
            .await
            .map(|_| ())
    }
}

impl Cluster {
    /// Retries NodePublishVolume of `volume` for `pod` on node `k` every 50 ms (as
    /// kubelet does, faster) until it succeeds or `within` passes; returns the target
    /// and the time from the call to success, or the last refusal.
    pub async fn publish_until_ok(
        &self,
        k: usize,
        volume: &Volume,
        pod: &str,
        within: Duration,
    ) -> Result<(PathBuf, Duration), Status> {
        let target = self.target(k, pod);
        let start = std::time::Instant::now();
        loop {
            match self.publish_at(k, volume, pod, &target, None).await {
                Ok(()) => return Ok((target, start.elapsed())),
                Err(status) if start.elapsed() >= within => return Err(status),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
