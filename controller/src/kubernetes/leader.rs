//! Leader election on one coordination.k8s.io/v1 Lease, so that of several controller
//! replicas exactly one *acts* (fences nodes for their out-of-service taint); every
//! replica keeps serving CSI, whose attach gate only reads.
//!
//! [`Elector::run`] is the only writer of the [`Leadership`] every acting part consults
//! through [`Leadership::is_leading`]. The rules, and why they are safe:
//!
//! - **Acquire** when the Lease is absent (create: 409 means someone else won), has no
//!   holder, or its record has stayed *unchanged* for the lease duration on this
//!   replica's own CLOCK_BOOTTIME, timed from when this replica first read that
//!   resourceVersion. The holder's `renewTime` is written for people and never read:
//!   wall clocks of two machines are never compared. A replica that just started times
//!   every record afresh, so a restart can only delay a takeover.
//! - **Every write is conditional**: a merge patch carrying `metadata.resourceVersion`
//!   (a patch never creates, so a deleted Lease is not resurrected by a late renewal),
//!   or a create. Of two replicas racing on one version, one gets 409.
//! - **Acting window**: a replica acts only until `sent + renew deadline`, where `sent`
//!   is the instant (CLOCK_BOOTTIME) before it sent its last *successful* acquire or
//!   renewal. Another replica can first see that write's version at or after `sent`,
//!   and takes over only a full lease duration later on its own clock; the renew
//!   deadline is shorter than the lease duration, so the windows never overlap (for
//!   clock rates within the margin between the two). CLOCK_BOOTTIME keeps counting
//!   while a process is stopped, so a leader woken from SIGSTOP finds its window closed
//!   before it can act on anything it wakes up to: it steps down without a store call.
//! - **Release** on graceful stop: the window is closed first, then the holder is
//!   cleared (conditional on the version), so the next replica need not wait.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use holdfast_core::clock::Mono;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, Patch, PatchParams, PostParams};
use tokio::sync::watch;

/// The Lease's default name.
pub const DEFAULT_LEASE_NAME: &str = "holdfast-controller-leader";

/// Why leader-election settings were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaderConfigError {
    #[error(
        "--leader-elect-renew-deadline ({renew_deadline:?}) must be shorter than \
         --leader-elect-lease-duration ({lease_duration:?}): a leader must stop acting \
         before another replica may take over"
    )]
    DeadlineNotBelowDuration {
        renew_deadline: Duration,
        lease_duration: Duration,
    },
    #[error(
        "--leader-elect-retry-period ({retry_period:?}) must be shorter than \
         --leader-elect-renew-deadline ({renew_deadline:?}), or a single slow renewal \
         would end the leadership"
    )]
    RetryNotBelowDeadline {
        retry_period: Duration,
        renew_deadline: Duration,
    },
    #[error("--leader-elect-identity must not be empty")]
    EmptyIdentity,
}

/// Where the Lease is and the timing of the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's name in `holderIdentity`; unique per process.
    pub identity: String,
    /// How long a record must stay unchanged before another replica may take over.
    pub lease_duration: Duration,
    /// How long after sending its last successful renewal a leader keeps acting.
    pub renew_deadline: Duration,
    /// How often to try to acquire or renew.
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Checks the ordering the safety argument (module docs) rests on.
    pub fn validate(&self) -> Result<(), LeaderConfigError> {
        if self.identity.trim().is_empty() {
            return Err(LeaderConfigError::EmptyIdentity);
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(LeaderConfigError::DeadlineNotBelowDuration {
                renew_deadline: self.renew_deadline,
                lease_duration: self.lease_duration,
            });
        }
        if self.retry_period >= self.renew_deadline {
            return Err(LeaderConfigError::RetryNotBelowDeadline {
                retry_period: self.retry_period,
                renew_deadline: self.renew_deadline,
            });
        }
        Ok(())
    }
}

/// `POD_NAME` (the chart sets it) or the host name, plus a random suffix: two processes
/// must never share an identity, or both would renew "their" Lease.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "holdfast-controller".to_string());
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{base}_{}", &suffix[..8])
}

/// Whether this replica may act now. Cheap to clone and to ask.
#[derive(Clone, Debug)]
pub struct Leadership {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// CLOCK_BOOTTIME nanoseconds until which this replica may act; 0: not leading.
    acting_until: AtomicU64,
    /// Bumped each time this replica becomes leader, so acting parts re-examine
    /// everything they ignored as followers.
    gained: watch::Sender<u64>,
}

impl Leadership {
    fn with_until(until: u64) -> Self {
        Leadership {
            shared: Arc::new(Shared {
                acting_until: AtomicU64::new(until),
                gained: watch::channel(0).0,
            }),
        }
    }

    /// Not leading until an [`Elector`] says so.
    pub fn follower() -> Self {
        Self::with_until(0)
    }

    /// Leader election is off: this replica always acts (one replica only).
    pub fn always() -> Self {
        Self::with_until(u64::MAX)
    }

    /// This replica may act now: its acting window (module docs) is open on
    /// CLOCK_BOOTTIME. Ask right before each action, never cache the answer.
    pub fn is_leading(&self) -> bool {
        Mono::now().as_nanos() < self.shared.acting_until.load(Ordering::SeqCst)
    }

    /// A receiver that changes each time this replica becomes leader.
    pub fn gained(&self) -> watch::Receiver<u64> {
        self.shared.gained.subscribe()
    }

    fn open_until(&self, until: Mono) {
        self.shared
            .acting_until
            .store(until.as_nanos().max(1), Ordering::SeqCst);
    }

    fn close(&self) {
        self.shared.acting_until.store(0, Ordering::SeqCst);
    }
}

/// The Lease's record as this replica last read it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Observed {
    version: String,
    holder: Option<String>,
    duration: Duration,
    transitions: i32,
    /// When this replica first read this version (CLOCK_BOOTTIME, after the answer).
    since: Mono,
}

/// What one attempt concluded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Attempt {
    /// Acquired or renewed with a request sent at this instant.
    Leading { sent: Mono },
    /// Another replica holds a live lease.
    Following,
    /// The call failed or raced; try again after the retry period.
    Failed,
}

/// Runs the election for one replica.
pub struct Elector {
    api: Api<Lease>,
    config: LeaderConfig,
    leadership: Leadership,
    observed: Option<Observed>,
}

impl Elector {
    pub fn new(client: kube::Client, config: LeaderConfig, leadership: Leadership) -> Self {
        Elector {
            api: Api::namespaced(client, &config.namespace),
            config,
            leadership,
            observed: None,
        }
    }

    /// Tries every retry period until `stop` turns true, then releases the Lease if
    /// this replica holds it.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let mut was_leading = false;
        loop {
            let attempt = tokio::time::timeout(self.config.renew_deadline, self.attempt())
                .await
                .unwrap_or(Attempt::Failed);
            // Acting before this attempt? A window that lapsed unseen (the process
            // was stopped) and reopens now is a new leadership: whatever the acting
            // parts ignored meanwhile must be looked at again.
            let acting_before = self.leadership.is_leading();
            match attempt {
                Attempt::Leading { sent } => {
                    self.leadership
                        .open_until(sent + self.config.renew_deadline);
                }
                // Another replica holds a live lease: if this one still thought it led,
                // its renewals were lost; stop acting now rather than at the deadline.
                Attempt::Following => self.leadership.close(),
                // The window closes by itself at its deadline: a failed renewal ends
                // the leadership once the renew deadline has passed, not before.
                Attempt::Failed => {}
            }
            let leading = self.leadership.is_leading();
            if was_leading && !acting_before {
                tracing::warn!(identity = %self.config.identity, lease = %self.config.name, "stopped leading: no longer acting (the renew deadline passed)");
            } else if was_leading && !leading {
                tracing::warn!(identity = %self.config.identity, lease = %self.config.name, "stopped leading: no longer acting");
            }
            if leading && !acting_before {
                tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader: acting");
                self.leadership.shared.gained.send_modify(|n| *n += 1);
            }
            was_leading = leading;
            crate::metrics::set_leader(leading);
            tokio::select! {
                _ = tokio::time::sleep(self.config.retry_period) => {}
                _ = stop.wait_for(|s| *s) => break,
            }
        }
        self.release().await;
        crate::metrics::set_leader(false);
    }

    async fn attempt(&mut self) -> Attempt {
        let sent = Mono::now();
        let lease = match self.api.get_opt(&self.config.name).await {
            Ok(lease) => lease,
            Err(err) => {
                tracing::debug!(%err, "reading the leader lease failed");
                return Attempt::Failed;
            }
        };
        let Some(lease) = lease else {
            self.observed = None;
            return self.create(sent).await;
        };
        let observed = self.observe(&lease);
        let mine = observed.holder.as_deref() == Some(self.config.identity.as_str());
        let live = observed.holder.is_some()
            && Mono::now().since(observed.since)
                < observed.duration.max(self.config.lease_duration);
        if !mine && live {
            return Attempt::Following;
        }
        // Renewal of our own record, or takeover of an expired or empty one.
        let transitions = observed.transitions + i32::from(!mine);
        let mut spec = serde_json::json!({
            "holderIdentity": self.config.identity,
            "leaseDurationSeconds": duration_seconds(self.config.lease_duration),
            "renewTime": now_micro(),
            "leaseTransitions": transitions,
        });
        if !mine {
            spec["acquireTime"] = serde_json::json!(now_micro());
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": observed.version},
            "spec": spec,
        });
        match self
            .api
            .patch(
                &self.config.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(lease) => {
                self.observe(&lease);
                if !mine {
                    tracing::info!(identity = %self.config.identity, previous = ?observed.holder, "took over the leader lease");
                }
                Attempt::Leading { sent }
            }
            Err(err) => {
                tracing::debug!(%err, "writing the leader lease failed");
                Attempt::Failed
            }
        }
    }

    async fn create(&mut self, sent: Mono) -> Attempt {
        let lease: Lease = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": self.config.name,
                "labels": {"app.kubernetes.io/managed-by": "holdfast"},
            },
            "spec": {
                "holderIdentity": self.config.identity,
                "leaseDurationSeconds": duration_seconds(self.config.lease_duration),
                "acquireTime": now_micro(),
                "renewTime": now_micro(),
                "leaseTransitions": 0,
            },
        }))
        .expect("a Lease built from literals");
        match self.api.create(&PostParams::default(), &lease).await {
            Ok(lease) => {
                self.observe(&lease);
                Attempt::Leading { sent }
            }
            Err(err) => {
                tracing::debug!(%err, "creating the leader lease failed");
                Attempt::Failed
            }
        }
    }

    /// Records what was read, starting the timer when the version is new to us.
    fn observe(&mut self, lease: &Lease) -> Observed {
        let version = lease.metadata.resource_version.clone().unwrap_or_default();
        let spec = lease.spec.clone().unwrap_or_default();
        let unchanged = self.observed.as_ref().filter(|o| o.version == version);
        let since = unchanged.map_or_else(Mono::now, |o| o.since);
        let observed = Observed {
            version,
            holder: spec.holder_identity.filter(|h| !h.is_empty()),
            duration: Duration::from_secs(spec.lease_duration_seconds.unwrap_or(0).max(0) as u64),
            transitions: spec.lease_transitions.unwrap_or(0),
            since,
        };
        self.observed = Some(observed.clone());
        observed
    }

    /// Stops acting, then clears the holder if it is still us.
    async fn release(&mut self) {
        self.leadership.close();
        let Some(observed) = self.observed.clone() else {
            return;
        };
        if observed.holder.as_deref() != Some(self.config.identity.as_str()) {
            return;
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": observed.version},
            "spec": {"holderIdentity": null, "renewTime": now_micro()},
        });
        let params = PatchParams::default();
        let patch = Patch::Merge(&patch);
        let call = self.api.patch(&self.config.name, &params, &patch);
        match tokio::time::timeout(self.config.retry_period, call).await {
            Ok(Ok(_)) => {
                tracing::info!(identity = %self.config.identity, "released the leader lease")
            }
            Ok(Err(err)) => {
                tracing::warn!(%err, "could not release the leader lease; it expires by itself")
            }
            Err(_) => tracing::warn!("releasing the leader lease timed out; it expires by itself"),
        }
    }
}

/// Whole seconds, rounded up, for `leaseDurationSeconds`.
fn duration_seconds(d: Duration) -> i64 {
    d.as_millis().div_ceil(1000).max(1) as i64
}

/// The wall-clock time for `renewTime` / `acquireTime`: written for people, never read.
fn now_micro() -> String {
    format!("{:.6}", k8s_openapi::jiff::Timestamp::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> LeaderConfig {
        LeaderConfig {
            namespace: "holdfast".into(),
            name: DEFAULT_LEASE_NAME.into(),
            identity: "a".into(),
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    #[test]
    fn timing_must_close_the_window_before_a_takeover() {
        assert_eq!(config().validate(), Ok(()));
        let mut c = config();
        c.renew_deadline = c.lease_duration;
        assert!(matches!(
            c.validate(),
            Err(LeaderConfigError::DeadlineNotBelowDuration { .. })
        ));
        let mut c = config();
        c.retry_period = c.renew_deadline;
        assert!(matches!(
            c.validate(),
            Err(LeaderConfigError::RetryNotBelowDeadline { .. })
        ));
        let mut c = config();
        c.identity = " ".into();
        assert_eq!(c.validate(), Err(LeaderConfigError::EmptyIdentity));
    }

    #[test]
    fn the_acting_window_closes_by_itself() {
        let leadership = Leadership::follower();
        assert!(!leadership.is_leading());
        leadership.open_until(Mono::now() + Duration::from_millis(30));
        assert!(leadership.is_leading());
        std::thread::sleep(Duration::from_millis(40));
        assert!(!leadership.is_leading(), "no renewal: the window closed");
        assert!(Leadership::always().is_leading());
    }

    #[test]
    fn identities_are_unique_per_process_start() {
        let (a, b) = (default_identity(), default_identity());
        assert_ne!(a, b);
        assert!(a.contains('_'));
    }

    #[test]
    fn renew_time_is_rfc3339_with_microseconds() {
        let t = now_micro();
        assert!(t.ends_with('Z') && t.contains('T'), "{t}");
        assert_eq!(t.split('.').nth(1).map(|f| f.len()), Some(7), "{t}");
    }
}
