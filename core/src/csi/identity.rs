//! The CSI Identity service, served by both the node plugin and the controller.
//!
//! It owns three answers: the driver's name and version, the plugin capabilities it
//! advertises, and readiness. Readiness is a [`Readiness`] flag that the binary
//! flips once it is actually able to serve (session lease held, sockets bound), so
//! the CO's `Probe` never reports ready before holdfast can keep its promises.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::v1::identity_server::{Identity, IdentityServer};
use super::v1::plugin_capability::{self, service, volume_expansion};
use super::v1::{
    GetPluginCapabilitiesRequest, GetPluginCapabilitiesResponse, GetPluginInfoRequest,
    GetPluginInfoResponse, PluginCapability, ProbeRequest, ProbeResponse,
};

/// The CSI driver name: the `CSIDriver` object, StorageClass `provisioner` and
/// kubelet plugin registration must all use exactly this string.
pub const DRIVER_NAME: &str = "holdfast.csi.dev";

/// The version reported as `vendor_version`.
pub const DRIVER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// A shared "ready to serve" flag; clones see the same value.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// A flag that starts not ready.
    pub fn new() -> Self {
        Self::default()
    }

    /// Marks the plugin ready (or not) for the CO's next `Probe`.
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }

    /// Whether the plugin is currently ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// The Identity service.
#[derive(Clone, Debug)]
pub struct IdentityService {
    advertise_controller: bool,
    readiness: Readiness,
}

impl IdentityService {
    /// `advertise_controller` adds the CONTROLLER_SERVICE capability. The spec asks
    /// every instance of one plugin version to report the same capabilities, so
    /// the node plugin and the controller of one holdfast install should agree.
    pub fn new(advertise_controller: bool, readiness: Readiness) -> Self {
        Self {
            advertise_controller,
            readiness,
        }
    }

    /// The tonic server wrapping this service, ready for `Router::add_service`.
    pub fn into_server(self) -> IdentityServer<Self> {
        IdentityServer::new(self)
    }

    fn capabilities(&self) -> Vec<PluginCapability> {
        let mut caps = Vec::new();
        if self.advertise_controller {
            caps.push(PluginCapability {
                r#type: Some(plugin_capability::Type::Service(
                    plugin_capability::Service {
                        r#type: service::Type::ControllerService as i32,
                    },
                )),
            });
        }
        // Expansion only records the new size against the shared backing
        // directory; nothing on the node has to be offline for that.
        caps.push(PluginCapability {
            r#type: Some(plugin_capability::Type::VolumeExpansion(
                plugin_capability::VolumeExpansion {
                    r#type: volume_expansion::Type::Online as i32,
                },
            )),
        });
        caps
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn get_plugin_info(
        &self,
        _request: Request<GetPluginInfoRequest>,
    ) -> Result<Response<GetPluginInfoResponse>, Status> {
        Ok(Response::new(GetPluginInfoResponse {
            name: DRIVER_NAME.to_owned(),
            vendor_version: DRIVER_VERSION.to_owned(),
            manifest: Default::default(),
        }))
    }

    async fn get_plugin_capabilities(
        &self,
        _request: Request<GetPluginCapabilitiesRequest>,
    ) -> Result<Response<GetPluginCapabilitiesResponse>, Status> {
        Ok(Response::new(GetPluginCapabilitiesResponse {
            capabilities: self.capabilities(),
        }))
    }

    async fn probe(
        &self,
        _request: Request<ProbeRequest>,
    ) -> Result<Response<ProbeResponse>, Status> {
        // Always set explicitly: an absent `ready` means "ready" to the CO.
        Ok(Response::new(ProbeResponse {
            ready: Some(self.readiness.is_ready()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service_types(caps: &[PluginCapability]) -> Vec<service::Type> {
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::Service(s)) => Some(s.r#type()),
                _ => None,
            })
            .collect()
    }

    fn expansion_types(caps: &[PluginCapability]) -> Vec<volume_expansion::Type> {
        caps.iter()
            .filter_map(|c| match &c.r#type {
                Some(plugin_capability::Type::VolumeExpansion(e)) => Some(e.r#type()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn plugin_info_names_the_driver() {
        let svc = IdentityService::new(false, Readiness::new());
        let info = svc
            .get_plugin_info(Request::new(GetPluginInfoRequest {}))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(info.name, "holdfast.csi.dev");
        assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));
        // The spec limits the name to 63 chars of domain-name form.
        assert!(info.name.len() <= 63);
    }

    #[tokio::test]
    async fn capabilities_follow_constructor() {
        let with = IdentityService::new(true, Readiness::new());
        let caps = with
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        assert_eq!(service_types(&caps), vec![service::Type::ControllerService]);
        assert_eq!(expansion_types(&caps), vec![volume_expansion::Type::Online]);

        let without = IdentityService::new(false, Readiness::new());
        let caps = without
            .get_plugin_capabilities(Request::new(GetPluginCapabilitiesRequest {}))
            .await
            .unwrap()
            .into_inner()
            .capabilities;
        assert!(service_types(&caps).is_empty());
        assert_eq!(expansion_types(&caps), vec![volume_expansion::Type::Online]);
    }

    #[tokio::test]
    async fn probe_tracks_readiness_flag() {
        let ready = Readiness::new();
        let svc = IdentityService::new(false, ready.clone());
        let probe = || async {
            svc.probe(Request::new(ProbeRequest {}))
                .await
                .unwrap()
                .into_inner()
                .ready
        };
        assert_eq!(probe().await, Some(false));
        ready.set(true);
        assert_eq!(probe().await, Some(true));
        ready.set(false);
        assert_eq!(probe().await, Some(false));
    }
}
