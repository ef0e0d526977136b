//! What a NodePublishVolume asks of the volume lock, read from the request: the pod's
//! UID, a volume_context that may not contradict the volume's own parameters, and how
//! long an `onConflict: wait` publish may wait (from the call's gRPC deadline).

use std::collections::HashMap;
use std::time::Duration;

use holdfast_core::backend::VolumeParams;
use holdfast_core::lease::PodName;
use tonic::metadata::MetadataMap;

use crate::csi::error::NodeError;

/// Where kubelet puts the pod's UID when the CSIDriver has `podInfoOnMount: true`.
pub const POD_UID_KEY: &str = "csi.storage.k8s.io/pod.uid";
/// Where kubelet puts the pod's name and namespace (same `podInfoOnMount`).
pub const POD_NAME_KEY: &str = "csi.storage.k8s.io/pod.name";
pub const POD_NAMESPACE_KEY: &str = "csi.storage.k8s.io/pod.namespace";
/// onConflict=wait without a gRPC deadline waits this long.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
/// onConflict=wait never waits longer than this, whatever the deadline.
pub const MAX_WAIT: Duration = Duration::from_secs(120);

/// The volume context may repeat the volume's own parameters (the controller returns
/// them as volume_context) but never contradict them: the metadata written at
/// CreateVolume is what holds, so that no request can turn locking off.
pub fn check_context(
    params: &VolumeParams,
    context: &HashMap<String, String>,
) -> Result<(), NodeError> {
    for (key, stored) in params.to_context() {
        if let Some(given) = context.get(&key) {
            if *given != stored {
                return Err(NodeError::ContextMismatch {
                    key,
                    given: given.clone(),
                    stored,
                });
            }
        }
    }
    Ok(())
}

/// The pod's UID. Missing is FAILED_PRECONDITION, not INVALID_ARGUMENT: the request is
/// valid CSI (volume_context is optional); what is wrong is the cluster's setup — the
/// CSIDriver object must ask kubelet for pod info — and the message says how to fix it.
pub fn pod_uid(volume: &str, context: &HashMap<String, String>) -> Result<String, NodeError> {
    match context
        .get(POD_UID_KEY)
        .filter(|uid| !uid.trim().is_empty())
    {
        Some(uid) => Ok(uid.clone()),
        None => Err(NodeError::MissingPodUid {
            volume: volume.to_string(),
            key: POD_UID_KEY,
        }),
    }
}

/// The pod's namespace and name, recorded on its claim so that a refused pod can be
/// told who holds the volume. Optional: the lock itself is decided by the UID.
pub fn pod_name(context: &HashMap<String, String>) -> Option<PodName> {
    let namespace = context
        .get(POD_NAMESPACE_KEY)
        .filter(|s| !s.trim().is_empty())?;
    let name = context.get(POD_NAME_KEY).filter(|s| !s.trim().is_empty())?;
    Some(PodName {
        namespace: namespace.clone(),
        name: name.clone(),
    })
}

/// The call's remaining deadline from its `grpc-timeout` header (`<digits><unit>`).
pub fn grpc_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let text = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = text.split_at(text.len().checked_sub(1)?);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// How long onConflict=wait may wait: the call's remaining deadline less some slack to
/// mount and answer in time, capped; [`DEFAULT_WAIT`] without a deadline.
pub fn wait_budget(remaining: Option<Duration>) -> Duration {
    match remaining {
        None => DEFAULT_WAIT,
        Some(left) => {
            let slack = (left / 5).min(Duration::from_secs(2));
            left.saturating_sub(slack).min(MAX_WAIT)
        }
    }
}
