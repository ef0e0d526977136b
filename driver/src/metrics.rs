//! The node plugin's Prometheus metrics (prometheus-client), served on `/metrics` by
//! [`holdfast_core::metrics_http`] when `--metrics-address` is set. Series (all
//! prefixed `holdfast_node_`):
//!
//! | name | type | labels |
//! |---|---|---|
//! | `publishes_total` | counter | none: every NodePublishVolume answered, granted or not |
//! | `publishes_refused_total` | counter | `reason`: `held_elsewhere`, `held_on_this_node`, `lease_unavailable`, `node_fenced`, `epoch_superseded`, `fenced`, `invalid`, `error` |
//! | `claims` | gauge | `state`: `held` (gate open), `fenced` (gate stopped: I/O refused) |
//! | `session_live` | gauge | 1 while this node's session is proven renewed, else 0 |
//!
//! A publish is counted once, when NodePublishVolume answers: an `onConflict: wait`
//! publish that retries counts only its final answer. The gauges are read from the
//! [`ClaimBook`] at each scrape.

use std::sync::{Arc, LazyLock, OnceLock};

use holdfast_core::clock::Mono;
use holdfast_core::metrics_http::Render;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::csi::error::NodeError;
use crate::lock::claims::ClaimBook;

type Label = [(&'static str, &'static str); 1];

struct Metrics {
    registry: Registry,
    publishes: Counter,
    refused: Family<Label, Counter>,
    claims: Family<Label, Gauge>,
    session_live: Gauge,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("holdfast_node");
        let publishes = Counter::default();
        registry.register(
            "publishes",
            "NodePublishVolume calls answered, granted or refused",
            publishes.clone(),
        );
        let refused = Family::<Label, Counter>::default();
        registry.register(
            "publishes_refused",
            "NodePublishVolume calls refused, by reason (counted once per call, not per retry)",
            refused.clone(),
        );
        let claims = Family::<Label, Gauge>::default();
        registry.register(
            "claims",
            "Claims this node holds, by state: held (gate open) or fenced (I/O stopped)",
            claims.clone(),
        );
        let session_live = Gauge::default();
        registry.register(
            "session_live",
            "1 while this node's lease session is proven renewed, else 0",
            session_live.clone(),
        );
        Metrics {
            registry,
            publishes,
            refused,
            claims,
            session_live,
        }
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The `reason` label of a refused publish.
pub fn refusal_reason(error: &NodeError) -> &'static str {
    match error {
        NodeError::Held { .. } => "held_elsewhere",
        NodeError::HeldOnThisNode { .. } => "held_on_this_node",
        NodeError::LeaseUnavailable { .. } => "lease_unavailable",
        NodeError::NodeFenced { .. } => "node_fenced",
        NodeError::EpochSuperseded { .. } => "epoch_superseded",
        NodeError::Fenced { .. } => "fenced",
        NodeError::MissingPodUid { .. }
        | NodeError::VolumeContext(_)
        | NodeError::ContextMismatch { .. } => "invalid",
        _ => "error",
    }
}

/// One NodePublishVolume answered: granted (`None`) or refused for `reason`.
pub fn count_publish(refused: Option<&'static str>) {
    METRICS.publishes.inc();
    if let Some(reason) = refused {
        METRICS.refused.get_or_create(&[("reason", reason)]).inc();
    }
}

/// The registry in the Prometheus text format, its gauges read from `book` now (none
/// yet before the session started: `session_live` 0, no `claims`).
pub fn render(book: Option<&ClaimBook>) -> String {
    let now = Mono::now();
    let Some(book) = book else {
        METRICS.session_live.set(0);
        return encoded();
    };
    let (mut held, mut fenced) = (0i64, 0i64);
    for claim in book.snapshot() {
        match claim.gate.stopped_at(now) {
            None => held += 1,
            Some(_) => fenced += 1,
        }
    }
    for (state, count) in [("held", held), ("fenced", fenced)] {
        METRICS.claims.get_or_create(&[("state", state)]).set(count);
    }
    let live = book.session().deadline().is_live_at(now);
    METRICS.session_live.set(i64::from(live));
    encoded()
}

fn encoded() -> String {
    let mut text = String::new();
    encode(&mut text, &METRICS.registry).expect("writing to a String cannot fail");
    text
}

/// What [`holdfast_core::metrics_http::serve`] answers `/metrics` with: `book` is set
/// once the session has started.
pub fn renderer(book: Arc<OnceLock<Arc<ClaimBook>>>) -> Render {
    Arc::new(move || render(book.get().map(|b| b.as_ref())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_are_counted_by_reason() {
        let held = NodeError::Held {
            volume: "v".into(),
            pod: "p".into(),
            node: "n".into(),
            until: "u".into(),
        };
        assert_eq!(refusal_reason(&held), "held_elsewhere");
        assert_eq!(refusal_reason(&NodeError::Task("x".into())), "error");
        count_publish(Some(refusal_reason(&held)));
        count_publish(None);
        // Other tests of this binary publish too: the figures are theirs as well.
        let text = render(None);
        for needle in [
            "holdfast_node_publishes_refused_total{reason=\"held_elsewhere\"} ",
            "holdfast_node_publishes_total ",
            "holdfast_node_session_live 0",
        ] {
            assert!(text.contains(needle), "{needle} not in:\n{text}");
        }
    }
}
