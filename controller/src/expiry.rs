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
//!
//! With the kubernetes lease store the sweep takes its sessions from a watch
//! ([`ExpiryWatch::with_session_watch`], [`crate::kubernetes::lease_watch`]) instead of
//! listing every claim at every pass: each session's resourceVersion is timed on its
//! first sighting in the watch's cache, exactly as a read would be, and only the
//! claims of nodes with a session silent for `W` (plus the claims this process saw
//! expired or marked, until they are not) are read, by
//! [`LeaseStore::list_claims_of_node`]. The timer stays periodic: the absence of a
//! renewal is no event. A watch can lag, and a lagging watch makes a renewing session
//! look silent; so nothing is written on the watch's word: every claim so found is
//! judged again with a fresh `get_session` read (a newer version restarts its timer),
//! and the mark is written with a compare-and-swap on the claim version read. Every
//! `full_every`-th pass (and the first one after becoming leader, or whenever the watch
//! is listing again) reads every claim as before; only those passes set the `claims`
//! gauge. With etcd the sweep keeps listing: its records are no Lease objects, and an
//! etcd watch on the session prefix would be the analogue, not built yet.

use std::collections::{BTreeSet, HashMap};
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
use crate::kubernetes::lease_watch::SessionCache;
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
    /// Every claim was read (the counts above cover them all); otherwise the sessions
    /// came from the watch and only the claims of nodes judged expired were read.
    pub full: bool,
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
    /// The claim carried a mark, or was counted expired (looked at again until not).
    marked: bool,
}

/// A node's name.
type Node = String;

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
    /// The session watch, and every how many passes all claims are read anyway.
    watched: Option<(SessionCache, u32)>,
    /// Passes since the last full one (`None`: the next is full).
    since_full: Option<u32>,
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
            watched: None,
            since_full: None,
        }
    }

    /// Takes the sessions from `cache` (the kubernetes store's session watch) and
    /// reads only the claims of nodes judged expired, all claims every `full_every`-th
    /// pass (at least 1: every pass).
    pub fn with_session_watch(mut self, cache: SessionCache, full_every: u32) -> Self {
        self.watched = Some((cache, full_every.max(1)));
        self
    }

    /// Sweeps every `interval` while this replica leads, until `stop` turns true.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        loop {
            if self.leadership.is_leading() {
                match self.sweep().await {
                    Ok(report) => {
                        // Only a pass over every claim counts them all.
                        if report.full {
                            metrics::set_claims(
                                report.held,
                                report.released,
                                report.fenced,
                                report.expired,
                            );
                        }
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
                self.since_full = None;
            }
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }

    /// One pass: over every claim, or, with a synced session watch between full
    /// passes, over the claims of nodes judged expired.
    pub async fn sweep(&mut self) -> Result<SweepReport, ExpiryError> {
        if let Some((cache, full_every)) = &self.watched {
            let due = self.since_full.is_none_or(|n| n + 1 >= *full_every);
            if let (false, Some(sessions)) = (due, cache.snapshot()) {
                self.since_full = self.since_full.map(|n| n + 1);
                return Ok(self.sweep_watched(sessions).await);
            }
        }
        let report = self.sweep_all().await?;
        self.since_full = Some(0);
        Ok(report)
    }

    /// The sessions from the watch: times each version on its first sighting there,
    /// then reads the claims of every node with a session silent for `W`, and of every
    /// node where the last passes found a claim expired or marked; a claim seen expired
    /// before that is no longer on its node is read by itself (taken over, released).
    async fn sweep_watched(&mut self, sessions: Vec<Versioned<SessionRecord>>) -> SweepReport {
        let mut report = SweepReport::default();
        // Read after the answer: a version first seen now was written before now.
        let now = Mono::now();
        let wait = self.params.takeover_wait();
        let mut nodes = BTreeSet::new();
        for s in &sessions {
            let view = self
                .seen
                .sessions
                .observe(&s.value.key(), Some(&s.version), now);
            if let SessionView::Seen { first_seen, .. } = view {
                if now.since(first_seen) >= wait {
                    nodes.insert(s.value.node.clone());
                }
            }
        }
        let previous: Vec<(String, Node)> = self
            .sightings
            .iter()
            .filter(|(_, s)| s.judged_expired || s.marked)
            .map(|(v, s)| (v.clone(), s.holder.node.clone()))
            .collect();
        nodes.extend(previous.iter().map(|(_, node)| node.clone()));
        let mut reads = Reads::default();
        let mut sighted: HashMap<String, Sighting> = HashMap::new();
        let mut visited = BTreeSet::new();
        for node in &nodes {
            let claims = match self.store.list_claims_of_node(node).await {
                Ok(claims) => claims,
                Err(err) => {
                    tracing::debug!(node, %err, "expiry sweep skipped a node's claims");
                    report.skipped += 1;
                    // Keep what was known of them; the next sweep looks again.
                    for (volume, s) in &self.sightings {
                        if &s.holder.node == node {
                            visited.insert(volume.clone());
                            sighted.insert(volume.clone(), s.clone());
                        }
                    }
                    continue;
                }
            };
            for claim in claims {
                visited.insert(claim.value.volume_id.clone());
                self.count(claim, &mut reads, &mut report, &mut sighted)
                    .await;
            }
        }
        for (volume, _) in previous {
            if visited.contains(&volume) {
                continue;
            }
            visited.insert(volume.clone());
            match self.store.get_claim(&volume).await {
                Ok(Some(claim)) => {
                    self.count(claim, &mut reads, &mut report, &mut sighted)
                        .await
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::debug!(volume, %err, "expiry sweep skipped a claim");
                    report.skipped += 1;
                    if let Some(old) = self.sightings.get(&volume) {
                        sighted.insert(volume, old.clone());
                    }
                }
            }
        }
        self.sightings = sighted;
        report
    }

    /// Counts one claim read, judging it if held; its sighting goes into `sighted`.
    async fn count(
        &mut self,
        claim: Versioned<ClaimRecord>,
        reads: &mut Reads,
        report: &mut SweepReport,
        sighted: &mut HashMap<String, Sighting>,
    ) {
        let volume = claim.value.volume_id.clone();
        match claim.value.state {
            ClaimState::Released => report.released += 1,
            ClaimState::Fenced => report.fenced += 1,
            ClaimState::Held => match self.held(claim, reads, report).await {
                Ok(sighting) => {
                    sighted.insert(volume, sighting);
                }
                Err(err) => {
                    tracing::debug!(volume, %err, "expiry sweep skipped a claim");
                    report.skipped += 1;
                    // Keep what was known; the next sweep looks again.
                    if let Some(old) = self.sightings.get(&volume) {
                        sighted.insert(volume, old.clone());
                    }
                }
            },
        }
    }

    /// One pass over every claim.
    async fn sweep_all(&mut self) -> Result<SweepReport, ExpiryError> {
        let claims = self.store.list_claims().await.map_err(ExpiryError::List)?;
        let mut report = SweepReport {
            full: true,
            ..SweepReport::default()
        };
        // Read once per sweep: many claims hang off one session, and a node's claims
        // share its fence, so a sweep costs one list plus O(sessions + nodes) reads.
        let mut reads = Reads::default();
        let mut sighted = HashMap::new();
        for claim in claims {
            self.count(claim, &mut reads, &mut report, &mut sighted)
                .await;
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
            marked: judged_expired || record.expired.is_some(),
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

    /// A watch that lags (here: never delivers a renewal) makes a renewing holder look
    /// silent; the fresh read before any mark sees the renewals, so nothing is marked.
    #[tokio::test]
    async fn a_lagging_watch_never_marks_a_renewing_holder() {
        let store = silent_holder().await;
        let stale = store
            .get_session(&SessionKey {
                node: "n1".into(),
                instance: "i1".into(),
            })
            .await
            .unwrap()
            .unwrap();
        let cache = SessionCache::new();
        cache.replace([("s".to_string(), stale.clone())]);
        let mut leader =
            ExpiryWatch::new(store.clone(), params(), "l".into(), Leadership::always())
                .with_session_watch(cache.clone(), u32::MAX);
        assert!(
            leader.sweep().await.unwrap().full,
            "the first pass reads every claim"
        );
        let mut session = stale;
        let until = Mono::now() + params().takeover_wait() * 3;
        let mut looked = 0;
        while Mono::now() < until {
            // The holder renews; the watch never says so.
            session.value.renewals += 1;
            session.version = store
                .put_session(&session.value, Some(&session.version))
                .await
                .unwrap();
            let report = leader.sweep().await.unwrap();
            assert!(!report.full);
            assert!(report.marked.is_empty(), "{report:?}");
            looked += report.held;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            looked > 0,
            "the stale watch made the sweep look at the claim"
        );
        assert_eq!(
            store.get_claim("vol").await.unwrap().unwrap().value.expired,
            None
        );
        // The holder stops and the watch catches up: marked once silent for W.
        cache.replace([("s".to_string(), session)]);
        assert!(leader.sweep().await.unwrap().marked.is_empty());
        tokio::time::sleep(params().takeover_wait() * 2).await;
        let marked = leader.sweep().await.unwrap();
        assert_eq!(
            (marked.full, marked.marked.as_slice()),
            (false, &["vol".to_string()][..])
        );
    }
}
