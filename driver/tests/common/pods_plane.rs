//! A real control plane set up as a node plugin's pod world: the chart's RBAC, the
//! release namespace `holdfast`, and a namespace for the pods the tests create (with the
//! default ServiceAccount the controller-manager, not running here, would make).

use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use super::PluginOptions;

/// The chart's RBAC, as `manifests/deploy` renders it.
pub const CHART_RBAC: &str = include_str!("../../../manifests/deploy/20-rbac.yaml");

/// Starts the plane (with the audit log) or skips the test `test` (a failure under
/// `HOLDFAST_REQUIRE_KUBE=1`); `apps` is the pods' namespace.
pub async fn start(test: &str, apps: &str) -> Option<ControlPlane> {
    let options = ControlPlaneOptions {
        audit: true,
        ..ControlPlaneOptions::default()
    };
    let plane = ControlPlane::start_or_skip(test, options).await?;
    plane.ensure_namespace("holdfast").await;
    plane.ensure_namespace(apps).await;
    plane.apply_yaml(CHART_RBAC).await;
    // The ServiceAccount admission wants the namespace's default account.
    let accounts: Api<ServiceAccount> = Api::namespaced(plane.admin().await, apps);
    let account: ServiceAccount =
        serde_json::from_value(serde_json::json!({"metadata": {"name": "default"}})).unwrap();
    accounts
        .create(&PostParams::default(), &account)
        .await
        .unwrap();
    Some(plane)
}

impl PluginOptions {
    /// A node-only plugin named `node` on the kubernetes lease store (namespace
    /// `holdfast`, as the chart), plus `extra` flags.
    pub fn node_on_kubernetes(node: &str, extra: &[&str]) -> Self {
        let mut extra_args: Vec<String> = [
            "--lease-store",
            "kubernetes",
            "--lease-namespace",
            "holdfast",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        extra_args.extend(extra.iter().map(|s| s.to_string()));
        PluginOptions {
            standalone: false,
            node_id: node.to_string(),
            root: None,
            extra_args,
        }
    }
}
