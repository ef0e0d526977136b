//! Reads the attach gate's refusal back out of a VolumeAttachment's
//! `status.attachError.message`, where the external-attacher wrote it
//! (`rpc error: code = FailedPrecondition desc = <the gate's message>`).
//!
//! Why the VolumeAttachment and not the gate's memory: the attacher sidecar elects its
//! own leader, so the replica whose gate refused an attach need not be the holdfast
//! leader that publishes Events. The VolumeAttachment's status is the one record every
//! replica sees, and it is exactly what `kubectl describe volumeattachment` shows. The
//! parser reads the text [`crate::csi::gate::AttachRefused`] writes; a unit test formats
//! refusals with that type and parses them back, so the two cannot drift apart silently.

use std::time::Duration;

/// What a refusal said, as far as the Events need it.
#[derive(Clone, Debug, PartialEq)]
pub struct Refusal {
    pub volume: String,
    /// The holder pod as the gate named it: `namespace/name (uid U)`, or the UID alone.
    pub pod: String,
    pub node: String,
    /// How long until the holder's lease can expire if unrenewed; `None`: it cannot
    /// expire by timeout (only a release or a fence frees the volume).
    pub expires_in: Option<Duration>,
}

const HELD_BY: &str = " is held by pod ";
const ON_NODE: &str = " on node ";
const EPOCH: &str = " (claim epoch ";
const EXPIRES: &str = "its lease can expire in ";

/// The refusal in an attach error message, or `None` when the message is not the gate's
/// (a store error, a timeout, another driver's text).
pub fn parse(message: &str) -> Option<Refusal> {
    let held = message.find(HELD_BY)?;
    // "volume <id>" right before; ids have no spaces.
    let volume = message[..held].rsplit_once("volume ")?.1;
    if volume.is_empty() || volume.contains(char::is_whitespace) {
        return None;
    }
    let rest = &message[held + HELD_BY.len()..];
    let on = rest.find(ON_NODE)?;
    let pod = &rest[..on];
    let rest = &rest[on + ON_NODE.len()..];
    let node = &rest[..rest.find(EPOCH)?];
    if pod.is_empty() || node.is_empty() || node.contains(char::is_whitespace) {
        return None;
    }
    let expires_in = rest.find(EXPIRES).and_then(|at| {
        let seconds = &rest[at + EXPIRES.len()..];
        let end = seconds.find('s')?;
        let value: f64 = seconds[..end].parse().ok()?;
        (value.is_finite() && value >= 0.0).then(|| Duration::from_secs_f64(value))
    });
    Some(Refusal {
        volume: volume.to_string(),
        pod: pod.to_string(),
        node: node.to_string(),
        expires_in,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csi::gate::AttachRefused;
    use holdfast_core::lease::{Holder, PodName};

    fn refused(pod: Option<PodName>, expires_in: Option<Duration>) -> AttachRefused {
        AttachRefused {
            volume: "hf-0a1b".into(),
            holder: Holder {
                node: "n1".into(),
                pod_uid: "4f2c-uid".into(),
                instance: "i1".into(),
                pod,
            },
            epoch: 7,
            unrenewed_for: Duration::from_millis(1200),
            expires_in,
        }
    }

    #[test]
    fn reads_back_what_the_gate_writes_through_the_attacher() {
        let named = Some(PodName {
            namespace: "default".into(),
            name: "db-0".into(),
        });
        for (pod, expires, words) in [
            (
                named.clone(),
                Some(Duration::from_millis(2300)),
                "default/db-0 (uid 4f2c-uid)",
            ),
            (None, Some(Duration::from_millis(2300)), "4f2c-uid"),
            (named, None, "default/db-0 (uid 4f2c-uid)"),
        ] {
            let gate = refused(pod, expires).to_string();
            let message = format!("rpc error: code = FailedPrecondition desc = {gate}");
            let parsed = parse(&message).unwrap_or_else(|| panic!("unparsed: {message}"));
            assert_eq!(parsed.volume, "hf-0a1b");
            assert_eq!(parsed.pod, words);
            assert_eq!(parsed.node, "n1");
            assert_eq!(parsed.expires_in, expires, "{message}");
        }
    }

    #[test]
    fn other_errors_are_not_refusals() {
        for message in [
            "",
            "rpc error: code = Unavailable desc = lease store unreachable",
            "rpc error: code = DeadlineExceeded desc = context deadline exceeded",
            "volume  is held by pod x on node n (claim epoch 1)",
        ] {
            assert_eq!(parse(message), None, "{message}");
        }
    }
}
