//! The claims of this node's earlier plugin instances, once they are proven dead (see
//! `holdfast_core::lease::recovery`: the machine rebooted, or the kernel dropped the
//! instance's flock). At start-up, and again when a publish meets a claim still held by
//! another instance on this node: an instance that was still exiting when this one
//! started held its flock then, so its claims were left to expire; proven dead now,
//! they need not wait for that (about 18 s with the defaults, plus kubelet's backoff).

use holdfast_core::backend::VolumeId;
use holdfast_core::lease::{FenceCause, LeaseError, RecoveryReport};

use crate::csi::error::NodeError;
use crate::lock::claims::ClaimBook;
use crate::lock::epoch_file::{self, EpochWrite};
use crate::publish::published::DataPathKind;
use crate::publish::publisher::Publisher;

/// Runs recovery again, for a publish that met a claim held by another instance on this
/// node. True when some instance was proven dead now (its claims released or adopted):
/// the publish is worth another try. Each proof deletes that instance's session, so a
/// second call finds nothing new and the caller's retry cannot loop.
pub async fn recover_again(book: &ClaimBook, publisher: &Publisher) -> Result<bool, LeaseError> {
    let report = book.session().recover_again().await?;
    log_report(&report);
    adopt_bind_claims(book, publisher, &report).await;
    Ok(!report.dead.is_empty())
}

pub fn log_report(report: &RecoveryReport) {
    for (key, proof) in &report.dead {
        tracing::info!(instance = %key.instance, ?proof, "predecessor proven dead");
    }
    for key in &report.alive {
        tracing::info!(instance = %key.instance, "predecessor may be alive; its claims are left to it or to expiry");
    }
    for (volume, epoch) in &report.released {
        tracing::info!(
            volume,
            epoch,
            "released a dead predecessor's claim (its data path died with it)"
        );
    }
}

/// Takes over the bind volumes a dead predecessor published: recovery re-homed their
/// claims onto this session at a new epoch; that epoch goes onto the storage and the
/// claim gets a gate, so the enforcer watches it (and kills its users if it is ever
/// fenced) exactly like one published by this instance.
pub async fn adopt_bind_claims(book: &ClaimBook, publisher: &Publisher, report: &RecoveryReport) {
    for record in &report.adopted {
        let volume_id = record.volume_id.clone();
        let paths = VolumeId::parse(&volume_id)
            .map_err(NodeError::from)
            .and_then(|id| {
                let backend = publisher.backend();
                Ok((backend.epoch_file(&id)?, backend.data_dir(&id)?))
            });
        let (epoch_file, data_dir) = match paths {
            Ok(paths) => paths,
            Err(e) => {
                tracing::error!(volume = %volume_id, error = %e, "adopted claim of an unreadable volume; releasing it");
                let _ = book.session().release(&volume_id, record.epoch).await;
                continue;
            }
        };
        let claim = book.adopt(book.claimed(
            &volume_id,
            &record.holder.pod_uid,
            record.holder.pod.clone(),
            record.epoch,
            DataPathKind::Bind,
            epoch_file.clone(),
            data_dir,
        ));
        let epoch = record.epoch;
        let written =
            tokio::task::spawn_blocking(move || epoch_file::write_epoch(&epoch_file, epoch)).await;
        match written {
            Ok(Ok(EpochWrite::Written)) => {
                tracing::info!(volume = %volume_id, epoch, "adopted a dead predecessor's bind volume")
            }
            Ok(Ok(EpochWrite::Higher(found))) => claim.fence(
                FenceCause::EpochSuperseded,
                format!("fenced: a newer holder wrote epoch {found} on storage (this pod held epoch {epoch})"),
            ),
            // The enforcer's next read of the file decides; the store channel still holds.
            Ok(Err(e)) => tracing::warn!(volume = %volume_id, error = %e, "cannot write the adopted epoch"),
            Err(e) => tracing::warn!(volume = %volume_id, error = %e, "epoch write task failed"),
        }
    }
}
