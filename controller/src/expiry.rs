//! Expired-claim marking: the elected controller reads every claim now and then, times
//! each held claim's holder session on its own clock (the attach gate's rule: a session
//! version unchanged for `W = D·(1+ε)+margin` since this process first read it), and
//! writes an [`ExpiredMark`] on a claim whose holder's session expired, so that
//! `holdfast-controller status` and events can say when the holder self-fenced.
//!
//! The mark changes nothing about the lock: the decisions never read it, it frees and
//! blocks nothing, and a node's acquire after it works exactly as before (a mark written
//! between the acquirer's read and its compare-and-swap makes that swap conflict once,
//! and the acquire re-reads, as after any concurrent write). Every write names the
//! version read, so a claim that changed meanwhile is left alone until the next sweep.
//!
//! A mark can go stale: the session record of a self-fenced holder is not deleted until
//! an acquirer times it out, so a holder that reaches the store again renews the same
//! session and may write again. The mark records the session's `renewals` counter; a
//! sweep that reads a higher one removes the mark.
//!
//! The same sweep sets the `claims` gauge (by state) and observes takeovers for the
//! `takeover_seconds` histogram (see [`crate::metrics`]). Only the leader sweeps; the
//! timers live in this process's memory and start afresh after a restart or a
//! leadership change, which can delay a mark, never hasten one.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use holdfast_core::clock::Mono;
use holdfast_core::lease::decide::{Observations, SessionView};
use holdfast_core::lease::types::ExpiredMark;
use holdfast_core::lease::{
    decide_attach, AttachDecision, AttachGrant, AttachInput, ClaimRecord, ClaimState, Epoch,
    Holder, LeaseParams, SessionKey, SessionRecord,
};
use holdfast_core::store::{LeaseStore, StoreError, Versioned};
use tokio::sync::watch;

use crate::kubernetes::leader::Leadership;
use crate::metrics;

/// Why a sweep could not be made at all (a single claim's failure only skips it).
#[derive(Debug, thiserror::Error)]
pub enum ExpiryError {
    #[error("cannot list the claims: {0}")]
    List(#[source] StoreError),
}

/// What one sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Held claims whose holder is not judged expired.
    pub held: usize,
    pub released: usize,
    pub fenced: usize,
    /// Held claims whose holder is judged expired (marked, or found marked).
    pub expired: usize,
    /// Volumes marked expired by this sweep.
    pub marked: Vec<String>,
    /// Volumes whose stale mark this sweep removed (the session renewed since).
    pub cleared: Vec<String>,
    /// Claims that changed holder after their holder was judged expired, with the time
    /// from the first sighting of the old holder's last session version to the first
    /// sighting of the new holder.
    pub takeovers: Vec<(String, Duration)>,
    /// Claims skipped because a store call failed (tried again at the next sweep).
    pub skipped: usize,
}

/// The last sighting of a held claim.
#[derive(Clone, Debug)]
struct Sighting {
    holder: Holder,
    epoch: Epoch,
    /// First sighting, on this clock, of the session version last read.
    silent_since: Option<Mono>,
    /// The holder's session was judged expired at that sighting.
    judged_expired: bool,
}

/// What one sweep has read so far.
#[derive(Default)]
struct Reads {
    sessions: HashMap<SessionKey, Option<Versioned<SessionRecord>>>,
    fences: HashMap<String, bool>,
}

/// The sweeper. One per controller process.
pub struct ExpiryWatch {
    store: Arc<dyn LeaseStore>,
    params: LeaseParams,
    observed_by: String,
    leadership: Leadership,
    seen: Observations,
    sightings: HashMap<String, Sighting>,
}

impl ExpiryWatch {
    /// `observed_by` names this replica in the marks it writes.
    pub fn new(
        store: Arc<dyn LeaseStore>,
        params: LeaseParams,
        observed_by: String,
        leadership: Leadership,
    ) -> Self {
        ExpiryWatch {
            store,
            params,
            observed_by,
            leadership,
            seen: Observations::default(),
            sightings: HashMap::new(),
        }
    }

    /// Sweeps every `interval` while this replica leads, until `stop` turns true.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            if self.leadership.is_leading() {
                match self.sweep().await {
                    Ok(report) => {
                        metrics::set_claims(
                            report.held,
                            report.released,
                            report.fenced,
                            report.expired,
                        );
                        for (volume, waited) in &report.takeovers {
                            tracing::info!(volume, waited = ?waited, "claim taken over after its holder's lease expired");
                            metrics::observe_takeover(waited.as_secs_f64());
                        }
                    }
                    Err(err) => tracing::warn!(%err, "expiry sweep failed; retrying"),
                }
            } else {
                // A follower's figures would be stale: only the leader reports them.
                metrics::clear_claims();
                // Timers restart when this replica leads again (never hastening a mark).
                self.seen = Observations::default();
                self.sightings.clear();
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One pass over every claim.
    pub async fn sweep(&mut self) -> Result<SweepReport, ExpiryError> {
        let claims = self.store.list_claims().await.map_err(ExpiryError::List)?;
        let mut report = SweepReport::default();
        // Read once per sweep: many claims hang off one session, and a node's claims
        // share its fence, so a sweep costs one list plus O(sessions + nodes) reads.
        let mut reads = Reads::default();
        let mut sighted = HashMap::new();
        for claim in claims {
            let volume = claim.value.volume_id.clone();
            match claim.value.state {
                ClaimState::Released => report.released += 1,
                ClaimState::Fenced => report.fenced += 1,
                ClaimState::Held => match self.held(claim, &mut reads, &mut report).await {
                    Ok(sighting) => {
                        sighted.insert(volume, sighting);
                    }
                    Err(err) => {
                        tracing::debug!(volume, %err, "expiry sweep skipped a claim");
                        report.skipped += 1;
                        // Keep what was known; the next sweep looks again.
                        if let Some(old) = self.sightings.remove(&volume) {
                            sighted.insert(volume, old);
                        }
                    }
                },
            }
        }
        self.sightings = sighted;
        Ok(report)
    }

    async fn held(
        &mut self,
        claim: Versioned<ClaimRecord>,
        reads: &mut Reads,
        report: &mut SweepReport,
    ) -> Result<Sighting, StoreError> {
        let record = &claim.value;
        let key = record.holder.session();
        let session = match reads.sessions.get(&key) {
            Some(s) => s.clone(),
            None => {
                let s = self.store.get_session(&key).await?;
                reads.sessions.insert(key.clone(), s.clone());
                s
            }
        };
        let node = &record.holder.node;
        let fenced = match reads.fences.get(node) {
            Some(f) => *f,
            None => {
                let f = self.store.get_fence(node).await?.is_some();
                reads.fences.insert(node.clone(), f);
                f
            }
        };
        // Read after every answer, as the gate does: a version first seen now was
        // written before now.
        let now = Mono::now();
        let view = self
            .seen
            .sessions
            .observe(&key, session.as_ref().map(|s| &s.version), now);
        let volume = record.volume_id.as_str();
        let input = AttachInput {
            volume_id: volume,
            // No node is named: the question is whether anybody else may take it.
            node: "",
            claim: Some(record),
            holder_session: &view,
            holder_node_fenced: fenced,
            high_water: self.seen.high_water(volume),
            now,
        };
        let decision = decide_attach(&input, &self.params);
        let _ = self.seen.see_epoch(volume, record.epoch);
        let first_seen = match &view {
            SessionView::Seen { first_seen, .. } => Some(*first_seen),
            SessionView::Absent => None,
        };
        let previous = self.sightings.get(volume).cloned();
        if let Some(before) = &previous {
            let changed = !before.holder.is_same_pod(&record.holder) && record.epoch > before.epoch;
            if let (true, true, Some(since)) = (changed, before.judged_expired, before.silent_since)
            {
                report
                    .takeovers
                    .push((volume.to_string(), now.since(since)));
            }
        }
        let expired = decision == AttachDecision::Grant(AttachGrant::HolderSessionExpired);
        let session = session.map(|s| s.value);
        let mut judged_expired = expired;
        match (&record.expired, &session) {
            (None, Some(s)) if expired => {
                let since = first_seen.expect("an expired session was seen");
                let mark = self.mark(s, since, now);
                self.write(&claim, Some(mark), report, true).await?;
            }
            // The session renewed after it was judged expired: the mark is wrong now.
            (Some(mark), Some(s)) if s.renewals > mark.session_renewals && !expired => {
                self.write(&claim, None, report, false).await?;
            }
            // Expired again at a later renewal: the mark is brought up to date.
            (Some(mark), Some(s)) if expired && s.renewals != mark.session_renewals => {
                let since = first_seen.expect("an expired session was seen");
                let mark = self.mark(s, since, now);
                self.write(&claim, Some(mark), report, true).await?;
            }
            // Marked by an earlier sweep (or another replica) and not renewed since, or
            // the session record is gone: the mark still says what happened.
            (Some(_), _) => judged_expired = true,
            _ => {}
        }
        if judged_expired {
            report.expired += 1;
        } else {
            report.held += 1;
        }
        Ok(Sighting {
            holder: record.holder.clone(),
            epoch: record.epoch,
            // A session gone keeps the silence first seen before it went.
            silent_since: first_seen.or(previous
                .filter(|p| p.holder.is_same_pod(&record.holder))
                .and_then(|p| p.silent_since)),
            judged_expired: expired,
        })
    }

    /// The mark for `session`, whose current version this process first saw at `since`.
    fn mark(&self, session: &SessionRecord, since: Mono, now: Mono) -> ExpiredMark {
        // An estimate for humans, never used for decisions: the wall time of the first
        // sighting of the holder's last renewal, plus D·(1+ε). The holder stopped
        // writing (D − margin) on its own clock after it *sent* that renewal, which was
        // before this sighting; since margin ≥ ε·D, that is at or before this estimate
        // in real time: "self-fenced by T". Only this controller's wall clock is read.
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let at = wall_now.saturating_sub(now.since(since))
            + self.params.duration.mul_f64(1.0 + self.params.epsilon);
        ExpiredMark {
            at_unix_ms: at.as_millis() as u64,
            observed_by: self.observed_by.clone(),
            session_renewals: session.renewals,
        }
    }

    /// Writes `claim` with its mark replaced by `mark`, naming the version read. A
    /// conflict (the claim changed meanwhile) is not an error: the next sweep re-reads.
    async fn write(
        &self,
        claim: &Versioned<ClaimRecord>,
        mark: Option<ExpiredMark>,
        report: &mut SweepReport,
        marking: bool,
    ) -> Result<(), StoreError> {
        // Asked right before acting: a replica that lost the lead writes nothing.
        if !self.leadership.is_leading() {
            return Ok(());
        }
        let updated = ClaimRecord {
            expired: mark,
            ..claim.value.clone()
        };
        let volume = updated.volume_id.clone();
        match self.store.put_claim(&updated, Some(&claim.version)).await {
            Ok(_) if marking => {
                tracing::info!(volume, holder = %updated.holder.pod_words(), node = %updated.holder.node, "holder's lease expired: claim marked expired");
                report.marked.push(volume);
                Ok(())
            }
            Ok(_) => {
                tracing::info!(
                    volume,
                    "holder's session renewed after it was judged expired: mark removed"
                );
                report.cleared.push(volume);
                Ok(())
            }
            Err(StoreError::Conflict { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use holdfast_core::store::MemoryStore;

    /// D = 30 ms: W = 35.3 ms, short enough to wait out in a unit test.
    fn params() -> LeaseParams {
        LeaseParams::new(Duration::from_millis(30), 0.01, Duration::from_millis(5)).unwrap()
    }

    async fn silent_holder() -> Arc<dyn LeaseStore> {
        let store: Arc<dyn LeaseStore> = Arc::new(MemoryStore::new());
        let holder = Holder {
            node: "n1".into(),
            pod_uid: "uid-a".into(),
            instance: "i1".into(),
            pod: None,
        };
        let claim = ClaimRecord {
            volume_id: "vol".into(),
            holder,
            state: ClaimState::Held,
            epoch: 1,
            expired: None,
        };
        store.put_claim(&claim, None).await.unwrap();
        let session = SessionRecord {
            node: "n1".into(),
            instance: "i1".into(),
            boot_id: "b".into(),
            machine_id: "m".into(),
            duration_ms: 30,
            renewals: 3,
        };
        store.put_session(&session, None).await.unwrap();
        store
    }

    #[tokio::test]
    async fn a_replica_that_does_not_lead_judges_but_writes_nothing() {
        let store = silent_holder().await;
        let mut follower =
            ExpiryWatch::new(store.clone(), params(), "f".into(), Leadership::follower());
        let mut leader =
            ExpiryWatch::new(store.clone(), params(), "l".into(), Leadership::always());
        for watch in [&mut follower, &mut leader] {
            let first = watch.sweep().await.unwrap();
            assert_eq!((first.held, first.expired), (1, 0), "a fresh timer");
        }
        tokio::time::sleep(params().takeover_wait()).await;
        let judged = follower.sweep().await.unwrap();
        assert_eq!((judged.expired, judged.marked.len()), (1, 0));
        assert_eq!(
            store.get_claim("vol").await.unwrap().unwrap().value.expired,
            None
        );
        let marked = leader.sweep().await.unwrap();
        assert_eq!(marked.marked, ["vol"]);
        let mark = store
            .get_claim("vol")
            .await
            .unwrap()
            .unwrap()
            .value
            .expired
            .unwrap();
        assert_eq!((mark.observed_by.as_str(), mark.session_renewals), ("l", 3));
        // Marked once: later sweeps keep it and count the claim expired.
        let again = leader.sweep().await.unwrap();
        assert_eq!((again.expired, again.marked.len()), (1, 0));
    }
}
