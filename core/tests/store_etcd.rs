//! `EtcdStore` against a real etcd process (from `etcd-bin-vendored`, started by
//! `holdfast_core::testkit::etcd::EtcdServer`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::Client;
use holdfast_core::lease::ClaimState;
use holdfast_core::store::{EtcdStore, EtcdStoreConfig, LeaseStore, StoreError};
use holdfast_core::testkit::conformance;
use holdfast_core::testkit::etcd::EtcdServer;

async fn store_with_timeout(etcd: &EtcdServer, prefix: &str, timeout: Duration) -> EtcdStore {
    EtcdStore::connect(EtcdStoreConfig {
        prefix: prefix.into(),
        timeout,
        ..EtcdStoreConfig::new(etcd.endpoints())
    })
    .await
    .unwrap()
}

async fn raw_put(etcd: &EtcdServer, key: &str, value: &[u8]) {
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    client.put(key, value, None).await.unwrap();
}

fn assert_malformed<T: std::fmt::Debug>(what: &str, r: Result<T, StoreError>) {
    match r {
        Err(StoreError::Malformed { .. }) => {}
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

#[tokio::test]
async fn etcd_store_conforms() {
    let etcd = EtcdServer::start();
    conformance::run(Arc::new(etcd.store("/conformance/").await)).await;
}

#[tokio::test]
async fn records_live_under_the_documented_keys() {
    let etcd = EtcdServer::start();
    let store = etcd.store("/hf/").await;
    let c = conformance::claim("ns/vol", "n1", ClaimState::Held, 4);
    let v = store.put_claim(&c, None).await.unwrap();
    store
        .put_session(&conformance::session("node-1", "inst-1", 0), None)
        .await
        .unwrap();
    let mut client = Client::connect(etcd.endpoints(), None).await.unwrap();
    let raw = client.get("/hf/claims/ns%2Fvol", None).await.unwrap();
    let kv = raw.kvs().first().expect("claim at its documented key");
    assert_eq!(
        kv.mod_revision().to_string(),
        v.0,
        "version is the mod revision"
    );
    let json: serde_json::Value = serde_json::from_slice(kv.value()).unwrap();
    assert_eq!(json["holder"]["node"], "n1");
    assert_eq!(json["state"], "held");
    let raw = client
        .get("/hf/sessions/node-1/inst-1", None)
        .await
        .unwrap();
    assert_eq!(raw.kvs().len(), 1);
}

#[tokio::test]
async fn prefixes_keep_stores_apart() {
    let etcd = EtcdServer::start();
    let a = etcd.store("/a/").await;
    let b = etcd.store("/b/").await;
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    a.put_claim(&c, None).await.unwrap();
    assert!(b.get_claim("v").await.unwrap().is_none());
    assert!(b.list_claims().await.unwrap().is_empty());
    b.put_claim(&c, None).await.unwrap();
}

#[tokio::test]
async fn malformed_values_are_reported_never_absent() {
    let etcd = EtcdServer::start();
    let store = etcd.store("/m/").await;
    let good = conformance::claim("good", "n1", ClaimState::Held, 1);
    store.put_claim(&good, None).await.unwrap();

    raw_put(&etcd, "/m/claims/garbage", b"\x00not json").await;
    assert_malformed("get of garbage", store.get_claim("garbage").await);
    assert_malformed("list with garbage", store.list_claims().await);

    // Valid JSON, wrong place: a copy of another volume's claim is not this volume's.
    raw_put(
        &etcd,
        "/m/claims/garbage",
        &serde_json::to_vec(&good).unwrap(),
    )
    .await;
    assert_malformed("get of misplaced record", store.get_claim("garbage").await);
    assert_malformed("list with misplaced record", store.list_claims().await);

    raw_put(&etcd, "/m/claims/garbage", br#"{"volume_id":"garbage","holder":{"node":"n","pod_uid":"p","instance":"i"},"state":"free","epoch":1}"#).await;
    assert_malformed("unknown state", store.get_claim("garbage").await);

    raw_put(&etcd, "/m/sessions/n1/i1", b"{}").await;
    let key = conformance::session("n1", "i1", 0).key();
    assert_malformed("get of empty session", store.get_session(&key).await);
    assert_malformed("list of node n1", store.list_sessions("n1").await);

    raw_put(&etcd, "/m/fences/n1", br#"{"node":"","reason":"x"}"#).await;
    assert_malformed("fence with empty node", store.get_fence("n1").await);
}

#[tokio::test]
async fn paused_etcd_is_unavailable_within_the_timeout() {
    let etcd = EtcdServer::start();
    let timeout = Duration::from_millis(500);
    let store = store_with_timeout(&etcd, "/p/", timeout).await;
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    let v = store.put_claim(&c, None).await.unwrap();

    etcd.pause();
    let started = Instant::now();
    let read = store.get_claim("v").await;
    let write = store.put_claim(&c, Some(&v)).await;
    let list = store.list_claims().await;
    let elapsed = started.elapsed();
    etcd.resume();
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(
        matches!(write, Err(StoreError::Unavailable(_))),
        "{write:?}"
    );
    assert!(matches!(list, Err(StoreError::Unavailable(_))), "{list:?}");
    // Three calls, each bounded by the timeout (slack for a loaded machine).
    assert!(
        elapsed < 3 * timeout + Duration::from_secs(2),
        "{elapsed:?}"
    );

    // Once etcd answers again, so does the store (the timed-out write may or may not
    // have landed; the version read back says which).
    let after = store.get_claim("v").await.unwrap().expect("claim survives");
    assert_eq!(after.value, c);
}

#[tokio::test]
async fn killed_etcd_is_unavailable_and_records_survive_a_restart() {
    let mut etcd = EtcdServer::start();
    let timeout = Duration::from_millis(500);
    let store = store_with_timeout(&etcd, "/k/", timeout).await;
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    let v = store.put_claim(&c, None).await.unwrap();

    etcd.kill();
    let started = Instant::now();
    let read = store.get_claim("v").await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");
    assert!(
        started.elapsed() < timeout + Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    etcd.restart();
    let mut back = None;
    for _ in 0..50 {
        match store.get_claim("v").await {
            Ok(found) => {
                back = found;
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("after restart: {other:?}"),
        }
    }
    let back = back.expect("claim survives an etcd restart");
    assert_eq!((back.value, back.version), (c, v));
}

#[tokio::test]
async fn connect_opens_the_configured_store() {
    use holdfast_core::store::{connect, StoreConfig};
    let etcd = EtcdServer::start();
    let store = connect(StoreConfig::Etcd {
        endpoints: etcd.endpoints(),
        prefix: "/via-config/".into(),
        timeout: Duration::from_secs(2),
    })
    .await
    .unwrap();
    assert_eq!(store.kind(), "etcd");
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    store.put_claim(&c, None).await.unwrap();
    let direct = etcd.store("/via-config/").await;
    assert_eq!(direct.get_claim("v").await.unwrap().unwrap().value, c);

    let memory = connect(StoreConfig::Memory).await.unwrap();
    assert_eq!(memory.kind(), "memory");
    assert!(matches!(
        connect(StoreConfig::etcd(vec![])).await,
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test]
async fn a_zero_or_foreign_version_never_turns_an_update_into_a_create() {
    // An absent key has mod revision 0: comparing against "0" would let an update
    // create the record blindly.
    let etcd = EtcdServer::start();
    let store = etcd.store("/z/").await;
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    for bogus in ["0", "-1", "abc", ""] {
        let version = holdfast_core::store::Version(bogus.into());
        let put = store.put_claim(&c, Some(&version)).await;
        assert!(
            matches!(put, Err(StoreError::Conflict { .. })),
            "{bogus:?}: {put:?}"
        );
        assert!(store.get_claim("v").await.unwrap().is_none(), "{bogus:?}");
    }
}

#[tokio::test]
async fn a_server_listening_on_all_addresses_is_reachable() {
    use holdfast_core::testkit::etcd::EtcdOptions;
    let etcd = EtcdServer::start_with(EtcdOptions {
        listen_ip: "0.0.0.0".parse().unwrap(),
        ..EtcdOptions::default()
    });
    assert!(etcd.client_url().starts_with("http://127.0.0.1:"));
    let store = etcd.store("/all/").await;
    let c = conformance::claim("v", "n1", ClaimState::Held, 1);
    store.put_claim(&c, None).await.unwrap();
}
