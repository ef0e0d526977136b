//! `KubernetesStore` plumbing, against a mocked API server (`tower-test`): the exact
//! requests each operation sends and how each answer is mapped. What a real API server
//! does with them is tested in `store_kubernetes_real.rs`.

use std::collections::BTreeMap;
use std::time::Duration;

use holdfast_core::lease::{ClaimRecord, ClaimState, SessionRecord};
use holdfast_core::store::codec::RecordKey;
use holdfast_core::store::kubernetes::object_name;
use holdfast_core::store::{KubernetesStore, LeaseStore, StoreError, Version, Versioned};
use holdfast_core::testkit::conformance;
use http::{Method, Request, Response};
use kube::client::Body;
use serde_json::{json, Value};
use tower_test::mock::{Handle, SendResponse};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/hf/leases";

fn mocked() -> (KubernetesStore, ApiHandle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let store = KubernetesStore::new(client, "hf").with_timeout(Duration::from_secs(5));
    (store, handle)
}

struct Seen {
    method: Method,
    content_type: String,
    path: String,
    query: String,
    body: Value,
    reply: SendResponse<Response<Body>>,
}

async fn next(handle: &mut ApiHandle) -> Seen {
    let (request, reply) = handle.next_request().await.expect("a request");
    let method = request.method().clone();
    let content_type = request
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let path = request.uri().path().to_string();
    let query = percent_decode(request.uri().query().unwrap_or(""));
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    Seen {
        method,
        content_type,
        path,
        query,
        body,
        reply,
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn reply(seen: Seen, code: u16, body: Value) {
    let response = Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(serde_json::to_vec(&body).unwrap()))
        .unwrap();
    seen.reply.send_response(response);
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("mocked {reason}"), "reason": reason, "code": code})
}

fn lease(name: &str, rv: &str, annotation: Option<String>, labels: Value) -> Value {
    let mut metadata =
        json!({"name": name, "namespace": "hf", "resourceVersion": rv, "labels": labels});
    if let Some(a) = annotation {
        metadata["annotations"] = json!({"holdfast.csi.dev/record": a});
    }
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": metadata, "spec": {}})
}

fn claim_lease(c: &ClaimRecord, rv: &str) -> Value {
    let name = object_name(&RecordKey::Claim(c.volume_id.clone()));
    lease(
        &name,
        rv,
        Some(serde_json::to_string(c).unwrap()),
        json!({}),
    )
}

fn session_lease(s: &SessionRecord, rv: &str) -> Value {
    let name = object_name(&RecordKey::Session(s.key()));
    lease(
        &name,
        rv,
        Some(serde_json::to_string(s).unwrap()),
        json!({}),
    )
}

fn claim_path(volume: &str) -> String {
    format!("{LEASES}/{}", object_name(&RecordKey::Claim(volume.into())))
}

#[tokio::test]
async fn create_posts_a_labelled_lease_and_maps_409_to_conflict() {
    let (store, mut api) = mocked();
    let c = conformance::claim("pvc-1", "node-1", ClaimState::Held, 7);
    let call = tokio::spawn({
        let (store, c) = (store.clone(), c.clone());
        async move { store.put_claim(&c, None).await }
    });
    let seen = next(&mut api).await;
    assert_eq!((&seen.method, seen.path.as_str()), (&Method::POST, LEASES));
    let meta = &seen.body["metadata"];
    assert_eq!(meta["name"], object_name(&RecordKey::Claim("pvc-1".into())));
    assert!(
        meta.get("resourceVersion").is_none(),
        "a create names no version"
    );
    assert_eq!(meta["labels"]["app.kubernetes.io/managed-by"], "holdfast");
    assert_eq!(meta["labels"]["holdfast.csi.dev/kind"], "claim");
    assert_eq!(meta["labels"]["holdfast.csi.dev/node"], "node-1");
    let annotation = meta["annotations"]["holdfast.csi.dev/record"]
        .as_str()
        .unwrap();
    assert_eq!(serde_json::from_str::<ClaimRecord>(annotation).unwrap(), c);
    assert_eq!(seen.body["spec"]["leaseTransitions"], 7);
    reply(seen, 201, claim_lease(&c, "42"));
    assert_eq!(call.await.unwrap().unwrap(), Version("42".into()));

    let call = tokio::spawn({
        let (store, c) = (store.clone(), c.clone());
        async move { store.put_claim(&c, None).await }
    });
    reply(next(&mut api).await, 409, status(409, "AlreadyExists"));
    assert!(matches!(
        call.await.unwrap(),
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn a_conditional_write_is_a_merge_patch_naming_the_expected_version() {
    // Not a PUT: a Lease PUT re-creates a deleted object (see the module doc).
    // The holder moved to a node whose name is no label value: the old label goes.
    let (store, mut api) = mocked();
    let c = conformance::claim("pvc-1", "odd/node", ClaimState::Released, 7);
    for (code, body, expect_ok) in [
        (200, claim_lease(&c, "43"), true),
        (409, status(409, "Conflict"), false),
        (404, status(404, "NotFound"), false),
    ] {
        let call = tokio::spawn({
            let (store, c) = (store.clone(), c.clone());
            async move { store.put_claim(&c, Some(&Version("42".into()))).await }
        });
        let seen = next(&mut api).await;
        assert_eq!(seen.method, Method::PATCH);
        assert_eq!(seen.content_type, "application/merge-patch+json");
        assert_eq!(seen.path, claim_path("pvc-1"));
        let meta = &seen.body["metadata"];
        assert_eq!(meta["resourceVersion"], "42");
        assert_eq!(meta["labels"]["holdfast.csi.dev/kind"], "claim");
        assert_eq!(meta["labels"]["holdfast.csi.dev/node"], Value::Null);
        let annotation = meta["annotations"]["holdfast.csi.dev/record"]
            .as_str()
            .unwrap();
        assert_eq!(serde_json::from_str::<ClaimRecord>(annotation).unwrap(), c);
        // Fields this record does not fill are removed, not left from the last writer.
        assert_eq!(seen.body["spec"]["leaseDurationSeconds"], Value::Null);
        assert_eq!(seen.body["spec"]["leaseTransitions"], 7);
        reply(seen, code, body);
        match call.await.unwrap() {
            Ok(v) if expect_ok => assert_eq!(v, Version("43".into())),
            Err(StoreError::Conflict { .. }) if !expect_ok => {}
            other => panic!("answer {code}: got {other:?}"),
        }
    }
}

#[tokio::test]
async fn an_empty_expected_version_is_refused_without_a_request() {
    // The API server reads an empty resourceVersion as "no precondition": a blind write.
    let (store, _api) = mocked();
    let c = conformance::claim("pvc-1", "node-1", ClaimState::Held, 1);
    let empty = Version(String::new());
    let put = tokio::time::timeout(Duration::from_secs(2), store.put_claim(&c, Some(&empty)));
    assert!(matches!(
        put.await.unwrap(),
        Err(StoreError::Conflict { .. })
    ));
    let delete = tokio::time::timeout(Duration::from_secs(2), store.delete_claim("pvc-1", &empty));
    assert!(matches!(
        delete.await.unwrap(),
        Err(StoreError::Conflict { .. })
    ));
}

#[tokio::test]
async fn delete_sends_resource_version_preconditions() {
    let (store, mut api) = mocked();
    let success = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": 200});
    for (code, body, expect_ok) in [
        (200, success, true),
        (409, status(409, "Conflict"), false),
        (404, status(404, "NotFound"), false),
    ] {
        let call = tokio::spawn({
            let store = store.clone();
            async move { store.delete_claim("pvc/odd", &Version("42".into())).await }
        });
        let seen = next(&mut api).await;
        assert_eq!(seen.method, Method::DELETE);
        assert_eq!(seen.path, claim_path("pvc/odd"));
        assert_eq!(seen.body["preconditions"]["resourceVersion"], "42");
        reply(seen, code, body);
        match call.await.unwrap() {
            Ok(()) if expect_ok => {}
            Err(StoreError::Conflict { .. }) if !expect_ok => {}
            other => panic!("answer {code}: got {other:?}"),
        }
    }
}

#[tokio::test]
async fn get_maps_404_to_absent_5xx_to_unavailable_and_403_to_backend() {
    let (store, mut api) = mocked();
    let c = conformance::claim("pvc-1", "node-1", ClaimState::Held, 1);
    type Check = fn(&Result<Option<Versioned<ClaimRecord>>, StoreError>) -> bool;
    let answers: [(u16, Value, Check); 5] = [
        (
            200,
            claim_lease(&c, "9"),
            |r| matches!(r, Ok(Some(v)) if v.version.0 == "9"),
        ),
        (404, status(404, "NotFound"), |r| matches!(r, Ok(None))),
        (500, status(500, "InternalError"), |r| {
            matches!(r, Err(StoreError::Unavailable(_)))
        }),
        (429, status(429, "TooManyRequests"), |r| {
            matches!(r, Err(StoreError::Unavailable(_)))
        }),
        (403, status(403, "Forbidden"), |r| {
            matches!(r, Err(StoreError::Backend(_)))
        }),
    ];
    for (code, body, ok) in answers {
        let call = tokio::spawn({
            let store = store.clone();
            async move { store.get_claim("pvc-1").await }
        });
        let seen = next(&mut api).await;
        assert_eq!(
            (&seen.method, seen.path.clone()),
            (&Method::GET, claim_path("pvc-1"))
        );
        reply(seen, code, body);
        let result = call.await.unwrap();
        assert!(ok(&result), "answer {code}: got {result:?}");
    }
}

#[tokio::test]
async fn malformed_annotations_are_malformed_on_get_and_list() {
    let (store, mut api) = mocked();
    let name = object_name(&RecordKey::Claim("pvc-1".into()));
    let other = conformance::claim("pvc-2", "node-1", ClaimState::Held, 1);
    let bad_leases = [
        lease(&name, "5", Some("{garbage".into()), json!({})),
        lease(&name, "5", None, json!({})),
        // A valid record of another volume, under this volume's name.
        lease(
            &name,
            "5",
            Some(serde_json::to_string(&other).unwrap()),
            json!({}),
        ),
    ];
    for bad in bad_leases {
        let call = tokio::spawn({
            let store = store.clone();
            async move { store.get_claim("pvc-1").await }
        });
        reply(next(&mut api).await, 200, bad.clone());
        let got = call.await.unwrap();
        assert!(
            matches!(got, Err(StoreError::Malformed { .. })),
            "get: {got:?}"
        );

        let call = tokio::spawn({
            let store = store.clone();
            async move { store.list_claims().await }
        });
        let list = json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList",
                          "metadata": {"resourceVersion": "6"},
                          "items": [claim_lease(&other, "4"), bad]});
        reply(next(&mut api).await, 200, list);
        let got = call.await.unwrap();
        assert!(
            matches!(got, Err(StoreError::Malformed { .. })),
            "list: {got:?}"
        );
    }
}

#[tokio::test]
async fn list_sessions_selects_by_labels_and_keeps_only_that_node() {
    let (store, mut api) = mocked();
    let mine = [
        conformance::session("node-1", "a", 1),
        conformance::session("node-1", "b", 1),
    ];
    let call = tokio::spawn({
        let store = store.clone();
        async move { store.list_sessions("node-1").await }
    });
    let seen = next(&mut api).await;
    assert_eq!((&seen.method, seen.path.as_str()), (&Method::GET, LEASES));
    let selector: BTreeMap<_, _> = seen
        .query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|s| s.split(','))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(selector["app.kubernetes.io/managed-by"], "holdfast");
    assert_eq!(selector["holdfast.csi.dev/kind"], "session");
    assert_eq!(selector["holdfast.csi.dev/node"], "node-1");
    let items: Vec<Value> = mine.iter().map(|s| session_lease(s, "3")).collect();
    reply(
        seen,
        200,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items}),
    );
    assert_eq!(call.await.unwrap().unwrap().len(), 2);

    // A node name that is no label value is selected by kind and filtered here.
    let call = tokio::spawn({
        let store = store.clone();
        async move { store.list_sessions("odd/node").await }
    });
    let seen = next(&mut api).await;
    assert!(
        !seen.query.contains("holdfast.csi.dev/node"),
        "{}",
        seen.query
    );
    let odd = conformance::session("odd/node", "a", 1);
    let items = vec![session_lease(&odd, "3"), session_lease(&mine[0], "3")];
    reply(
        seen,
        200,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "LeaseList", "metadata": {}, "items": items}),
    );
    let listed = call.await.unwrap().unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].value, odd);
}

#[tokio::test]
async fn an_unanswered_call_is_unavailable_after_the_timeout() {
    let (service, _api) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "default");
    let store = KubernetesStore::new(client, "hf").with_timeout(Duration::from_millis(200));
    let got = tokio::time::timeout(Duration::from_secs(5), store.get_claim("pvc-1")).await;
    assert!(
        matches!(got, Ok(Err(StoreError::Unavailable(_)))),
        "{got:?}"
    );
}
