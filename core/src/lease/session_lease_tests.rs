//! The async shell against the real in-memory store, with short lease durations.

use super::*;
use crate::lease::decide::ClaimStatus;
use crate::lease::session::DeathProof;
use crate::lease::{fence_node, unfence_node, ClaimRecord, ClaimState};
use crate::store::memory::MemoryStore;
use std::process::{Command, Stdio};
use std::time::Instant;

fn params() -> LeaseParams {
    LeaseParams::new(Duration::from_millis(300), 0.01, Duration::from_millis(60)).unwrap()
}

fn ident(node: &str, boot: &str) -> NodeIdentity {
    NodeIdentity {
        node: node.into(),
        boot_id: boot.into(),
        machine_id: format!("machine-{node}"),
    }
}

struct Env {
    store: MemoryStore,
    dirs: Vec<tempfile::TempDir>,
}

impl Env {
    fn new() -> Self {
        Env {
            store: MemoryStore::new(),
            dirs: Vec::new(),
        }
    }

    fn dyn_store(&self) -> Arc<dyn LeaseStore> {
        Arc::new(self.store.clone())
    }

    /// A node-local state dir per node name (index), created on first use.
    fn dir(&mut self, index: usize) -> std::path::PathBuf {
        while self.dirs.len() <= index {
            self.dirs.push(tempfile::tempdir().unwrap());
        }
        self.dirs[index].path().to_path_buf()
    }

    async fn start(&mut self, node: &str, index: usize, boot: &str) -> SessionLease {
        let dir = self.dir(index);
        SessionLease::start(self.dyn_store(), ident(node, boot), params(), &dir)
            .await
            .unwrap()
    }
}

fn held(err: LeaseError) -> (Holder, Option<Duration>) {
    match err {
        LeaseError::Held { holder, expires_in } => (*holder, expires_in),
        other => panic!("expected Held, got {other:?}"),
    }
}

#[tokio::test]
async fn renewals_keep_pushing_the_deadline_forward() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let first = a.deadline().deadline();
    assert!(a.deadline().is_live_at(Mono::now()));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        a.deadline().is_live_at(Mono::now()),
        "renewed past the first D"
    );
    assert!(a.deadline().deadline() > first);
    a.shutdown(DataPaths::Stopped).await.unwrap();
}

#[tokio::test]
async fn conflict_is_reported_with_holder_and_release_hands_over_with_a_higher_epoch() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let b = env.start("b", 1, "boot").await;
    let grant = a.acquire("vol", "pod-a", None).await.unwrap();
    assert_eq!(grant.epoch, 1);
    assert_eq!(
        a.acquire("vol", "pod-a", None).await.unwrap().epoch,
        1,
        "idempotent"
    );
    let (holder, expires_in) = held(b.acquire("vol", "pod-b", None).await.unwrap_err());
    assert_eq!(
        (holder.node.as_str(), holder.pod_uid.as_str()),
        ("a", "pod-a")
    );
    assert!(expires_in.unwrap() <= params().takeover_wait());
    a.release("vol", 1).await.unwrap();
    assert_eq!(
        a.claim_status("vol", 1).await.unwrap(),
        ClaimStatus::Released
    );
    let grant_b = b.acquire("vol", "pod-b", None).await.unwrap();
    assert_eq!(grant_b.epoch, 2);
    // A late release from the old holder must not free the new holder's claim.
    a.release("vol", 1).await.unwrap();
    assert_eq!(b.claim_status("vol", 2).await.unwrap(), ClaimStatus::Held);
    assert!(matches!(
        a.claim_status("vol", 1).await.unwrap(),
        ClaimStatus::Superseded { epoch: 2, .. }
    ));
    a.shutdown(DataPaths::Stopped).await.unwrap();
    b.shutdown(DataPaths::Stopped).await.unwrap();
}

#[tokio::test]
async fn waiting_acquire_takes_over_a_silent_holder_only_after_the_window() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let b = env.start("b", 1, "boot").await;
    a.acquire("vol", "pod-a", None).await.unwrap();
    let a_key = a.key();
    drop(a); // crash: no more renewals, record left behind
    let start = Mono::now();
    let grant = b
        .acquire("vol", "pod-b", Some(start + Duration::from_secs(5)))
        .await
        .unwrap();
    let waited = Mono::now().since(start);
    assert_eq!(grant.epoch, 2);
    assert!(
        waited >= params().takeover_wait(),
        "took over after {waited:?}"
    );
    assert!(
        env.store.get_session(&a_key).await.unwrap().is_none(),
        "the timed session version was deleted"
    );
    b.shutdown(DataPaths::Stopped).await.unwrap();
}

#[tokio::test]
async fn store_outage_stops_extensions_and_the_gate_closes_then_reopens() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    env.store.set_unavailable(true);
    tokio::time::sleep(params().duration).await;
    assert!(
        !a.deadline().is_live_at(Mono::now()),
        "self-fenced without renewals"
    );
    env.store.set_unavailable(false);
    tokio::time::sleep(params().duration / 2).await;
    assert!(a.deadline().is_live_at(Mono::now()), "renewals resumed");
    a.shutdown(DataPaths::Stopped).await.unwrap();
}

#[tokio::test]
async fn a_deleted_session_is_lost_for_good() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let current = env.store.get_session(&a.key()).await.unwrap().unwrap();
    env.store
        .delete_session(&a.key(), &current.version)
        .await
        .unwrap();
    tokio::time::sleep(params().duration / 2).await;
    assert!(a.is_lost());
    assert!(!a.deadline().is_live_at(Mono::now()));
    assert!(matches!(
        a.acquire("vol", "p", None).await,
        Err(LeaseError::SessionNotLive { .. })
    ));
}

#[tokio::test]
async fn fencing_a_node_frees_its_claims_and_stops_its_writes() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let b = env.start("b", 1, "boot").await;
    let g1 = a.acquire("v1", "pod-a", None).await.unwrap();
    a.acquire("v2", "pod-a", None).await.unwrap();
    b.acquire("v3", "pod-b", None).await.unwrap();
    let report = fence_node(&env.store, "a", "out-of-service taint")
        .await
        .unwrap();
    let mut fenced = report.fenced.clone();
    fenced.sort();
    assert_eq!(fenced, vec![("v1".to_string(), 2), ("v2".to_string(), 2)]);
    assert_eq!(
        a.claim_status("v1", g1.epoch).await.unwrap(),
        ClaimStatus::Fenced
    );
    assert_eq!(b.acquire("v1", "pod-b", None).await.unwrap().epoch, 3);
    tokio::time::sleep(params().renew_interval() * 2).await;
    assert!(a.is_fenced() && !a.deadline().is_live_at(Mono::now()));
    assert!(matches!(
        a.acquire("v9", "pod-a", None).await,
        Err(LeaseError::NodeFenced { .. })
    ));
    assert!(
        fence_node(&env.store, "a", "again")
            .await
            .unwrap()
            .already_fenced
    );
    assert!(unfence_node(&env.store, "a").await.unwrap());
    tokio::time::sleep(params().renew_interval() * 2).await;
    assert!(!a.is_fenced() && a.deadline().is_live_at(Mono::now()));
}

#[tokio::test]
async fn stored_epoch_below_what_was_seen_is_an_error() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    a.acquire("vol", "pod-a", None).await.unwrap();
    a.release("vol", 1).await.unwrap();
    assert_eq!(a.acquire("vol", "pod-a", None).await.unwrap().epoch, 2);
    let cur = env.store.get_claim("vol").await.unwrap().unwrap();
    let rolled_back = ClaimRecord {
        epoch: 1,
        state: ClaimState::Released,
        ..cur.value.clone()
    };
    env.store
        .put_claim(&rolled_back, Some(&cur.version))
        .await
        .unwrap();
    assert!(matches!(
        a.claim_status("vol", 2).await,
        Err(LeaseError::EpochRegressed { .. })
    ));
    assert!(matches!(
        a.acquire("vol", "pod-x", None).await,
        Err(LeaseError::EpochRegressed {
            seen: 2,
            stored: 1,
            ..
        })
    ));
}

/// Writes a predecessor session on node "a" holding "vol", as a crashed plugin left it.
async fn leave_predecessor(env: &Env, instance: &str, boot: &str, machine: &str) {
    let rec = SessionRecord {
        node: "a".into(),
        instance: instance.into(),
        boot_id: boot.into(),
        machine_id: machine.into(),
        duration_ms: 300,
        renewals: 0,
    };
    env.store.put_session(&rec, None).await.unwrap();
    let holder = Holder {
        node: "a".into(),
        pod_uid: "pod-old".into(),
        instance: instance.into(),
        pod: None,
    };
    let claim = ClaimRecord {
        volume_id: "vol".into(),
        holder,
        state: ClaimState::Held,
        epoch: 4,
        expired: None,
    };
    env.store.put_claim(&claim, None).await.unwrap();
}

#[tokio::test]
async fn a_reboot_of_the_same_machine_releases_the_old_boots_claims_at_once() {
    let mut env = Env::new();
    leave_predecessor(&env, "old", "boot-1", "machine-a").await;
    let a = env.start("a", 0, "boot-2").await;
    assert_eq!(a.recovery().dead.len(), 1);
    assert_eq!(a.recovery().dead[0].1, DeathProof::Rebooted);
    assert_eq!(a.recovery().released, vec![("vol".to_string(), 4)]);
    let b = env.start("b", 1, "boot").await;
    assert_eq!(b.acquire("vol", "pod-b", None).await.unwrap().epoch, 5);
}

#[tokio::test]
async fn another_machine_under_the_same_node_name_proves_nothing() {
    let mut env = Env::new();
    leave_predecessor(&env, "old", "boot-1", "another-machine").await;
    let a = env.start("a", 0, "boot-2").await;
    assert!(a.recovery().dead.is_empty());
    assert_eq!(a.recovery().alive.len(), 1);
    let b = env.start("b", 1, "boot").await;
    held(b.acquire("vol", "pod-b", None).await.unwrap_err());
}

/// Same boot: a real process holds the predecessor's flock. While it lives, a successor
/// must leave its claims alone; once it is SIGKILLed, the next successor frees them.
#[tokio::test]
async fn same_boot_predecessor_is_freed_only_once_its_process_is_dead() {
    let mut env = Env::new();
    let dir = env.dir(0);
    std::fs::create_dir_all(dir.join("sessions")).unwrap();
    let lock = dir.join("sessions/pred.lock");
    let script = format!("exec 9>'{}' && flock 9 && exec sleep 60", lock.display());
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !matches!(
        NodeLock::probe(&dir, "pred").unwrap(),
        crate::lease::node_lock::Probe::Alive
    ) {
        assert!(t.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    leave_predecessor(&env, "pred", "boot", "machine-a").await;
    let overlap = env.start("a", 0, "boot").await;
    assert!(
        overlap.recovery().dead.is_empty(),
        "a live predecessor was declared dead"
    );
    assert!(overlap.recovery().released.is_empty());
    rustix::process::kill_process(
        rustix::process::Pid::from_raw(child.id() as i32).unwrap(),
        rustix::process::Signal::KILL,
    )
    .unwrap();
    child.wait().unwrap();
    let successor = env.start("a", 0, "boot").await;
    assert_eq!(successor.recovery().dead.len(), 1);
    assert_eq!(successor.recovery().dead[0].1, DeathProof::LockReleased);
    assert_eq!(successor.recovery().released, vec![("vol".to_string(), 4)]);
    assert!(!lock.exists());
    overlap.shutdown(DataPaths::Stopped).await.unwrap();
    successor.shutdown(DataPaths::Stopped).await.unwrap();
}

#[tokio::test]
async fn shutdown_deletes_the_session_only_when_data_paths_are_stopped() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    let key = a.key();
    let gate = a.deadline();
    a.shutdown(DataPaths::MayBeLive).await.unwrap();
    assert!(!gate.is_live_at(Mono::now()));
    assert!(env.store.get_session(&key).await.unwrap().is_some());
    let b = env.start("b", 1, "boot").await;
    let key = b.key();
    b.shutdown(DataPaths::Stopped).await.unwrap();
    assert!(env.store.get_session(&key).await.unwrap().is_none());
}

/// NodeUnpublish's release failed (store down) and is retried later; meanwhile the
/// same pod publishes again. The new grant must not be freed by the retried release.
#[tokio::test]
async fn a_retried_release_never_frees_a_later_grant_to_the_same_pod() {
    let mut env = Env::new();
    let a = env.start("a", 0, "boot").await;
    assert_eq!(a.acquire("vol", "pod-a", None).await.unwrap().epoch, 1);
    env.store.set_unavailable(true);
    assert!(a.release("vol", 1).await.is_err());
    env.store.set_unavailable(false);
    assert_eq!(a.acquire("vol", "pod-a", None).await.unwrap().epoch, 2);
    a.release("vol", 1).await.unwrap();
    assert_eq!(a.claim_status("vol", 2).await.unwrap(), ClaimStatus::Held);
}

/// A dead same-boot predecessor's bind-mounted claim (its pod may still be writing) is
/// adopted by the new session at a higher epoch instead of being released.
#[tokio::test]
async fn claims_whose_data_path_outlives_the_process_are_adopted_not_released() {
    let mut env = Env::new();
    let dir = env.dir(0);
    std::fs::create_dir_all(dir.join("sessions")).unwrap();
    std::fs::write(dir.join("sessions/pred.lock"), b"").unwrap(); // nobody holds it
    leave_predecessor(&env, "pred", "boot", "machine-a").await;
    let options = SessionOptions {
        data_path_survives: Some(Arc::new(|claim: &ClaimRecord| claim.volume_id == "vol")),
    };
    let a = SessionLease::start_with(env.dyn_store(), ident("a", "boot"), params(), &dir, options)
        .await
        .unwrap();
    assert!(a.recovery().released.is_empty());
    let adopted = &a.recovery().adopted;
    assert_eq!(adopted.len(), 1);
    assert_eq!(
        (adopted[0].epoch, adopted[0].holder.instance.clone()),
        (5, a.key().instance)
    );
    assert_eq!(a.acquire("vol", "pod-old", None).await.unwrap().epoch, 5);
    let b = env.start("b", 1, "boot").await;
    held(b.acquire("vol", "pod-b", None).await.unwrap_err());
}
