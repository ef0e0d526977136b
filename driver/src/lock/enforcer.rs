//! The enforcement task: keeps every claimed volume's gate honest. Runs for the
//! plugin's life, every renewal interval (D/3), and also wakes at the session deadline,
//! so a bind volume's processes are killed as soon as the session stops being provable.
//! Between full ticks the storage checks (1 and 2 below) run every [`STORAGE_POLL`]:
//! they are what stops a node that was fenced while still running, and with the default
//! D = 15 s a renewal interval alone would leave it writing for up to 5 s after another
//! node took over.
//!
//! Per claimed volume, each tick:
//! 1. the epoch file on the storage — higher than ours means someone newer holds the
//!    volume: fence at once (`EpochSuperseded`). This check never touches the lease
//!    store, so it works exactly when it matters: storage reachable, store not;
//! 2. the node fence flag of the session: fence (`NodeFenced`);
//! 3. the claim in the store (`claim_status`): anything but "held by us at our epoch"
//!    fences (`ClaimLost`, or `NodeFenced` when the store marked it fenced). A store
//!    that does not answer proves nothing either way: the session deadline covers it.
//!
//! Then every bind volume whose gate is stopped (by the above, or by its session
//! deadline) has the processes using it killed ([`crate::lock::holders`]), on every tick while
//! it stays published, since a restarted container would open it again.
//!
//! The task only fences gates; it never adds or removes claims (the Node service does).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use holdfast_core::clock::Mono;
use holdfast_core::lease::{ClaimStatus, FenceCause, LeaseError};
use tokio::sync::watch;

use crate::lock::claims::{ClaimBook, ClaimedVolume};
use crate::lock::epoch_file;
use crate::lock::holders::{self, VolumeViews};
use crate::publish::kernel_mounts::MountTable;
use crate::publish::published::DataPathKind;
use crate::publish::publisher::Publisher;

/// Bound on each storage read and store call of one tick, so a hung NFS server or a
/// silent store cannot stall the checks of the other volumes.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the epoch file and the node-fence flag are checked between full ticks:
/// one small read per claimed volume, bounding how long a fenced node can go on writing.
pub const STORAGE_POLL: Duration = Duration::from_secs(1);

pub async fn run(
    book: Arc<ClaimBook>,
    publisher: Arc<Publisher>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut next_tick = Mono::now();
    loop {
        if Mono::now() >= next_tick {
            tick(&book, &publisher).await;
            next_tick = Mono::now() + interval;
        } else {
            storage_tick(&book, &publisher).await;
        }
        let now = Mono::now();
        let deadline = book.session().deadline().deadline();
        // Wake just after the session deadline if it comes before the next check.
        let until_deadline = if deadline > now {
            deadline.since(now) + Duration::from_millis(1)
        } else {
            interval
        };
        let pause = next_tick.since(now).min(STORAGE_POLL).min(until_deadline);
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The checks that need no store (epoch on storage, node-fence flag), and the kills
/// they call for.
async fn storage_tick(book: &Arc<ClaimBook>, publisher: &Publisher) {
    let claims = book.snapshot();
    for claim in &claims {
        check_storage(book, claim).await;
    }
    kill_stopped_bind_users(publisher, &claims).await;
}

/// One pass over every claimed volume: the storage and the node-fence flag first (no
/// store needed), then the kills those call for, and only then the store, whose calls
/// may take their whole timeout when it is unreachable — concurrently, so one pass
/// costs at most one timeout however many volumes there are.
pub async fn tick(book: &Arc<ClaimBook>, publisher: &Publisher) {
    let claims = book.snapshot();
    for claim in &claims {
        check_storage(book, claim).await;
    }
    kill_stopped_bind_users(publisher, &claims).await;
    let mut store_checks = tokio::task::JoinSet::new();
    for claim in &claims {
        let (book, claim) = (book.clone(), claim.clone());
        store_checks.spawn(async move { check_store(&book, &claim).await });
    }
    while store_checks.join_next().await.is_some() {}
    kill_stopped_bind_users(publisher, &claims).await;
}

async fn kill_stopped_bind_users(publisher: &Publisher, claims: &[Arc<ClaimedVolume>]) {
    for claim in claims {
        if claim.kind == DataPathKind::Bind && claim.gate.stopped_at(Mono::now()).is_some() {
            kill_users(publisher, claim).await;
        }
    }
}

async fn check_storage(book: &ClaimBook, claim: &ClaimedVolume) {
    let path = claim.epoch_file.clone();
    let read = tokio::time::timeout(
        CHECK_TIMEOUT,
        tokio::task::spawn_blocking(move || epoch_file::read_epoch(&path)),
    )
    .await;
    match read {
        Ok(Ok(Ok(Some(found)))) if found > claim.epoch => claim.fence(
            FenceCause::EpochSuperseded,
            format!(
                "fenced: a newer holder wrote epoch {found} on storage (this pod held epoch {})",
                claim.epoch
            ),
        ),
        Ok(Ok(Ok(_))) => {}
        Ok(Ok(Err(e))) => {
            tracing::warn!(volume = %claim.volume_id, error = %e, "cannot check the epoch on storage")
        }
        Ok(Err(e)) => {
            tracing::warn!(volume = %claim.volume_id, error = %e, "epoch check task failed")
        }
        Err(_) => tracing::warn!(volume = %claim.volume_id, "epoch file read timed out"),
    }
    if book.session().is_fenced() {
        claim.fence(
            FenceCause::NodeFenced,
            "node fenced: a fence record names this node".into(),
        );
    }
}

async fn check_store(book: &ClaimBook, claim: &ClaimedVolume) {
    let status = tokio::time::timeout(
        CHECK_TIMEOUT,
        book.session().claim_status(&claim.volume_id, claim.epoch),
    )
    .await;
    match status {
        Ok(Ok(ClaimStatus::Held)) => {}
        Ok(Ok(ClaimStatus::Fenced)) => claim.fence(
            FenceCause::NodeFenced,
            "node fenced: the lease store marked this node's claim fenced".into(),
        ),
        Ok(Ok(ClaimStatus::Superseded { holder, epoch })) => claim.fence(
            FenceCause::ClaimLost,
            format!(
                "claim lost: pod {} on node {} holds it at epoch {epoch}",
                holder.pod_uid, holder.node
            ),
        ),
        Ok(Ok(other)) => claim.fence(
            FenceCause::ClaimLost,
            format!("claim lost: the lease store shows it {other:?}"),
        ),
        Ok(Err(e @ LeaseError::EpochRegressed { .. })) => {
            claim.fence(FenceCause::ClaimLost, format!("claim lost: {e}"))
        }
        Ok(Err(e)) => {
            tracing::debug!(volume = %claim.volume_id, error = %e, "claim status unknown")
        }
        Err(_) => tracing::debug!(volume = %claim.volume_id, "claim status timed out"),
    }
}

/// SIGKILLs every process using a stopped bind volume, and logs what was killed.
async fn kill_users(publisher: &Publisher, claim: &ClaimedVolume) {
    let paths: Vec<PathBuf> = publisher.table().targets(&claim.volume_id);
    let data_dir = claim.data_dir.clone();
    let killed = tokio::task::spawn_blocking(move || {
        let location = MountTable::read().ok().and_then(|t| t.locate(&data_dir));
        holders::kill_all(&VolumeViews { paths, location })
    })
    .await
    .unwrap_or_default();
    for p in killed {
        tracing::warn!(volume = %claim.volume_id, pid = p.pid, command = %p.command, uses = %p.uses,
            problem = ?claim.problem(), "killed a process using a fenced bind volume");
    }
}
