//! `KubernetesStore` on a real kube-apiserver (v1.20 from `../shared/k8s`, or any
//! `HOLDFAST_KUBE_BIN` / `KUBEBUILDER_ASSETS`): the conformance suite, and every way a
//! real server differs from a mocked one that the store depends on. Each test starts
//! its own control plane on free ports. Without binaries these tests skip, except under
//! `HOLDFAST_REQUIRE_KUBE=1`, where they fail.

use std::sync::Arc;
use std::time::{Duration, Instant};

use holdfast_core::lease::ClaimState;
use holdfast_core::store::codec::RecordKey;
use holdfast_core::store::kubernetes::{object_name, NODE_LABEL};
use holdfast_core::store::{KubernetesStore, LeaseStore, StoreError, Version};
use holdfast_core::testkit::conformance;
use holdfast_core::testkit::kube::{ControlPlane, ControlPlaneOptions, Identity};
use k8s_openapi::api::coordination::v1::Lease;

const NS: &str = "holdfast";

async fn plane(test: &str, options: ControlPlaneOptions) -> Option<ControlPlane> {
    let plane = ControlPlane::start_or_skip(test, options).await?;
    plane.ensure_namespace(NS).await;
    Some(plane)
}

async fn admin_store(plane: &ControlPlane) -> KubernetesStore {
    KubernetesStore::new(plane.admin().await, NS)
}

#[tokio::test]
async fn kubernetes_store_conforms_on_a_real_api_server() {
    let Some(plane) = plane("conformance", ControlPlaneOptions::default()).await else {
        return;
    };
    let store = admin_store(&plane)
        .await
        .with_timeout(Duration::from_secs(10));
    conformance::run(Arc::new(store)).await;
    println!(
        "conformance suite passed on kube-apiserver at {}",
        plane.url()
    );
}

/// The hole this store once had: Leases allow create-on-update, so a PUT naming the
/// version of a deleted Lease re-created it. Checked on the raw API too, so that the
/// test shows the server behaviour the store must work around.
#[tokio::test]
async fn a_write_naming_the_version_of_a_deleted_lease_does_not_recreate_it() {
    let Some(plane) = plane("no-resurrection", ControlPlaneOptions::default()).await else {
        return;
    };
    let store = admin_store(&plane).await;
    let s = conformance::session("node-a", "inst-1", 0);
    let v1 = store.put_session(&s, None).await.unwrap();
    store.delete_session(&s.key(), &v1).await.unwrap();
    let renewed = conformance::session("node-a", "inst-1", 1);
    match store.put_session(&renewed, Some(&v1)).await {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("a late renewal after a delete: expected Conflict, got {other:?}"),
    }
    assert!(store.get_session(&s.key()).await.unwrap().is_none());

    // The server behaviour itself: a PUT with that resourceVersion creates the object.
    let leases: kube::Api<Lease> = kube::Api::namespaced(plane.admin().await, NS);
    let name = object_name(&RecordKey::Session(s.key()));
    let mut lease = Lease::default();
    lease.metadata.name = Some(name.clone());
    lease.metadata.resource_version = Some(v1.0.clone());
    let put = leases.replace(&name, &Default::default(), &lease).await;
    assert!(
        put.is_ok(),
        "kube-apiserver no longer creates Leases on update ({put:?}): the store's patch is \
         still right, but this test's premise changed"
    );
}

/// Versions are opaque strings, each write's new, never reused across delete and
/// re-create; the codes the store maps are the server's real ones.
#[tokio::test]
async fn resource_versions_and_status_codes_of_a_real_server() {
    let Some(plane) = plane("versions-and-codes", ControlPlaneOptions::default()).await else {
        return;
    };
    let store = admin_store(&plane).await;
    let c = conformance::claim("pvc-codes", "node-a", ClaimState::Held, 1);
    let v1 = store.put_claim(&c, None).await.unwrap();
    let v2 = store.put_claim(&c, Some(&v1)).await.unwrap();
    assert_ne!(v1, v2);
    for v in [&v1, &v2] {
        assert!(
            !v.0.is_empty() && v.0.bytes().all(|b| b.is_ascii_digit()),
            "{v:?}"
        );
    }
    // 409 on a stale version; 409 on a create of a present object; 404 on a delete of
    // an absent one: all Conflict, none Backend.
    assert!(matches!(
        store.put_claim(&c, Some(&v1)).await,
        Err(StoreError::Conflict { .. })
    ));
    assert!(matches!(
        store.put_claim(&c, None).await,
        Err(StoreError::Conflict { .. })
    ));
    store.delete_claim("pvc-codes", &v2).await.unwrap();
    assert!(matches!(
        store.delete_claim("pvc-codes", &v2).await,
        Err(StoreError::Conflict { .. })
    ));
    // A version that is no resourceVersion at all (a store mix-up) is refused, not
    // written: the server answers 400 or 409, never 200.
    store.put_claim(&c, None).await.unwrap();
    let bad = store
        .put_claim(&c, Some(&Version("not-a-version".into())))
        .await;
    assert!(bad.is_err(), "{bad:?}");
}

/// Names, label values and annotation sizes the real server enforces.
#[tokio::test]
async fn long_names_odd_labels_and_oversized_records_on_a_real_server() {
    let Some(plane) = plane("limits", ControlPlaneOptions::default()).await else {
        return;
    };
    let store = admin_store(&plane).await;
    // A 300-character volume id and a 100-character node name: the object name is
    // hashed to fit 253, the node is no label value (63) and is left out of labels.
    let volume = "v".repeat(300);
    let node = "n".repeat(100);
    let c = conformance::claim(&volume, &node, ClaimState::Held, 1);
    let v = store.put_claim(&c, None).await.unwrap();
    assert_eq!(store.get_claim(&volume).await.unwrap().unwrap().value, c);
    let s = conformance::session(&node, "inst-1", 0);
    store.put_session(&s, None).await.unwrap();
    assert_eq!(store.list_sessions(&node).await.unwrap().len(), 1);

    // A claim moving from a label-valued node to an odd one loses the old node label.
    let moved_from = conformance::claim("pvc-move", "node-a", ClaimState::Held, 1);
    let mv = store.put_claim(&moved_from, None).await.unwrap();
    let moved_to = conformance::claim("pvc-move", &node, ClaimState::Held, 2);
    store.put_claim(&moved_to, Some(&mv)).await.unwrap();
    let leases: kube::Api<Lease> = kube::Api::namespaced(plane.admin().await, NS);
    let raw = leases
        .get(&object_name(&RecordKey::Claim("pvc-move".into())))
        .await
        .unwrap();
    let labels = raw.metadata.labels.unwrap_or_default();
    assert!(!labels.contains_key(NODE_LABEL), "{labels:?}");

    // Annotations are limited to 256 KiB in all: a record over it is refused by the
    // server as invalid (422), a Backend error, never Conflict or Unavailable, and
    // nothing is written.
    let mut huge = c.clone();
    huge.holder.pod_uid = "u".repeat(300 * 1024);
    match store.put_claim(&huge, Some(&v)).await {
        Err(StoreError::Backend(msg)) => {
            assert!(msg.contains("422") || msg.contains("Too long"), "{msg}")
        }
        other => panic!("an oversized record: expected Backend, got {other:?}"),
    }
    let read = store.get_claim(&volume).await.unwrap().unwrap();
    assert_eq!((read.value, read.version), (c, v));
}

/// etcd paused under the API server: calls hang there, and only the store's own timeout
/// bounds them. They must come back `Unavailable` within it, and work again after.
#[tokio::test]
async fn a_paused_etcd_under_the_api_server_is_unavailable_within_the_store_timeout() {
    let Some(plane) = plane("paused-etcd", ControlPlaneOptions::default()).await else {
        return;
    };
    let timeout = Duration::from_millis(1500);
    let store = admin_store(&plane).await.with_timeout(timeout);
    let s = conformance::session("node-a", "inst-1", 0);
    let v = store.put_session(&s, None).await.unwrap();
    plane.etcd.pause();
    for what in ["get", "put"] {
        let started = Instant::now();
        let result = match what {
            "get" => store.get_session(&s.key()).await.map(|_| ()),
            _ => store
                .put_session(&conformance::session("node-a", "inst-1", 1), Some(&v))
                .await
                .map(|_| ()),
        };
        let took = started.elapsed();
        assert!(
            matches!(result, Err(StoreError::Unavailable(_))),
            "{what} with etcd paused: {result:?}"
        );
        assert!(
            took < timeout + Duration::from_millis(500),
            "{what} took {took:?}"
        );
        println!("{what} with etcd paused: Unavailable after {took:?}");
    }
    plane.etcd.resume();
    // The put above may or may not have been applied: re-read, then write.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let read = store.get_session(&s.key()).await;
        if let Ok(Some(read)) = read {
            store
                .put_session(
                    &conformance::session("node-a", "inst-1", 2),
                    Some(&read.version),
                )
                .await
                .unwrap();
            break;
        }
        assert!(Instant::now() < deadline, "store did not recover: {read:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The API server killed and restarted while a holder renews: calls fail fast as
/// `Unavailable` while it is down (connection refused, not a hang), and versions read
/// before the restart still guard writes after it.
#[tokio::test]
async fn an_api_server_restart_during_renewals() {
    let Some(mut plane) = plane("apiserver-restart", ControlPlaneOptions::default()).await else {
        return;
    };
    let store = admin_store(&plane).await;
    let s = conformance::session("node-a", "inst-1", 0);
    let mut version = store.put_session(&s, None).await.unwrap();
    let stale = version.clone();
    version = store
        .put_session(&conformance::session("node-a", "inst-1", 1), Some(&version))
        .await
        .unwrap();
    plane.kill_apiserver();
    let started = Instant::now();
    let down = store
        .put_session(&conformance::session("node-a", "inst-1", 2), Some(&version))
        .await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    println!(
        "renewal with the API server down: Unavailable after {:?}",
        started.elapsed()
    );
    plane.restart_apiserver().await;
    let started = Instant::now();
    let renewed = loop {
        match store
            .put_session(&conformance::session("node-a", "inst-1", 2), Some(&version))
            .await
        {
            Ok(v) => break v,
            Err(StoreError::Unavailable(_)) if started.elapsed() < Duration::from_secs(20) => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("renewal after restart: {e}"),
        }
    };
    println!("first renewal after the restart: {:?}", started.elapsed());
    assert_ne!(renewed, version);
    assert!(matches!(
        store
            .put_session(&conformance::session("node-a", "inst-1", 3), Some(&stale))
            .await,
        Err(StoreError::Conflict { .. })
    ));
}

/// Server-side throttling: with a tiny in-flight limit the API server answers 429 to a
/// burst (the audit log proves it did). Whether the client retries a 429 or not, the
/// store's answer is the write or `Unavailable` (retry later), never `Conflict` (which
/// would read as "someone else wrote") nor `Backend`. The calls are made as the node
/// plugin under the chart's RBAC: `system:masters` is exempt from the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttled_calls_are_unavailable_not_conflicts() {
    const BURST: usize = 80;
    let options = ControlPlaneOptions {
        audit: true,
        apiserver_args: vec![
            // Priority and fairness would queue instead of refusing.
            "--enable-priority-and-fairness=false".into(),
            "--max-requests-inflight=1".into(),
            "--max-mutating-requests-inflight=1".into(),
        ],
        ..ControlPlaneOptions::default()
    };
    let Some(plane) = plane("throttling", options).await else {
        return;
    };
    plane
        .apply_yaml(include_str!("../../manifests/deploy/20-rbac.yaml"))
        .await;
    // Several clients, so the burst arrives on several connections at once.
    let mut stores = Vec::new();
    for _ in 0..8 {
        let client = plane.client(&Identity::node_plugin()).await;
        stores.push(KubernetesStore::new(client, NS).with_timeout(Duration::from_secs(3)));
    }
    let mut calls = Vec::new();
    for i in 0..BURST {
        let store = stores[i % stores.len()].clone();
        calls.push(tokio::spawn(async move {
            let c = conformance::claim(&format!("pvc-burst-{i}"), "node-a", ClaimState::Held, 1);
            store.put_claim(&c, None).await
        }));
    }
    let (mut ok, mut unavailable) = (0, 0);
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(StoreError::Unavailable(_)) => unavailable += 1,
            Err(e) => panic!("a throttled create: expected Ok or Unavailable, got {e}"),
        }
    }
    let user = Identity::node_plugin().user();
    let throttled = plane
        .audit_log()
        .iter()
        .filter(|e| e.user == user && e.code == 429)
        .count();
    println!(
        "burst of {BURST} creates with max-inflight 1: {ok} written, {unavailable} Unavailable, \
         {throttled} answers 429 in the audit log"
    );
    assert!(
        throttled > 0,
        "the API server throttled nothing: the test proves nothing"
    );
    let listed = stores[0].list_claims().await.unwrap().len();
    assert!(
        (ok..=BURST).contains(&listed),
        "{listed} claims listed, {ok} acknowledged"
    );
}
