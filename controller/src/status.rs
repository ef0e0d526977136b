//! `holdfast-controller status`: every volume with a claim — holder pod, node, epoch,
//! what this command can tell of the holder's session, and the expired marks the
//! controller wrote — plus the fences of the nodes named, as a table or JSON
//! (schema [`SCHEMA`], documented in the README).
//!
//! This command is a fresh process: it trusts no other machine's clock and has timed
//! no session before it started. So it says only what it saw itself: the session's
//! `renewals` counter (an age estimate at the holder's cadence of D/3), whether the
//! session record changed during `--observe`, and an upper bound on the time to expiry:
//! if the holder is not renewed again, its lease has certainly expired `W = D·(1+ε) +
//! margin` after this command first saw its current session version (the acquire
//! rule, timed from here).

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::time::Duration;

use holdfast_core::clock::Mono;
use holdfast_core::lease::{ClaimRecord, ClaimState, Epoch, LeaseParams, SessionKey};
use holdfast_core::store::{LeaseStore, Version};
use serde::Serialize;

use crate::admin::{print_json, print_table, state_name};
use crate::args::{OutputFormat, StatusArgs};
use crate::RunError;

/// The `schema` field of the JSON output. Fields may be added under it; none is
/// renamed or removed without a new schema name.
pub const SCHEMA: &str = "holdfast.status/v1";

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct StatusReport {
    pub schema: &'static str,
    /// The timing this command judged sessions by.
    pub lease: LeaseTiming,
    /// How long this command watched the sessions (`--observe`).
    pub observed_ms: u64,
    /// One entry per claim record, sorted by volume.
    pub claims: Vec<ClaimStatus>,
    /// Fence records of the nodes the claims name, sorted by node.
    pub fences: Vec<FenceStatus>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LeaseTiming {
    pub duration_ms: u64,
    pub epsilon: f64,
    pub margin_ms: u64,
    /// W = D·(1+ε) + margin.
    pub takeover_wait_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClaimStatus {
    pub volume: String,
    pub state: ClaimState,
    pub epoch: Epoch,
    /// `namespace/name` of the holder (or last holder) pod, when it was recorded.
    pub pod: Option<String>,
    pub pod_uid: String,
    pub node: String,
    /// The session instance the claim hangs off.
    pub instance: String,
    /// A fence record names the holder's node.
    pub node_fenced: bool,
    /// The holder's session as this command saw it; only for held claims.
    pub session: Option<SessionStatus>,
    /// The controller's expired mark, if it wrote one.
    pub expired: Option<ExpiredStatus>,
}

/// What this command saw of a held claim's holder session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SessionStatus {
    pub liveness: Liveness,
    /// The record's renewal counter (`None`: no record).
    pub renewals: Option<u64>,
    /// `renewals × D/3` at the holder's own D: roughly how long the session has
    /// renewed. An estimate, not a measurement.
    pub age_estimate_ms: Option<u64>,
    /// How long this command saw the current session version unchanged.
    pub unrenewed_for_ms: u64,
    /// Upper bound on the time until the holder's lease has expired if it is not
    /// renewed again: W after this command first saw the current version, less the
    /// time since. 0: expired (or the record is gone).
    pub expires_within_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Liveness {
    /// The session record changed while this command watched: renewed during the
    /// observation.
    Live,
    /// Not seen renewed, but not watched for W either (always so with `--observe=0`).
    Unknown,
    /// Seen unchanged for W: expired by the acquire rule, timed from here.
    Expired,
    /// No session record: its owner can no longer write.
    Gone,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExpiredStatus {
    /// The controller's estimate of when the holder had self-fenced by (its wall clock).
    pub at_unix_ms: u64,
    /// The same instant as RFC 3339 UTC.
    pub at: String,
    pub observed_by: String,
    pub session_renewals: u64,
    /// The session renewed after the mark was written (or the mark names an older
    /// renewal than the record shows): the mark no longer holds.
    pub stale: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FenceStatus {
    pub node: String,
    pub reason: String,
}

/// The sessions read during the observation: per session, the first version this
/// command read and when it first read the version it reads now.
#[derive(Default)]
struct Watch {
    first: HashMap<SessionKey, Option<Version>>,
    current: HashMap<SessionKey, (Option<Version>, Mono)>,
}

impl Watch {
    fn read(&mut self, key: &SessionKey, version: Option<Version>, now: Mono) {
        self.first
            .entry(key.clone())
            .or_insert_with(|| version.clone());
        let entry = self
            .current
            .entry(key.clone())
            .or_insert_with(|| (version.clone(), now));
        if entry.0 != version {
            *entry = (version, now);
        }
    }

    fn renewed(&self, key: &SessionKey) -> bool {
        matches!(
            (self.first.get(key), self.current.get(key)),
            (Some(Some(first)), Some((Some(now), _))) if first != now
        )
    }
}

/// Reads every claim, watches the held claims' sessions for `args.observe`, and reads
/// the claims again for the report.
pub async fn status(
    store: &dyn LeaseStore,
    params: &LeaseParams,
    args: &StatusArgs,
) -> Result<StatusReport, RunError> {
    let start = Mono::now();
    let mut watch = Watch::default();
    let held = held_sessions(&list(store, args).await?);
    read_sessions(store, &held, &mut watch).await?;
    // A renewal lands every D/3; reading ten times as often sees each one.
    let poll =
        (params.renew_interval() / 10).clamp(Duration::from_millis(20), Duration::from_secs(1));
    while Mono::now().since(start) < args.observe {
        let left = args.observe.saturating_sub(Mono::now().since(start));
        tokio::time::sleep(poll.min(left)).await;
        read_sessions(store, &held, &mut watch).await?;
    }
    let observed = Mono::now().since(start);
    let claims = list(store, args).await?;
    // Sessions of claims held since the first listing are read once more.
    read_sessions(store, &held_sessions(&claims), &mut watch).await?;
    let mut sessions = HashMap::new();
    for key in held_sessions(&claims) {
        if let Some(s) = store.get_session(&key).await? {
            sessions.insert(key, s.value);
        }
    }
    let mut fences = BTreeMap::new();
    for claim in &claims {
        let node = &claim.holder.node;
        if !fences.contains_key(node) {
            let fence = store.get_fence(node).await?.map(|f| f.value.reason);
            fences.insert(node.clone(), fence);
        }
    }
    let now = Mono::now();
    let w = params.takeover_wait();
    let rows = claims
        .into_iter()
        .map(|c| {
            let key = c.holder.session();
            let session = (c.state == ClaimState::Held).then(|| {
                let record = sessions.get(&key);
                let since = watch.current.get(&key).map_or(now, |(_, t)| *t);
                let unrenewed = now.since(since);
                let liveness = match record {
                    None => Liveness::Gone,
                    Some(_) if unrenewed >= w => Liveness::Expired,
                    Some(_) if watch.renewed(&key) => Liveness::Live,
                    Some(_) => Liveness::Unknown,
                };
                let expires_within = match liveness {
                    Liveness::Gone | Liveness::Expired => Duration::ZERO,
                    _ => w.saturating_sub(unrenewed),
                };
                SessionStatus {
                    liveness,
                    renewals: record.map(|r| r.renewals),
                    age_estimate_ms: record.map(|r| r.renewals * r.duration_ms / 3),
                    unrenewed_for_ms: millis(unrenewed),
                    expires_within_ms: millis(expires_within),
                }
            });
            let expired = c.expired.as_ref().map(|m| ExpiredStatus {
                at_unix_ms: m.at_unix_ms,
                at: rfc3339(m.at_unix_ms),
                observed_by: m.observed_by.clone(),
                session_renewals: m.session_renewals,
                stale: c.state == ClaimState::Held
                    && sessions
                        .get(&key)
                        .is_some_and(|s| s.renewals != m.session_renewals),
            });
            ClaimStatus {
                node_fenced: fences.get(&c.holder.node).is_some_and(Option::is_some),
                pod: c.holder.pod.as_ref().map(ToString::to_string),
                volume: c.volume_id,
                state: c.state,
                epoch: c.epoch,
                pod_uid: c.holder.pod_uid,
                node: c.holder.node,
                instance: c.holder.instance,
                session,
                expired,
            }
        })
        .collect();
    Ok(StatusReport {
        schema: SCHEMA,
        lease: LeaseTiming {
            duration_ms: millis(params.duration),
            epsilon: params.epsilon,
            margin_ms: millis(params.margin),
            takeover_wait_ms: millis(w),
        },
        observed_ms: millis(observed),
        claims: rows,
        fences: fences
            .into_iter()
            .filter_map(|(node, reason)| reason.map(|reason| FenceStatus { node, reason }))
            .collect(),
    })
}

async fn list(store: &dyn LeaseStore, args: &StatusArgs) -> Result<Vec<ClaimRecord>, RunError> {
    let mut claims: Vec<ClaimRecord> = store
        .list_claims()
        .await?
        .into_iter()
        .map(|c| c.value)
        .filter(|c| args.node.as_ref().is_none_or(|n| &c.holder.node == n))
        .collect();
    claims.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
    Ok(claims)
}

fn held_sessions(claims: &[ClaimRecord]) -> Vec<SessionKey> {
    let mut keys: Vec<SessionKey> = claims
        .iter()
        .filter(|c| c.state == ClaimState::Held)
        .map(|c| c.holder.session())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

async fn read_sessions(
    store: &dyn LeaseStore,
    keys: &[SessionKey],
    watch: &mut Watch,
) -> Result<(), RunError> {
    for key in keys {
        let version = store.get_session(key).await?.map(|s| s.version);
        // Read after the answer: a version first seen now was written before now.
        watch.read(key, version, Mono::now());
    }
    Ok(())
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `2026-11-26T10:40:01.250Z` for Unix milliseconds (proleptic Gregorian, UTC).
pub fn rfc3339(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        unix_ms % 1000
    )
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

pub fn print_status(
    out: &mut dyn Write,
    format: OutputFormat,
    report: &StatusReport,
) -> Result<(), RunError> {
    if format == OutputFormat::Json {
        return print_json(out, report);
    }
    let rows = report
        .claims
        .iter()
        .map(|c| {
            let (liveness, age, expires) = match &c.session {
                Some(s) => (
                    liveness_name(s.liveness).to_string(),
                    s.age_estimate_ms
                        .map_or("-".into(), |ms| format!("~{}", seconds(ms))),
                    format!("<={}", seconds(s.expires_within_ms)),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let mut notes = Vec::new();
            if c.node_fenced {
                notes.push("node fenced".to_string());
            }
            if let Some(m) = &c.expired {
                let stale = if m.stale {
                    " (stale: renewed since)"
                } else {
                    ""
                };
                notes.push(format!(
                    "self-fenced by {} [{}]{stale}",
                    m.at, m.observed_by
                ));
            }
            vec![
                c.volume.clone(),
                state_name(c.state).to_string(),
                c.epoch.to_string(),
                c.pod.clone().unwrap_or_else(|| "-".into()),
                c.pod_uid.clone(),
                c.node.clone(),
                liveness,
                age,
                expires,
                if notes.is_empty() {
                    "-".into()
                } else {
                    notes.join("; ")
                },
            ]
        })
        .collect();
    let header = [
        "VOLUME", "STATE", "EPOCH", "POD", "POD UID", "NODE", "SESSION", "AGE", "EXPIRES", "NOTE",
    ];
    print_table(out, &header, rows)?;
    if !report.fences.is_empty() {
        writeln!(out)?;
        let rows = report
            .fences
            .iter()
            .map(|f| vec![f.node.clone(), f.reason.clone()])
            .collect();
        print_table(out, &["FENCED NODE", "REASON"], rows)?;
    }
    writeln!(out)?;
    writeln!(
        out,
        "Sessions watched for {}. SESSION live: renewed while watched; unknown: not seen \
         renewed (watch with --observe, at least D/3 = {}); expired: unchanged for W = {}. \
         EXPIRES: the holder's lease has expired by then at the latest if it is not renewed \
         again. AGE: renewals x D/3, an estimate.",
        seconds(report.observed_ms),
        seconds(report.lease.duration_ms / 3),
        seconds(report.lease.takeover_wait_ms),
    )?;
    Ok(())
}

fn liveness_name(liveness: Liveness) -> &'static str {
    match liveness {
        Liveness::Live => "live",
        Liveness::Unknown => "unknown",
        Liveness::Expired => "expired",
        Liveness::Gone => "gone",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_of_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_689_601_000), "2026-11-26T10:40:01.000Z");
    }

    #[test]
    fn a_version_change_is_a_renewal_and_restarts_the_silence() {
        let key = SessionKey {
            node: "n".into(),
            instance: "i".into(),
        };
        let mut watch = Watch::default();
        let v = |s: &str| Some(Version(s.into()));
        watch.read(&key, v("1"), Mono(Duration::from_secs(1)));
        watch.read(&key, v("1"), Mono(Duration::from_secs(2)));
        assert!(!watch.renewed(&key));
        assert_eq!(watch.current[&key].1, Mono(Duration::from_secs(1)));
        watch.read(&key, v("2"), Mono(Duration::from_secs(3)));
        assert!(watch.renewed(&key));
        assert_eq!(watch.current[&key].1, Mono(Duration::from_secs(3)));
    }
}
