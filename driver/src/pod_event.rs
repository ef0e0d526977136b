//! The core/v1 Events the node plugin posts on a pod: the plugin acted on the pod's
//! volume on its own (a released claim, a dead data path), and `kubectl describe pod` is
//! where that pod's user looks. core/v1 rather than events.k8s.io/v1, so that kubelet
//! v1.20's `describe` shows them.

use holdfast_core::lease::PodName;
use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

/// The Events' source component.
pub const COMPONENT: &str = "holdfast-driver";

/// Normal (the plugin did what it should) or Warning (the user should look).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// An Event on the pod `pod` with the UID the claim recorded, so that a new pod of the
/// same name is never told about its predecessor's volume.
pub fn pod_event(
    pod: &PodName,
    uid: &str,
    type_: EventType,
    reason: &str,
    message: String,
    node: &str,
) -> Event {
    let now = Time(k8s_openapi::jiff::Timestamp::now());
    Event {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}.", pod.name)),
            namespace: Some(pod.namespace.clone()),
            ..ObjectMeta::default()
        },
        involved_object: ObjectReference {
            api_version: Some("v1".to_string()),
            kind: Some("Pod".to_string()),
            namespace: Some(pod.namespace.clone()),
            name: Some(pod.name.clone()),
            uid: Some(uid.to_string()),
            ..ObjectReference::default()
        },
        reason: Some(reason.to_string()),
        message: Some(message),
        type_: Some(format!("{type_:?}")),
        source: Some(EventSource {
            component: Some(COMPONENT.to_string()),
            host: Some(node.to_string()),
        }),
        reporting_component: Some(COMPONENT.to_string()),
        reporting_instance: Some(node.to_string()),
        first_timestamp: Some(now.clone()),
        last_timestamp: Some(now),
        count: Some(1),
        ..Event::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_event_names_the_recorded_pod() {
        let pod = PodName {
            namespace: "apps".into(),
            name: "db-0".into(),
        };
        let event = pod_event(
            &pod,
            "uid-1",
            EventType::Warning,
            "VolumeDataPathLost",
            "m".into(),
            "node-a",
        );
        assert_eq!(event.involved_object.uid.as_deref(), Some("uid-1"));
        assert_eq!(event.involved_object.name.as_deref(), Some("db-0"));
        assert_eq!(event.involved_object.kind.as_deref(), Some("Pod"));
        assert_eq!(event.metadata.namespace.as_deref(), Some("apps"));
        assert_eq!(event.metadata.generate_name.as_deref(), Some("db-0."));
        assert_eq!(event.type_.as_deref(), Some("Warning"));
        assert_eq!(event.reason.as_deref(), Some("VolumeDataPathLost"));
        assert_eq!(event.source.and_then(|s| s.host).as_deref(), Some("node-a"));
        let normal = pod_event(&pod, "u", EventType::Normal, "R", "m".into(), "n");
        assert_eq!(normal.type_.as_deref(), Some("Normal"));
    }
}
