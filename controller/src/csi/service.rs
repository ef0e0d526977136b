//! The CSI Controller service over the directory [`Backend`].
//!
//! Each RPC validates its request (via [`crate::csi::convert`]), runs the backend operation
//! on a blocking thread (it does fsync'd file I/O), and turns errors into statuses
//! through [`ControllerError`] only. Concurrent calls on one volume — two identical
//! CreateVolumes racing, a publish during a delete — are serialised by the backend's
//! per-volume lock, so each sees the other's complete result.
//!
//! ControllerPublishVolume of an exclusive volume first asks the [`AttachGate`] (when
//! the service has one): refused while a pod of another node holds the volume's claim
//! and may still write. ControllerUnpublishVolume never touches a claim: a detach — even
//! the orchestrator's force-detach of a node it believes dead — proves nothing about
//! whether that node still writes, so freeing a claim here could let a second writer in.
//! Claims end only by their holder's release, a fence, or the holder's lease expiring.

use std::sync::Arc;

use holdfast_core::backend::{
    Backend, Publication, VolumeId, VolumeName, VolumeParams, VolumeSpec,
};
use holdfast_core::csi::v1::controller_server::{Controller, ControllerServer};
use holdfast_core::csi::v1::controller_service_capability::{self, rpc};
use holdfast_core::csi::v1::*;
use tonic::{Request, Response, Status};

use crate::csi::convert;
use crate::csi::gate::AttachGate;
use crate::ControllerError;

/// The Controller service. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ControllerService {
    backend: Arc<Backend>,
    /// `None` only where one node is all there is (the node plugin's standalone mode):
    /// every attach is then to the node that also holds any claim.
    gate: Option<Arc<AttachGate>>,
}

/// The tonic server for the Controller service over `backend`, without an attach gate:
/// what the node plugin's standalone mode (one node, one process) serves.
pub fn controller_service(backend: Arc<Backend>) -> ControllerServer<ControllerService> {
    ControllerServer::new(ControllerService::new(backend))
}

/// What this service implements, and nothing more.
const CAPABILITIES: [rpc::Type; 8] = [
    rpc::Type::CreateDeleteVolume,
    rpc::Type::PublishUnpublishVolume,
    rpc::Type::ListVolumes,
    rpc::Type::ListVolumesPublishedNodes,
    rpc::Type::GetCapacity,
    rpc::Type::ExpandVolume,
    rpc::Type::GetVolume,
    rpc::Type::SingleNodeMultiWriter,
];

type Reply<T> = Result<Response<T>, Status>;

impl ControllerService {
    pub fn new(backend: Arc<Backend>) -> Self {
        ControllerService {
            backend,
            gate: None,
        }
    }

    /// Gates ControllerPublishVolume of exclusive volumes by their lease claims.
    pub fn with_attach_gate(mut self, gate: Arc<AttachGate>) -> Self {
        self.gate = Some(gate);
        self
    }

    pub fn into_server(self) -> ControllerServer<Self> {
        ControllerServer::new(self)
    }

    /// Runs a backend operation off the async runtime.
    async fn blocking<T, F>(&self, op: F) -> Result<T, ControllerError>
    where
        T: Send + 'static,
        F: FnOnce(&Backend) -> Result<T, holdfast_core::backend::BackendError> + Send + 'static,
    {
        let backend = self.backend.clone();
        tokio::task::spawn_blocking(move || op(&backend))
            .await
            .map_err(|e| ControllerError::Internal(format!("backend task failed: {e}")))?
            .map_err(ControllerError::from)
    }

    async fn create(
        &self,
        req: CreateVolumeRequest,
    ) -> Result<CreateVolumeResponse, ControllerError> {
        let name = VolumeName::parse(&req.name)?;
        let capabilities = convert::capabilities("volume_capabilities", &req.volume_capabilities)?;
        let capacity = convert::capacity_range(req.capacity_range.as_ref())?;
        if req.volume_content_source.is_some() {
            return Err(ControllerError::invalid(
                "volume_content_source",
                "is not supported: holdfast creates only empty volumes (no snapshots or clones)",
            ));
        }
        if !req.mutable_parameters.is_empty() {
            return Err(ControllerError::invalid(
                "mutable_parameters",
                "are not supported (no MODIFY_VOLUME capability)",
            ));
        }
        let parsed = VolumeParams::from_parameters(&req.parameters)?;
        let spec = VolumeSpec {
            name,
            capacity,
            capabilities,
            params: parsed.params,
            co_metadata: parsed.co_metadata,
        };
        let created = self.blocking(move |b| b.create_volume(&spec)).await?;
        if created.newly_created {
            tracing::info!(volume_id = %created.meta.id, name = %created.meta.name, "volume created");
        }
        Ok(CreateVolumeResponse {
            volume: Some(convert::volume(&created.meta)),
        })
    }

    async fn delete(
        &self,
        req: DeleteVolumeRequest,
    ) -> Result<DeleteVolumeResponse, ControllerError> {
        // An id holdfast could not have generated names no volume: already deleted.
        let Ok(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(DeleteVolumeResponse {});
        };
        // The claim first: if deleting the directory fails, the retry finds no claim and
        // deletes the directory; the other order could leave a claim behind for good.
        if let Some(gate) = &self.gate {
            gate.forget(id.as_str()).await?;
        }
        let existed = self.blocking(move |b| b.delete_volume(&id)).await?;
        if existed {
            tracing::info!(volume_id = %req.volume_id, "volume deleted");
        }
        Ok(DeleteVolumeResponse {})
    }

    async fn publish(
        &self,
        req: ControllerPublishVolumeRequest,
    ) -> Result<ControllerPublishVolumeResponse, ControllerError> {
        let id = convert::volume_id(&req.volume_id)?;
        if req.node_id.is_empty() {
            return Err(ControllerError::invalid("node_id", "is required"));
        }
        let cap = req
            .volume_capability
            .as_ref()
            .ok_or_else(|| ControllerError::invalid("volume_capability", "is required"))?;
        let cap = convert::capability("volume_capability", cap)?;
        let id = id?;
        if let Some(gate) = &self.gate {
            // The volume's own parameters, as the node plugin reads them: a volume
            // created with `exclusive: "false"` takes no claims and is not gated.
            let meta = self.get(id.clone()).await?;
            if meta.params.exclusive {
                let grant = gate.check(id.as_str(), &req.node_id).await?;
                tracing::debug!(volume_id = %id, node = %req.node_id, ?grant, "attach gate granted");
            }
        }
        let publication = Publication {
            access_mode: cap.access_mode,
            readonly: req.readonly,
        };
        let node = req.node_id.clone();
        self.blocking(move |b| b.publish(&id, &node, publication))
            .await?;
        Ok(ControllerPublishVolumeResponse::default())
    }

    async fn unpublish(
        &self,
        req: ControllerUnpublishVolumeRequest,
    ) -> Result<ControllerUnpublishVolumeResponse, ControllerError> {
        let Ok(id) = convert::volume_id(&req.volume_id)? else {
            return Ok(ControllerUnpublishVolumeResponse {});
        };
        let node = (!req.node_id.is_empty()).then_some(req.node_id);
        self.blocking(move |b| b.unpublish(&id, node.as_deref()))
            .await?;
        Ok(ControllerUnpublishVolumeResponse {})
    }

    async fn validate(
        &self,
        req: ValidateVolumeCapabilitiesRequest,
    ) -> Result<ValidateVolumeCapabilitiesResponse, ControllerError> {
        let id = convert::volume_id(&req.volume_id)?;
        if req.volume_capabilities.is_empty() {
            return Err(ControllerError::invalid(
                "volume_capabilities",
                "is required",
            ));
        }
        let meta = self.get(id?).await?;
        let unconfirmed = |message: String| ValidateVolumeCapabilitiesResponse {
            confirmed: None,
            message,
        };
        if let Err(e) = convert::capabilities("volume_capabilities", &req.volume_capabilities) {
            return Ok(unconfirmed(e.to_string()));
        }
        if !req.parameters.is_empty() {
            match VolumeParams::from_parameters(&req.parameters) {
                Ok(parsed) if parsed.params == meta.params => {}
                Ok(_) => return Ok(unconfirmed("parameters differ from the volume's".into())),
                Err(e) => return Ok(unconfirmed(e.to_string())),
            }
        }
        let context = convert::volume(&meta).volume_context;
        if !req.volume_context.is_empty() && req.volume_context != context {
            return Ok(unconfirmed(
                "volume_context differs from the volume's".into(),
            ));
        }
        Ok(ValidateVolumeCapabilitiesResponse {
            confirmed: Some(validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: Default::default(),
            }),
            message: String::new(),
        })
    }

    async fn get(
        &self,
        id: VolumeId,
    ) -> Result<holdfast_core::backend::VolumeMeta, ControllerError> {
        let shown = id.to_string();
        self.blocking(move |b| b.volume(&id))
            .await?
            .ok_or_else(|| holdfast_core::backend::BackendError::NotFound { id: shown }.into())
    }

    async fn list(&self, req: ListVolumesRequest) -> Result<ListVolumesResponse, ControllerError> {
        let max_entries = usize::try_from(req.max_entries)
            .map_err(|_| ControllerError::invalid("max_entries", "must not be negative"))?;
        // The token is the id of the next volume to return: still meaningful if that
        // volume is deleted meanwhile, since listing is in id order.
        let start = match req.starting_token.as_str() {
            "" => None,
            token => Some(
                VolumeId::parse(token).map_err(|_| ControllerError::InvalidToken {
                    token: token.into(),
                })?,
            ),
        };
        let volumes = self.blocking(|b| b.list_volumes()).await?;
        let mut remaining = volumes
            .into_iter()
            .filter(|m| start.as_ref().is_none_or(|s| &m.id >= s))
            .peekable();
        let mut entries = Vec::new();
        while max_entries == 0 || entries.len() < max_entries {
            let Some(meta) = remaining.next() else { break };
            entries.push(list_volumes_response::Entry {
                volume: Some(convert::volume(&meta)),
                status: Some(list_volumes_response::VolumeStatus {
                    published_node_ids: meta.published_nodes(),
                    volume_condition: None,
                }),
            });
        }
        let next_token = remaining
            .peek()
            .map(|m| m.id.to_string())
            .unwrap_or_default();
        Ok(ListVolumesResponse {
            entries,
            next_token,
        })
    }

    async fn capacity(
        &self,
        req: GetCapacityRequest,
    ) -> Result<GetCapacityResponse, ControllerError> {
        VolumeParams::from_parameters(&req.parameters)?;
        let space = self.blocking(|b| b.space()).await?;
        // Volumes with capabilities holdfast cannot provide have no room at all.
        let supported = req
            .volume_capabilities
            .iter()
            .all(|c| convert::capability("volume_capabilities", c).is_ok());
        Ok(GetCapacityResponse {
            available_capacity: if supported {
                convert::bytes_i64(space.available_bytes)
            } else {
                0
            },
            maximum_volume_size: Some(convert::bytes_i64(space.total_bytes)),
            minimum_volume_size: None,
        })
    }

    async fn expand(
        &self,
        req: ControllerExpandVolumeRequest,
    ) -> Result<ControllerExpandVolumeResponse, ControllerError> {
        let id = convert::volume_id(&req.volume_id)?;
        let range = req
            .capacity_range
            .as_ref()
            .ok_or_else(|| ControllerError::invalid("capacity_range", "is required"))?;
        let range = convert::capacity_range(Some(range))?;
        if range.required_bytes() == 0 && range.limit_bytes() == 0 {
            return Err(ControllerError::invalid(
                "capacity_range",
                "must set required_bytes or limit_bytes",
            ));
        }
        if let Some(cap) = &req.volume_capability {
            convert::capability("volume_capability", cap)?;
        }
        let id = id?;
        let capacity = self.blocking(move |b| b.expand_volume(&id, range)).await?;
        Ok(ControllerExpandVolumeResponse {
            capacity_bytes: convert::bytes_i64(capacity),
            // Nothing to grow on the node: the directory has no size of its own.
            node_expansion_required: false,
        })
    }

    async fn get_volume(
        &self,
        req: ControllerGetVolumeRequest,
    ) -> Result<ControllerGetVolumeResponse, ControllerError> {
        let meta = self.get(convert::volume_id(&req.volume_id)??).await?;
        Ok(ControllerGetVolumeResponse {
            volume: Some(convert::volume(&meta)),
            status: Some(controller_get_volume_response::VolumeStatus {
                published_node_ids: meta.published_nodes(),
                volume_condition: None,
            }),
        })
    }
}

fn reply<T>(result: Result<T, ControllerError>) -> Reply<T> {
    result.map(Response::new).map_err(Status::from)
}

fn unimplemented<T>(rpc: &str) -> Reply<T> {
    Err(Status::unimplemented(format!(
        "{rpc} is not supported by holdfast"
    )))
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(&self, r: Request<CreateVolumeRequest>) -> Reply<CreateVolumeResponse> {
        reply(self.create(r.into_inner()).await)
    }

    async fn delete_volume(&self, r: Request<DeleteVolumeRequest>) -> Reply<DeleteVolumeResponse> {
        reply(self.delete(r.into_inner()).await)
    }

    async fn controller_publish_volume(
        &self,
        r: Request<ControllerPublishVolumeRequest>,
    ) -> Reply<ControllerPublishVolumeResponse> {
        reply(self.publish(r.into_inner()).await)
    }

    async fn controller_unpublish_volume(
        &self,
        r: Request<ControllerUnpublishVolumeRequest>,
    ) -> Reply<ControllerUnpublishVolumeResponse> {
        reply(self.unpublish(r.into_inner()).await)
    }

    async fn validate_volume_capabilities(
        &self,
        r: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Reply<ValidateVolumeCapabilitiesResponse> {
        reply(self.validate(r.into_inner()).await)
    }

    async fn list_volumes(&self, r: Request<ListVolumesRequest>) -> Reply<ListVolumesResponse> {
        reply(self.list(r.into_inner()).await)
    }

    async fn get_capacity(&self, r: Request<GetCapacityRequest>) -> Reply<GetCapacityResponse> {
        reply(self.capacity(r.into_inner()).await)
    }

    async fn controller_get_capabilities(
        &self,
        _r: Request<ControllerGetCapabilitiesRequest>,
    ) -> Reply<ControllerGetCapabilitiesResponse> {
        let capabilities = CAPABILITIES
            .iter()
            .map(|t| ControllerServiceCapability {
                r#type: Some(controller_service_capability::Type::Rpc(
                    controller_service_capability::Rpc { r#type: *t as i32 },
                )),
            })
            .collect();
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities,
        }))
    }

    async fn create_snapshot(
        &self,
        _r: Request<CreateSnapshotRequest>,
    ) -> Reply<CreateSnapshotResponse> {
        unimplemented("CreateSnapshot")
    }

    async fn delete_snapshot(
        &self,
        _r: Request<DeleteSnapshotRequest>,
    ) -> Reply<DeleteSnapshotResponse> {
        unimplemented("DeleteSnapshot")
    }

    async fn list_snapshots(
        &self,
        _r: Request<ListSnapshotsRequest>,
    ) -> Reply<ListSnapshotsResponse> {
        unimplemented("ListSnapshots")
    }

    async fn get_snapshot(&self, _r: Request<GetSnapshotRequest>) -> Reply<GetSnapshotResponse> {
        unimplemented("GetSnapshot")
    }

    async fn controller_expand_volume(
        &self,
        r: Request<ControllerExpandVolumeRequest>,
    ) -> Reply<ControllerExpandVolumeResponse> {
        reply(self.expand(r.into_inner()).await)
    }

    async fn controller_get_volume(
        &self,
        r: Request<ControllerGetVolumeRequest>,
    ) -> Reply<ControllerGetVolumeResponse> {
        reply(self.get_volume(r.into_inner()).await)
    }

    async fn controller_modify_volume(
        &self,
        _r: Request<ControllerModifyVolumeRequest>,
    ) -> Reply<ControllerModifyVolumeResponse> {
        unimplemented("ControllerModifyVolume")
    }
}
