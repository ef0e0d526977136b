//! The behaviour every [`LeaseStore`] backend must show, as one suite any backend's
//! tests call: `conformance::run(store).await` panics on the first violation.
//!
//! Every record the suite writes is named with a fresh random prefix and lists are
//! checked only on that prefix, so the suite can run against a store that holds other
//! records (a shared etcd, a real cluster namespace). It leaves its records behind.

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::lease::{ClaimRecord, ClaimState, Holder, NodeFence, SessionKey, SessionRecord};
use crate::store::{LeaseStore, StoreError, Version};

/// Runs every check against `store`.
pub async fn run(store: Arc<dyn LeaseStore>) {
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..10].to_string();
    assert!(!store.kind().is_empty(), "kind() must name the backend");
    sessions_are_compare_and_swap(&*store, &run_id).await;
    list_sessions_returns_exactly_one_nodes_sessions(&*store, &run_id).await;
    claims_are_compare_and_swap(&*store, &run_id).await;
    list_claims_returns_every_claim(&*store, &run_id).await;
    list_claims_of_node_returns_exactly_that_nodes_claims(&*store, &run_id).await;
    odd_volume_ids_round_trip(&*store, &run_id).await;
    fences_are_compare_and_swap(&*store, &run_id).await;
    invalid_records_are_refused(&*store, &run_id).await;
    one_of_many_racing_writers_wins(store.clone(), &run_id).await;
}

pub fn session(node: &str, instance: &str, renewals: u64) -> SessionRecord {
    SessionRecord {
        node: node.into(),
        instance: instance.into(),
        boot_id: "boot-1".into(),
        machine_id: "machine-1".into(),
        duration_ms: 3000,
        renewals,
    }
}

pub fn claim(volume: &str, node: &str, state: ClaimState, epoch: u64) -> ClaimRecord {
    ClaimRecord {
        volume_id: volume.into(),
        holder: Holder {
            node: node.into(),
            pod_uid: "pod-1".into(),
            instance: "inst-1".into(),
            pod: None,
        },
        state,
        epoch,
        expired: None,
    }
}

fn assert_conflict<T: std::fmt::Debug>(what: &str, result: Result<T, StoreError>) {
    match result {
        Err(StoreError::Conflict { .. }) => {}
        other => panic!("{what}: expected Conflict, got {other:?}"),
    }
}

async fn sessions_are_compare_and_swap(store: &dyn LeaseStore, run: &str) {
    let node = format!("{run}-cas");
    let first = session(&node, "i1", 0);
    let key = first.key();
    assert!(store.get_session(&key).await.unwrap().is_none());

    // Update of an absent record must not create it.
    let bogus = Version("1".into());
    assert_conflict(
        "put_session(Some) on absent",
        store.put_session(&first, Some(&bogus)).await,
    );
    assert!(store.get_session(&key).await.unwrap().is_none());

    let v1 = store.put_session(&first, None).await.unwrap();
    assert_conflict(
        "put_session(None) on present",
        store.put_session(&first, None).await,
    );
    let read = store.get_session(&key).await.unwrap().expect("present");
    assert_eq!(read.value, first);
    assert_eq!(read.version, v1, "get must return the version put returned");

    let second = session(&node, "i1", 1);
    let v2 = store.put_session(&second, Some(&v1)).await.unwrap();
    assert_ne!(v1, v2, "every write must change the version");
    assert_conflict(
        "put_session with stale version",
        store.put_session(&session(&node, "i1", 2), Some(&v1)).await,
    );
    let read = store.get_session(&key).await.unwrap().expect("present");
    assert_eq!((read.value, read.version), (second.clone(), v2.clone()));

    // Rewriting identical content is still a write with a new version: renewals rely
    // on observers seeing the version move.
    let v3 = store.put_session(&second, Some(&v2)).await.unwrap();
    assert_ne!(v2, v3);

    assert_conflict(
        "delete_session with stale version",
        store.delete_session(&key, &v2).await,
    );
    assert!(store.get_session(&key).await.unwrap().is_some());
    store.delete_session(&key, &v3).await.unwrap();
    assert!(store.get_session(&key).await.unwrap().is_none());
    assert_conflict(
        "delete_session of absent",
        store.delete_session(&key, &v3).await,
    );
    // The version of a deleted record must not bring it back: a late renewal must not
    // resurrect a session that a timeout takeover deleted.
    assert_conflict(
        "put_session with the version of a deleted record",
        store.put_session(&second, Some(&v3)).await,
    );
    assert!(
        store.get_session(&key).await.unwrap().is_none(),
        "a conditional put re-created a deleted record"
    );

    // Re-created: a stale writer holding an old version must not match it again.
    let v4 = store.put_session(&first, None).await.unwrap();
    for old in [&v1, &v2, &v3] {
        assert_ne!(&v4, old, "a re-created record must get a fresh version");
    }
    assert_conflict(
        "put_session with a version from before the delete",
        store.put_session(&second, Some(&v3)).await,
    );
}

async fn list_sessions_returns_exactly_one_nodes_sessions(store: &dyn LeaseStore, run: &str) {
    let node = format!("{run}-a");
    // Names that share a prefix with `node`, and one with a slash, must not leak in.
    let others = [
        format!("{run}-ab"),
        format!("{run}-a/b"),
        format!("{run}-a.b"),
    ];
    let mut expected = Vec::new();
    for instance in ["i1", "i2"] {
        let s = session(&node, instance, 7);
        let v = store.put_session(&s, None).await.unwrap();
        expected.push((s.instance.clone(), v));
    }
    for other in &others {
        store
            .put_session(&session(other, "i1", 0), None)
            .await
            .unwrap();
    }
    let mut listed: Vec<(String, Version)> = store
        .list_sessions(&node)
        .await
        .unwrap()
        .into_iter()
        .map(|s| {
            assert_eq!(s.value.node, node);
            (s.value.instance, s.version)
        })
        .collect();
    listed.sort();
    assert_eq!(listed, expected, "list_sessions({node})");
    assert!(store
        .list_sessions(&format!("{run}-none"))
        .await
        .unwrap()
        .is_empty());
    let with_slash = store.list_sessions(&others[1]).await.unwrap();
    assert_eq!(with_slash.len(), 1);
    assert_eq!(with_slash[0].value.node, others[1]);
}

async fn claims_are_compare_and_swap(store: &dyn LeaseStore, run: &str) {
    let volume = format!("{run}-vol");
    let held = claim(&volume, "n1", ClaimState::Held, 1);
    assert!(store.get_claim(&volume).await.unwrap().is_none());
    assert_conflict(
        "put_claim(Some) on absent",
        store.put_claim(&held, Some(&Version("1".into()))).await,
    );
    assert!(store.get_claim(&volume).await.unwrap().is_none());

    let v1 = store.put_claim(&held, None).await.unwrap();
    assert_conflict(
        "put_claim(None) on present",
        store
            .put_claim(&claim(&volume, "n2", ClaimState::Held, 2), None)
            .await,
    );
    let released = claim(&volume, "n1", ClaimState::Released, 1);
    let v2 = store.put_claim(&released, Some(&v1)).await.unwrap();
    assert_ne!(v1, v2);
    // The classic lost update: a second acquirer read v1 too and must lose.
    assert_conflict(
        "put_claim with stale version",
        store
            .put_claim(&claim(&volume, "n2", ClaimState::Held, 2), Some(&v1))
            .await,
    );
    let read = store.get_claim(&volume).await.unwrap().expect("present");
    assert_eq!((read.value, read.version), (released, v2.clone()));

    assert_conflict(
        "delete_claim with stale version",
        store.delete_claim(&volume, &v1).await,
    );
    store.delete_claim(&volume, &v2).await.unwrap();
    assert!(store.get_claim(&volume).await.unwrap().is_none());
    assert_conflict(
        "delete_claim of absent",
        store.delete_claim(&volume, &v2).await,
    );
    let v3 = store.put_claim(&held, None).await.unwrap();
    assert!(
        v3 != v1 && v3 != v2,
        "a re-created claim must get a fresh version"
    );
}

async fn list_claims_returns_every_claim(store: &dyn LeaseStore, run: &str) {
    let mut written = BTreeSet::new();
    for (i, state) in [ClaimState::Held, ClaimState::Released, ClaimState::Fenced]
        .into_iter()
        .enumerate()
    {
        let c = claim(&format!("{run}-list-{i}"), "n1", state, i as u64 + 1);
        let v = store.put_claim(&c, None).await.unwrap();
        written.insert((c.volume_id.clone(), v, format!("{state:?}")));
    }
    let listed: BTreeSet<_> = store
        .list_claims()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.value.volume_id.starts_with(&format!("{run}-list-")))
        .map(|c| {
            (
                c.value.volume_id.clone(),
                c.version,
                format!("{:?}", c.value.state),
            )
        })
        .collect();
    assert_eq!(listed, written, "list_claims must return every claim");
}

/// Fencing relies on it: a claim of the node missed here would stay unfenced. Node
/// names that are label values and ones that are not (too long), in every state, and
/// claims that moved between them.
async fn list_claims_of_node_returns_exactly_that_nodes_claims(store: &dyn LeaseStore, run: &str) {
    let a = format!("{run}-node-a");
    let b = format!("{run}-node-b.example");
    let long = format!("{run}-{}", "l".repeat(70));
    let mut expected: std::collections::BTreeMap<String, BTreeSet<_>> = Default::default();
    let mut volume = 0;
    for node in [&a, &b, &long] {
        for (i, state) in [ClaimState::Held, ClaimState::Released, ClaimState::Fenced]
            .into_iter()
            .enumerate()
        {
            volume += 1;
            let c = claim(
                &format!("{run}-of-node-{volume}"),
                node,
                state,
                i as u64 + 1,
            );
            let v = store.put_claim(&c, None).await.unwrap();
            expected.entry(node.clone()).or_default().insert((
                c.volume_id.clone(),
                v,
                format!("{state:?}"),
            ));
        }
    }
    // Claims that changed node: a → b, a → long, long → a.
    for (from, to) in [(&a, &b), (&a, &long), (&long, &a)] {
        volume += 1;
        let id = format!("{run}-of-node-{volume}");
        let first = claim(&id, from, ClaimState::Held, 1);
        let v1 = store.put_claim(&first, None).await.unwrap();
        let moved = claim(&id, to, ClaimState::Held, 2);
        let v2 = store.put_claim(&moved, Some(&v1)).await.unwrap();
        expected
            .entry(to.clone())
            .or_default()
            .insert((id, v2, format!("{:?}", ClaimState::Held)));
    }
    for node in [&a, &b, &long, &format!("{run}-node-none")] {
        let listed: BTreeSet<_> = store
            .list_claims_of_node(node)
            .await
            .unwrap()
            .into_iter()
            .map(|c| {
                assert_eq!(&c.value.holder.node, node, "a claim of another node");
                (
                    c.value.volume_id.clone(),
                    c.version,
                    format!("{:?}", c.value.state),
                )
            })
            .collect();
        assert_eq!(
            listed,
            expected.remove(node).unwrap_or_default(),
            "list_claims_of_node({node}) must return exactly that node's claims"
        );
    }
}

async fn odd_volume_ids_round_trip(store: &dyn LeaseStore, run: &str) {
    let ids = [
        format!("{run}/with/slashes"),
        format!("{run}%2Fescaped"),
        format!("{run} spaces and ünicode"),
        format!("{run}-{}", "x".repeat(300)),
    ];
    for id in &ids {
        let c = claim(id, "n1", ClaimState::Held, 1);
        let v = store.put_claim(&c, None).await.unwrap();
        let read = store.get_claim(id).await.unwrap().expect("present");
        assert_eq!(
            (&read.value, &read.version),
            (&c, &v),
            "round trip of {id:?}"
        );
    }
    // `<run>/with/slashes` and `<run>%2Fescaped` style ids must stay distinct records.
    let listed = store.list_claims().await.unwrap();
    for id in &ids {
        assert_eq!(
            listed.iter().filter(|c| &c.value.volume_id == id).count(),
            1,
            "{id:?} must be listed exactly once"
        );
    }
}

async fn fences_are_compare_and_swap(store: &dyn LeaseStore, run: &str) {
    let node = format!("{run}-fenced");
    let fence = NodeFence {
        node: node.clone(),
        reason: "out-of-service taint".into(),
    };
    assert!(store.get_fence(&node).await.unwrap().is_none());
    assert_conflict(
        "put_fence(Some) on absent",
        store.put_fence(&fence, Some(&Version("1".into()))).await,
    );
    let v1 = store.put_fence(&fence, None).await.unwrap();
    assert_conflict(
        "put_fence(None) on present",
        store.put_fence(&fence, None).await,
    );
    let again = NodeFence {
        reason: "fenced by agent".into(),
        ..fence.clone()
    };
    let v2 = store.put_fence(&again, Some(&v1)).await.unwrap();
    assert_ne!(v1, v2);
    assert_conflict(
        "put_fence with stale version",
        store.put_fence(&fence, Some(&v1)).await,
    );
    let read = store.get_fence(&node).await.unwrap().expect("present");
    assert_eq!((read.value, read.version), (again, v2.clone()));
    assert_conflict(
        "delete_fence with stale version",
        store.delete_fence(&node, &v1).await,
    );
    store.delete_fence(&node, &v2).await.unwrap();
    assert!(store.get_fence(&node).await.unwrap().is_none());
    assert_conflict(
        "delete_fence of absent",
        store.delete_fence(&node, &v2).await,
    );
}

async fn invalid_records_are_refused(store: &dyn LeaseStore, run: &str) {
    let malformed = |what: &str, r: Result<Version, StoreError>| match r {
        Err(StoreError::Malformed { .. }) => {}
        other => panic!("{what}: expected Malformed, got {other:?}"),
    };
    malformed(
        "claim with empty holder node",
        store
            .put_claim(&claim(&format!("{run}-bad"), "", ClaimState::Held, 1), None)
            .await,
    );
    assert!(store
        .get_claim(&format!("{run}-bad"))
        .await
        .unwrap()
        .is_none());
    malformed(
        "session with empty instance",
        store
            .put_session(&session(&format!("{run}-bad"), "", 0), None)
            .await,
    );
    let no_node = NodeFence {
        node: String::new(),
        reason: "r".into(),
    };
    malformed(
        "fence with empty node",
        store.put_fence(&no_node, None).await,
    );
    let empty_key = SessionKey {
        node: String::new(),
        instance: "i".into(),
    };
    assert!(store.get_session(&empty_key).await.is_err());
}

async fn one_of_many_racing_writers_wins(store: Arc<dyn LeaseStore>, run: &str) {
    let volume = format!("{run}-race");
    let base = store
        .put_claim(&claim(&volume, "n0", ClaimState::Released, 1), None)
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 1..=8 {
        let (store, volume, base) = (store.clone(), volume.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let c = claim(&volume, &format!("n{i}"), ClaimState::Held, 2);
            store.put_claim(&c, Some(&base)).await.map(|v| (i, v))
        }));
    }
    let mut winners = Vec::new();
    for t in tasks {
        match t.await.expect("task panicked") {
            Ok(won) => winners.push(won),
            Err(StoreError::Conflict { .. }) => {}
            Err(other) => panic!("racing writer failed with {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one CAS from one version may win");
    let (i, v) = winners.pop().unwrap();
    let read = store.get_claim(&volume).await.unwrap().expect("present");
    assert_eq!(read.value.holder.node, format!("n{i}"));
    assert_eq!(read.version, v);
}
