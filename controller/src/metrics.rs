//! The controller's Prometheus metrics (prometheus-client), served on `/metrics` by
//! [`holdfast_core::metrics_http`] (shared with the node plugin).
//!
//! One registry per process ([`metrics`]): the attach gate, the node watch, the leader
//! elector and the store wrapper each bump their own series; nothing here decides
//! anything. Series (all prefixed `holdfast_controller_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `fences_total` | counter | `cause`: `out_of_service_taint` |
//! | `fences_lifted_total` | counter | `cause` |
//! | `attaches_refused_total` | counter | `reason`: `held_elsewhere`, `store_unavailable`, `store_error`, `epoch_regressed` |
//! | `leader` | gauge | 1 while this replica acts, else 0 |
//! | `watch_restarts_total` | counter | `resource`: `nodes` (a re-list after the first, or a watch error) |
//! | `store_call_seconds` | histogram | `op`, `outcome` (`ok`, `conflict`, `unavailable`, `error`) |
//! | `claims` | gauge | `state`: `held`, `released`, `fenced`, `expired` (held, holder's lease judged expired); set by the leader's expiry sweep, absent on followers |
//! | `takeover_seconds` | histogram | none: see [`observe_takeover`] |

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::sync::watch;

type Label = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];

#[derive(Clone)]
struct Buckets;

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        // 0.5 ms … ~8 s: an etcd round trip to a store call at its timeout.
        Histogram::new(exponential_buckets(0.0005, 2.0, 15))
    }
}

#[derive(Clone)]
struct TakeoverBuckets;

impl MetricConstructor<Histogram> for TakeoverBuckets {
    fn new_metric(&self) -> Histogram {
        // 0.25 s … ~17 min: a takeover waits at least W (17 s by default), and a
        // replacement pod may take minutes to be scheduled and started.
        Histogram::new(exponential_buckets(0.25, 2.0, 13))
    }
}

/// Every series the controller exports.
pub struct Metrics {
    registry: Registry,
    fences: Family<Label, Counter>,
    fences_lifted: Family<Label, Counter>,
    attaches_refused: Family<Label, Counter>,
    leader: Gauge,
    watch_restarts: Family<Label, Counter>,
    store_calls: Family<Labels2, Histogram, Buckets>,
    claims: Family<Label, Gauge>,
    takeovers: Histogram,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("holdfast_controller");
        let fences = Family::<Label, Counter>::default();
        registry.register(
            "fences",
            "Nodes this controller fenced, by cause",
            fences.clone(),
        );
        let fences_lifted = Family::<Label, Counter>::default();
        registry.register(
            "fences_lifted",
            "Node fences this controller lifted, by the cause they were made for",
            fences_lifted.clone(),
        );
        let attaches_refused = Family::<Label, Counter>::default();
        registry.register(
            "attaches_refused",
            "ControllerPublishVolume calls the attach gate refused, by reason",
            attaches_refused.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica is the elected leader and acts, else 0",
            leader.clone(),
        );
        let watch_restarts = Family::<Label, Counter>::default();
        registry.register(
            "watch_restarts",
            "Kubernetes watches re-listed or failed, by resource",
            watch_restarts.clone(),
        );
        let store_calls = Family::new_with_constructor(Buckets);
        registry.register(
            "store_call_seconds",
            "Lease store call latency, by operation and outcome",
            store_calls.clone(),
        );
        let claims = Family::<Label, Gauge>::default();
        registry.register(
            "claims",
            "Volume claims by state, as the leader's last expiry sweep read them; expired: \
             held, but the holder's lease expired on this controller's clock",
            claims.clone(),
        );
        let takeovers = TakeoverBuckets.new_metric();
        registry.register(
            "takeover_seconds",
            "Claims taken over after their holder's lease expired: seconds from this \
             controller's first sighting of the holder's last session version to its first \
             sighting of the new holder (resolution: the expiry sweep interval)",
            takeovers.clone(),
        );
        Metrics {
            registry,
            claims,
            takeovers,
            fences,
            fences_lifted,
            attaches_refused,
            leader,
            watch_restarts,
            store_calls,
        }
    }

    /// The registry in the Prometheus text format.
    pub fn render(&self) -> String {
        let mut text = String::new();
        encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// This process's metrics.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

pub fn count_fence(cause: &'static str) {
    metrics().fences.get_or_create(&[("cause", cause)]).inc();
}

pub fn count_fence_lifted(cause: &'static str) {
    metrics()
        .fences_lifted
        .get_or_create(&[("cause", cause)])
        .inc();
}

pub fn count_attach_refused(reason: &'static str) {
    metrics()
        .attaches_refused
        .get_or_create(&[("reason", reason)])
        .inc();
}

pub fn set_leader(leading: bool) {
    metrics().leader.set(i64::from(leading));
}

pub fn count_watch_restart(resource: &'static str) {
    metrics()
        .watch_restarts
        .get_or_create(&[("resource", resource)])
        .inc();
}

pub fn observe_store_call(op: &'static str, outcome: &'static str, seconds: f64) {
    metrics()
        .store_calls
        .get_or_create(&[("op", op), ("outcome", outcome)])
        .observe(seconds);
}

/// Sets the `claims` gauge from one sweep.
pub fn set_claims(held: usize, released: usize, fenced: usize, expired: usize) {
    for (state, count) in [
        ("held", held),
        ("released", released),
        ("fenced", fenced),
        ("expired", expired),
    ] {
        let count = i64::try_from(count).unwrap_or(i64::MAX);
        metrics()
            .claims
            .get_or_create(&[("state", state)])
            .set(count);
    }
}

/// Removes the `claims` gauge: a replica that does not lead does not sweep, and its
/// last figures would be stale.
pub fn clear_claims() {
    metrics().claims.clear();
}

/// One takeover, in seconds. Counted only for claims whose holder this controller had
/// judged expired (unrenewed for `W` on its clock) while still holding, so that a
/// release or a fence is never mistaken for one; measured from the first sighting of
/// the holder's last session version (the start of its silence as seen from here) to
/// the first sighting of the new holder, both at sweep granularity. It therefore
/// includes the `W` the new holder's node had to wait, and the time its pod took to
/// reach NodePublishVolume.
pub fn observe_takeover(seconds: f64) {
    metrics().takeovers.observe(seconds);
}

/// `--metrics-address`: `:9809` (every interface), `host:port`, or empty / `0` for off.
pub use holdfast_core::metrics_http::parse_address;

/// Binds `address` now (so a taken port stops the controller at start, naming it), and
/// serves `GET /metrics` on it until `stop` turns true.
pub async fn serve(
    address: SocketAddr,
    stop: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    holdfast_core::metrics_http::serve(address, Arc::new(|| metrics().render()), stop).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_render_with_their_labels() {
        count_attach_refused("held_elsewhere");
        count_fence("out_of_service_taint");
        set_leader(true);
        observe_store_call("get_claim", "ok", 0.001);
        let text = metrics().render();
        for needle in [
            "holdfast_controller_attaches_refused_total{reason=\"held_elsewhere\"}",
            "holdfast_controller_fences_total{cause=\"out_of_service_taint\"}",
            "holdfast_controller_leader 1",
            "holdfast_controller_store_call_seconds_bucket{le=\"0.001\",op=\"get_claim\",outcome=\"ok\"}",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
    }
}
