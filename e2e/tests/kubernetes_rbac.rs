//! Least privilege, proven on a real API server: the node plugins and the controller run
//! with the kubernetes lease store as the chart's own ServiceAccounts, under the chart's
//! RBAC (`manifests/deploy/20-rbac.yaml`, the chart rendered with its defaults), through
//! every path that touches the store — claim, renewals, release, hand-over, takeover
//! after a crash (which deletes the dead session), fence, claims listing, unfence. The API server's audit log then shows:
//! - no call of either identity was refused (403): everything the code does is granted;
//! - every verb and resource the chart grants holdfast's own code (the node plugin's
//!   Role; the controller's `-lease-store` Role, its `-leader` Role for leader election
//!   on its Lease, and its `-nodes` ClusterRole for the Node watch of the out-of-service
//!   taint) was used: a grant no code path needs fails the test, so the chart cannot
//!   drift wider than the code. The serving controller elects itself leader (get,
//!   create, then patch renewals of its Lease) and lists and watches Nodes all along.
//!
//! The node plugin's `holdfast-node-pods` ClusterRole (pods get/delete, events create: the
//! Events and restarts after a FUSE data path died with a previous plugin) is audited the
//! same way by `driver/tests/data_path_loss.rs`, which plays the restart this suite does not.
//!
//! The sidecars' rules (provisioner, attacher, resizer, leader election) are their
//! upstream projects' and are not checked here.

use std::collections::BTreeSet;

use holdfast_core::testkit::kube::Identity;
use holdfast_e2e::cluster::CHART_RBAC;
use holdfast_e2e::Cluster;

/// (API group, resource, verb)
type Grant = (String, String, String);

/// The rules of the Role or ClusterRole `name` in the chart's RBAC.
fn granted(name: &str) -> BTreeSet<Grant> {
    let mut grants = BTreeSet::new();
    let mut found = false;
    for doc in CHART_RBAC.split("\n---") {
        let value: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if !(kind == "Role" || kind == "ClusterRole") || value["metadata"]["name"] != name {
            continue;
        }
        found = true;
        for rule in value["rules"].as_array().unwrap() {
            let list = |key: &str| -> Vec<String> {
                rule[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap().to_string())
                    .collect()
            };
            for group in list("apiGroups") {
                for resource in list("resources") {
                    for verb in list("verbs") {
                        grants.insert((group.clone(), resource.clone(), verb));
                    }
                }
            }
        }
    }
    assert!(found, "the chart's RBAC has no Role or ClusterRole {name}");
    grants
}

/// Every role bound to `service_account` (namespace `holdfast`) in the chart's RBAC.
fn roles_bound_to(service_account: &str) -> BTreeSet<String> {
    let mut roles = BTreeSet::new();
    for doc in CHART_RBAC.split("\n---") {
        let value: serde_json::Value = serde_yaml_ng::from_str(doc).unwrap();
        let kind = value["kind"].as_str().unwrap_or_default();
        if !kind.ends_with("Binding") {
            continue;
        }
        let bound = value["subjects"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["kind"] == "ServiceAccount" && s["name"] == service_account);
        if bound {
            roles.insert(value["roleRef"]["name"].as_str().unwrap().to_string());
        }
    }
    roles
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chart_rbac_grants_exactly_what_the_code_uses() {
    let test = "chart_rbac_grants_exactly_what_the_code_uses";
    // The audit log records a watch when it ends: the controller's Node watch requests
    // last 3 s here (290 s by default), so its watches show within the test.
    std::env::set_var("HOLDFAST_NODE_WATCH_TIMEOUT", "3s");
    let Some(mut cluster) = Cluster::start_kubernetes(test, 2).await else {
        return;
    };
    let timing = cluster.timing;
    let volume = cluster.create_volume("rbac", &[]).await;

    // Claim, release, hand over to the other node.
    let target = cluster
        .publish(1, &volume, "pod-a")
        .await
        .unwrap_or_else(|e| panic!("publish node1: {e}\n{}", cluster.logs()));
    cluster.unpublish(1, &volume, &target).await.unwrap();
    cluster
        .publish(2, &volume, "pod-b")
        .await
        .unwrap_or_else(|e| panic!("publish node2: {e}\n{}", cluster.logs()));
    // Renewals run for a while (D/3 each).
    tokio::time::sleep(timing.duration).await;

    // node2 crashes for good: node1 takes over once its session expired, deleting it.
    cluster.kill(2);
    cluster
        .publish_until_ok(1, &volume, "pod-c", timing.takeover_after() * 3)
        .await
        .unwrap_or_else(|e| panic!("takeover: {e}\n{}", cluster.logs()));

    // The admin's verbs, as the controller's identity.
    let fenced = cluster.fence(1).unwrap_or_else(|e| panic!("fence: {e}"));
    let claims = cluster
        .controller_cli("claims", &[])
        .unwrap_or_else(|e| panic!("claims: {e}"));
    let unfenced = cluster
        .controller_cli("unfence", &["--node=node1".to_string()])
        .unwrap_or_else(|e| panic!("unfence: {e}"));
    println!(
        "fence: {}\nclaims:\n{claims}unfence: {}",
        fenced.trim(),
        unfenced.trim()
    );
    // Let node1 see its fence lifted and renew again.
    tokio::time::sleep(timing.duration).await;

    let plane = cluster.control_plane().expect("a kubernetes cluster");
    let log = plane.audit_log();
    for (identity, own_roles) in [
        (Identity::node_plugin(), vec!["holdfast-node"]),
        (
            Identity::controller(),
            vec![
                "holdfast-controller-lease-store",
                "holdfast-controller-leader",
                "holdfast-controller-nodes",
            ],
        ),
    ] {
        let user = identity.user();
        let calls: Vec<_> = log.iter().filter(|e| e.user == user).collect();
        assert!(!calls.is_empty(), "{user} made no call at all");
        let refused: Vec<_> = calls.iter().filter(|e| e.code == 403).collect();
        assert!(
            refused.is_empty(),
            "{user}: calls refused by the chart's RBAC: {refused:#?}"
        );
        let used: BTreeSet<Grant> = calls
            .iter()
            .map(|e| {
                let resource = match e.subresource.as_str() {
                    "" => e.resource.clone(),
                    sub => format!("{}/{sub}", e.resource),
                };
                (e.group.clone(), resource, e.verb.clone())
            })
            .collect();
        let bound = roles_bound_to(identity.user().rsplit(':').next().unwrap());
        let mut grants = BTreeSet::new();
        for role in &own_roles {
            assert!(
                bound.contains(*role),
                "{role} is not bound to {user}: {bound:?}"
            );
            grants.extend(granted(role));
        }
        let unused: Vec<_> = grants.difference(&used).collect();
        println!(
            "{user}: {} calls, verbs used {:?}, roles bound {bound:?}",
            calls.len(),
            used.iter().map(|g| &g.2).collect::<BTreeSet<_>>()
        );
        assert!(
            unused.is_empty(),
            "{user}: the chart grants what no code path used (remove it, or add the path to \
             this test): {unused:?}"
        );
    }
    // The calls went on while the test ran, not only at start-up.
    assert!(log.len() > 20, "only {} audited calls", log.len());
}
