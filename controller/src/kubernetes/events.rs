//! The Events holdfast-controller publishes (events.k8s.io/v1, through kube-runtime's
//! [`Recorder`]): their reasons, their notes, and the one publisher every watch uses.
//!
//! Reasons are CamelCase and stable: users filter on them (`kubectl get events
//! --field-selector reason=VolumeHeldElsewhere`), so a reason is never renamed. The
//! README's table lists them. The [`Recorder`] keeps one Event *series* per object,
//! reason and related object: a refusal the attacher retries twenty times is one Event
//! whose count grows, not twenty. Its note stays the first one of the series (the
//! VolumeAttachment's status always has the latest refusal).
//!
//! Only the leader publishes: every publish asks [`Leadership::is_leading`] right before
//! it writes, as the Node watch does before it fences.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::kubernetes::leader::Leadership;
use crate::kubernetes::refusal::Refusal;

/// The `reportingController` of every Event.
pub const REPORTING_CONTROLLER: &str = "holdfast-controller";

/// Why an Event was published. The string of each is its stable `reason`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// An attach was refused: another node's pod holds the volume (Warning; on the
    /// waiting pod and the PVC).
    VolumeHeldElsewhere,
    /// The out-of-service taint fenced the holder's node and freed its claim (Normal; on
    /// the PVC).
    VolumeReleasedByFence,
    /// A refused attach was granted later: the volume changed hands (Normal; on the new
    /// pod and the PVC).
    VolumeTakenOver,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::VolumeHeldElsewhere => "VolumeHeldElsewhere",
            Reason::VolumeReleasedByFence => "VolumeReleasedByFence",
            Reason::VolumeTakenOver => "VolumeTakenOver",
        }
    }

    fn action(self) -> &'static str {
        match self {
            Reason::VolumeHeldElsewhere | Reason::VolumeTakenOver => "Attach",
            Reason::VolumeReleasedByFence => "Fence",
        }
    }

    fn type_(self) -> EventType {
        match self {
            Reason::VolumeHeldElsewhere => EventType::Warning,
            Reason::VolumeReleasedByFence | Reason::VolumeTakenOver => EventType::Normal,
        }
    }
}

/// "volume V is held by pod P on node N; its lease can expire in S s, or fence node N".
pub fn held_note(refusal: &Refusal) -> String {
    let Refusal {
        volume, pod, node, ..
    } = refusal;
    let when = match refusal.expires_in {
        Some(left) => format!("its lease can expire in {:.1} s", left.as_secs_f64()),
        None => "its lease cannot expire by timeout from here".to_string(),
    };
    format!(
        "volume {volume} is held by pod {pod} on node {node}; {when}, or fence node {node} \
         (`holdfast-controller fence --node {node}`, only if it is down)"
    )
}

/// "node N fenced (out-of-service taint); volume V released".
pub fn fenced_note(node: &str, volume: &str) -> String {
    format!("node {node} fenced (out-of-service taint); volume {volume} released")
}

/// How a taken-over volume was freed, as far as the lease store tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Freed {
    /// The holder's session went unrenewed for the takeover bound.
    LeaseExpired,
    /// The holder's node was fenced, for this reason.
    Fenced { reason: String },
    /// The holder's node released the claim.
    Released,
}

/// "volume V taken over from pod P after its lease expired" (or after its node was
/// fenced, or released it).
pub fn taken_over_note(volume: &str, pod: &str, node: &str, freed: &Freed) -> String {
    let after = match freed {
        Freed::LeaseExpired => "after its lease expired".to_string(),
        Freed::Fenced { reason } => {
            let cause = reason.split(';').next().unwrap_or(reason).trim();
            format!("after node {node} was fenced ({cause})")
        }
        Freed::Released => format!("after node {node} released it"),
    };
    format!("volume {volume} taken over from pod {pod} on node {node} {after}")
}

/// Publishes Events while this replica leads.
#[derive(Clone)]
pub struct Publisher {
    recorder: Recorder,
    leadership: Leadership,
}

impl Publisher {
    /// `instance` names this replica in `reportingInstance` (its leader identity).
    pub fn new(client: kube::Client, instance: String, leadership: Leadership) -> Self {
        let reporter = Reporter {
            controller: REPORTING_CONTROLLER.to_string(),
            instance: Some(instance),
        };
        Publisher {
            recorder: Recorder::new(client, reporter),
            leadership,
        }
    }

    /// Publishes `note` for `reason` on `regarding` (with `related`, e.g. the
    /// VolumeAttachment). A failure is logged, not returned: an Event is a courtesy, and
    /// nothing the controller decides waits on it.
    pub async fn publish(
        &self,
        reason: Reason,
        note: &str,
        regarding: &ObjectReference,
        related: Option<&ObjectReference>,
    ) {
        if !self.leadership.is_leading() {
            return;
        }
        let event = Event {
            type_: reason.type_(),
            reason: reason.as_str().to_string(),
            note: Some(note.to_string()),
            action: reason.action().to_string(),
            secondary: related.cloned(),
        };
        let object = format!(
            "{}/{}/{}",
            regarding.kind.as_deref().unwrap_or_default(),
            regarding.namespace.as_deref().unwrap_or_default(),
            regarding.name.as_deref().unwrap_or_default()
        );
        match self.recorder.publish(&event, regarding).await {
            Ok(()) => tracing::info!(reason = reason.as_str(), %object, note, "event published"),
            Err(error) => {
                tracing::warn!(reason = reason.as_str(), %object, %error, "cannot publish event")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn notes_say_who_holds_what_and_what_frees_it() {
        let refusal = Refusal {
            volume: "hf-1".into(),
            pod: "default/db-0 (uid u1)".into(),
            node: "n1".into(),
            expires_in: Some(Duration::from_millis(2340)),
        };
        assert_eq!(
            held_note(&refusal),
            "volume hf-1 is held by pod default/db-0 (uid u1) on node n1; its lease can \
             expire in 2.3 s, or fence node n1 (`holdfast-controller fence --node n1`, only \
             if it is down)"
        );
        assert_eq!(
            fenced_note("n1", "hf-1"),
            "node n1 fenced (out-of-service taint); volume hf-1 released"
        );
        assert_eq!(
            taken_over_note("hf-1", "default/db-0 (uid u1)", "n1", &Freed::LeaseExpired),
            "volume hf-1 taken over from pod default/db-0 (uid u1) on node n1 after its lease \
             expired"
        );
        let fenced = Freed::Fenced {
            reason: "out-of-service taint (node.kubernetes.io/out-of-service); sessions at \
                     fence: a"
                .into(),
        };
        assert!(taken_over_note("hf-1", "p", "n1", &fenced).ends_with(
            "after node n1 was fenced (out-of-service taint (node.kubernetes.io/out-of-service))"
        ));
        for reason in [
            Reason::VolumeHeldElsewhere,
            Reason::VolumeReleasedByFence,
            Reason::VolumeTakenOver,
        ] {
            let s = reason.as_str();
            assert!(s.chars().next().unwrap().is_ascii_uppercase() && !s.contains(' '));
        }
    }
}
