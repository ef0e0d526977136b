//! The attach gate's shell: reads one snapshot of a volume's claim from the lease store,
//! times the holder's session on this process's own clock, and asks
//! [`decide_attach`] — the node plugin's acquire decision, asked for a newcomer of the
//! attaching node. Nothing is decided here.
//!
//! Timing: the [`Observations`] live in this process's memory only. Each session
//! version's timer starts when this controller first reads that version, on its
//! CLOCK_BOOTTIME, read after the store answered; wall clocks of other machines are
//! never looked at. A controller that just started therefore knows no timer and
//! refuses every live-looking holder for a full `D·(1+ε)+margin` — a restart can delay
//! an attach, never hasten one. Each ControllerPublishVolume (the attacher retries a
//! refused one) is a new reading, exactly as a node's waiting acquire re-reads.
//!
//! The gate only reads: it writes no claim and deletes no session (see
//! `holdfast_core::lease::attach` for why a grant from a snapshot is safe).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use holdfast_core::clock::Mono;
use holdfast_core::lease::decide::{Observations, SessionView};
use holdfast_core::lease::{
    decide_attach, AttachDecision, AttachGrant, AttachInput, ClaimState, Epoch, Holder, LeaseError,
    LeaseParams,
};
use holdfast_core::store::{LeaseStore, StoreError};

use crate::ControllerError;

/// A refused attach: another node's pod holds the volume and may still be writing.
/// The message is what the attacher writes into the VolumeAttachment's status.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "volume {volume} is held by pod {pod} on node {node} (claim epoch {epoch}); the \
     attach waits until that pod's node releases it, its lease expires, or node {node} is \
     fenced. {timing} If node {node} is down, an admin can fence it now: \
     `holdfast-controller fence --node {node}`",
    pod = holder.pod_words(),
    node = holder.node,
    timing = timing(&holder.node, *unrenewed_for, *expires_in),
)]
pub struct AttachRefused {
    pub volume: String,
    pub holder: Holder,
    pub epoch: Epoch,
    /// How long this controller has seen the holder's session unchanged.
    pub unrenewed_for: Duration,
    /// How long until the holder's lease can expire if it stays unrenewed.
    pub expires_in: Option<Duration>,
}

fn timing(node: &str, unrenewed_for: Duration, expires_in: Option<Duration>) -> String {
    let watched = unrenewed_for.as_secs_f64();
    match expires_in {
        Some(left) => format!(
            "This controller has watched node {node}'s session for {watched:.1}s without \
             seeing it renewed: its lease can expire in {:.1}s if it is not renewed (a \
             controller times every session afresh from its own start).",
            left.as_secs_f64()
        ),
        None => format!("Node {node}'s session cannot expire by timeout from here."),
    }
}

/// The gate. One per controller process; shared by every ControllerPublishVolume.
pub struct AttachGate {
    store: Arc<dyn LeaseStore>,
    params: LeaseParams,
    seen: Mutex<Observations>,
}

impl std::fmt::Debug for AttachGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttachGate")
            .field("store", &self.store.kind())
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl AttachGate {
    /// A gate over `store` with the timing every node plugin uses.
    pub fn new(store: Arc<dyn LeaseStore>, params: LeaseParams) -> Self {
        AttachGate {
            store,
            params,
            seen: Mutex::new(Observations::default()),
        }
    }

    /// Whether `volume_id` may be attached to `node` now: `Ok` with why, or the
    /// refusal naming the holder, or the store's error (never a grant on an error).
    /// Each refusal is counted in `holdfast_controller_attaches_refused_total`.
    pub async fn check(&self, volume_id: &str, node: &str) -> Result<AttachGrant, ControllerError> {
        let decided = self.decide(volume_id, node).await;
        if let Err(error) = &decided {
            crate::metrics::count_attach_refused(refusal_reason(error));
        }
        decided
    }

    async fn decide(&self, volume_id: &str, node: &str) -> Result<AttachGrant, ControllerError> {
        // Read as a node's acquire reads: claim, then holder's session, then its fence.
        let claim = self
            .store
            .get_claim(volume_id)
            .await
            .map_err(LeaseError::from)?
            .map(|c| c.value);
        if let Some(c) = claim.as_ref().filter(|c| c.volume_id != volume_id) {
            return Err(LeaseError::InvalidInput(format!(
                "store returned the claim of {} for {volume_id}",
                c.volume_id
            ))
            .into());
        }
        let held = claim.as_ref().filter(|c| c.state == ClaimState::Held);
        let (session, fenced) = match held {
            Some(c) => {
                let session = self.store.get_session(&c.holder.session()).await;
                let fence = self.store.get_fence(&c.holder.node).await;
                (
                    session.map_err(LeaseError::from)?,
                    fence.map_err(LeaseError::from)?.is_some(),
                )
            }
            None => (None, false),
        };
        // Read after every answer: a version first seen now was written before now.
        let now = Mono::now();
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let view = match held {
            Some(c) => seen.sessions.observe(
                &c.holder.session(),
                session.as_ref().map(|s| &s.version),
                now,
            ),
            None => SessionView::Absent,
        };
        let input = AttachInput {
            volume_id,
            node,
            claim: claim.as_ref(),
            holder_session: &view,
            holder_node_fenced: fenced,
            high_water: seen.high_water(volume_id),
            now,
        };
        let decision = decide_attach(&input, &self.params);
        if let Some(c) = &claim {
            // Raises the mark only; a regressed epoch leaves it where it was.
            let _ = seen.see_epoch(volume_id, c.epoch);
        }
        match decision {
            AttachDecision::Grant(grant) => Ok(grant),
            AttachDecision::Refuse {
                holder,
                epoch,
                unrenewed_for,
                expires_in,
            } => Err(AttachRefused {
                volume: volume_id.to_string(),
                holder,
                epoch,
                unrenewed_for,
                expires_in,
            }
            .into()),
            AttachDecision::Regressed { seen, stored } => Err(LeaseError::EpochRegressed {
                volume: volume_id.to_string(),
                seen,
                stored,
            }
            .into()),
        }
    }

    /// Deletes the claim record of a volume being deleted, so that the store does not
    /// keep one record per volume ever created. A claim still held is deleted only when
    /// any other node could take it now (released, fenced, or its holder's lease
    /// expired by the acquire rule, asked exactly as for an attach); while its holder may
    /// still be writing, DeleteVolume is refused and the provisioner retries. The delete
    /// names the version read, so a claim taken meanwhile is not removed.
    pub async fn forget(&self, volume_id: &str) -> Result<(), ControllerError> {
        let stored = self
            .store
            .get_claim(volume_id)
            .await
            .map_err(LeaseError::from)?;
        let Some(stored) = stored else {
            return Ok(());
        };
        if stored.value.state == ClaimState::Held {
            // No node is named "": the question is whether anybody else may take it.
            match self.decide(volume_id, "").await {
                Ok(_) => {}
                Err(ControllerError::AttachRefused(refused)) => {
                    return Err(ControllerError::DeleteHeld(refused))
                }
                // Never delete what could not be read.
                Err(e) => return Err(e),
            }
        }
        match self.store.delete_claim(volume_id, &stored.version).await {
            Ok(()) => Ok(()),
            // Taken or released meanwhile: the provisioner's retry reads it again.
            Err(StoreError::Conflict { key }) => Err(ControllerError::ClaimChanged { key }),
            Err(e) => Err(LeaseError::from(e).into()),
        }
    }
}

/// The `reason` label of a refused attach.
fn refusal_reason(error: &ControllerError) -> &'static str {
    match error {
        ControllerError::AttachRefused(_) => "held_elsewhere",
        ControllerError::Lease(LeaseError::Store(StoreError::Unavailable(_))) => {
            "store_unavailable"
        }
        ControllerError::Lease(LeaseError::EpochRegressed { .. }) => "epoch_regressed",
        _ => "store_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::lease::{ClaimRecord, SessionRecord};
    use holdfast_core::store::MemoryStore;

    /// D = 30 ms: W = 35.3 ms, short enough to wait out in a unit test.
    fn params() -> LeaseParams {
        LeaseParams::new(Duration::from_millis(30), 0.01, Duration::from_millis(5)).unwrap()
    }

    fn holder() -> Holder {
        Holder {
            node: "n1".into(),
            pod_uid: "uid-a".into(),
            instance: "i1".into(),
            pod: None,
        }
    }

    fn claim(epoch: Epoch) -> ClaimRecord {
        ClaimRecord {
            volume_id: "vol".into(),
            holder: holder(),
            state: ClaimState::Held,
            epoch,
            expired: None,
        }
    }

    fn session(renewals: u64) -> SessionRecord {
        SessionRecord {
            node: "n1".into(),
            instance: "i1".into(),
            boot_id: "b".into(),
            machine_id: "m".into(),
            duration_ms: 30,
            renewals,
        }
    }

    #[tokio::test]
    async fn times_the_holder_from_its_first_reading_and_restarts_on_a_renewal() {
        let store = Arc::new(MemoryStore::new());
        store.put_claim(&claim(1), None).await.unwrap();
        let mut version = store.put_session(&session(0), None).await.unwrap();
        let gate = AttachGate::new(store.clone(), params());
        let w = params().takeover_wait();

        let refused = |r: Result<AttachGrant, ControllerError>| match r {
            Err(ControllerError::AttachRefused(r)) => *r,
            other => panic!("expected a refusal, got {other:?}"),
        };
        // The first reading starts the timer: a full W to go, whatever the holder did.
        let first = refused(gate.check("vol", "n2").await);
        assert_eq!(first.unrenewed_for, Duration::ZERO);
        assert_eq!(first.expires_in, Some(w));
        // Renewed within W, three times over: still refused.
        for renewals in 1..=3 {
            tokio::time::sleep(w * 2 / 3).await;
            version = store
                .put_session(&session(renewals), Some(&version))
                .await
                .unwrap();
            refused(gate.check("vol", "n2").await);
            // The holder's own node is granted meanwhile.
            assert_eq!(
                gate.check("vol", "n1").await.unwrap(),
                AttachGrant::HeldOnThisNode
            );
        }
        // Silent for W after the last renewal was read: granted, and nothing written.
        tokio::time::sleep(w).await;
        assert_eq!(
            gate.check("vol", "n2").await.unwrap(),
            AttachGrant::HolderSessionExpired
        );
        assert_eq!(
            store
                .get_session(&holder().session())
                .await
                .unwrap()
                .unwrap()
                .version,
            version
        );
    }

    #[tokio::test]
    async fn an_epoch_below_one_seen_is_an_error_not_a_grant() {
        let store = Arc::new(MemoryStore::new());
        let v5 = store.put_claim(&claim(5), None).await.unwrap();
        store.put_session(&session(0), None).await.unwrap();
        let gate = AttachGate::new(store.clone(), params());
        assert_eq!(
            gate.check("vol", "n1").await.unwrap(),
            AttachGrant::HeldOnThisNode
        );
        // The store went back in time: the same holder, an older epoch.
        store.put_claim(&claim(3), Some(&v5)).await.unwrap();
        match gate.check("vol", "n1").await {
            Err(ControllerError::Lease(LeaseError::EpochRegressed { seen, stored, .. })) => {
                assert_eq!((seen, stored), (5, 3));
            }
            other => panic!("expected an epoch regression, got {other:?}"),
        }
    }

    #[test]
    fn the_refusal_names_holder_node_timing_and_the_fence_command() {
        let refused = AttachRefused {
            volume: "hf-1".into(),
            holder: Holder {
                node: "n1".into(),
                pod_uid: "0b5c-uid".into(),
                instance: "i1".into(),
                pod: None,
            },
            epoch: 4,
            unrenewed_for: Duration::from_millis(2500),
            expires_in: Some(Duration::from_millis(15_600)),
        };
        let message = refused.to_string();
        for needle in [
            "volume hf-1 is held by pod 0b5c-uid on node n1 (claim epoch 4)",
            "watched node n1's session for 2.5s without seeing it renewed",
            "its lease can expire in 15.6s",
            "`holdfast-controller fence --node n1`",
        ] {
            assert!(message.contains(needle), "{needle:?} not in: {message}");
        }
    }
}
