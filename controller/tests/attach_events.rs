//! The Events that say why a pod waits for its volume, on a real kube-apiserver with the
//! real external-attacher (`csi-attacher`) calling the real controller binary over its
//! CSI socket, and node sessions (`SessionLease`, D = 1 s) holding claims in a real etcd
//! lease store. The test plays the attach/detach controller: it creates the PV, PVC,
//! pods and the VolumeAttachment for the waiting pod's node; everything after that is
//! the attacher's and the controller's.
//!
//! - A live holder elsewhere: the attacher's ControllerPublishVolume is refused again and
//!   again; the waiting pod and the PVC each get one `VolumeHeldElsewhere` Event (a series
//!   whose count grows) naming the holder pod and node, and `kubectl describe` shows it.
//! - The holder's session stops: once its lease expired the attach is granted and the
//!   pod and PVC get `VolumeTakenOver`, "after its lease expired".
//! - The out-of-service taint on a live holder's node: its PVC gets
//!   `VolumeReleasedByFence`, and the waiting pod `VolumeTakenOver` "after node … was
//!   fenced".

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::plane::{wait_for, LogsOnFailure, Plane, NAMESPACE};
use common::*;
use holdfast_core::lease::PodName;
use holdfast_core::testkit::kube::{bins, Identity};
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::{Api, ListParams, PostParams};
use kube::ResourceExt;

const DRIVER: &str = "holdfast.csi.dev";
const APPS: &str = "apps";

/// The external-attacher against `socket`, retrying a refused attach after 200 ms, then
/// backing off to 1 s at most.
struct Attacher(Child);

impl Attacher {
    fn start(binary: &Path, kubeconfig: &Path, socket: &Path, log: &Path) -> Attacher {
        let child = Command::new(binary)
            .arg(format!("--csi-address={}", socket.display()))
            .arg(format!("--kubeconfig={}", kubeconfig.display()))
            .args([
                "--leader-election=false",
                "--timeout=5s",
                "--retry-interval-start=200ms",
                "--retry-interval-max=1s",
                "--v=3",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(log).unwrap()))
            .spawn()
            .expect("start csi-attacher");
        Attacher(child)
    }
}

impl Drop for Attacher {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &object).await.unwrap()
}

/// One exclusive volume as Kubernetes sees it: PV (bound to its PVC) and PVC.
struct Claim {
    volume: String,
    pv: String,
    pvc: PersistentVolumeClaim,
}

async fn claim(plane: &Plane, controller: &ControllerProcess, name: &str) -> Claim {
    let volume = controller
        .controller()
        .await
        .create_volume(create_request(name))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id;
    let client = plane.plane.admin().await;
    let pvc: PersistentVolumeClaim = create(
        &Api::namespaced(client.clone(), APPS),
        serde_json::json!({
            "metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                     "volumeName": format!("pv-{name}"),
                     "resources": {"requests": {"storage": "1Gi"}}},
        }),
    )
    .await;
    let pv = format!("pv-{name}");
    let _: k8s_openapi::api::core::v1::PersistentVolume = create(
        &Api::all(client),
        serde_json::json!({
            "metadata": {"name": pv},
            "spec": {"accessModes": ["ReadWriteOnce"], "capacity": {"storage": "1Gi"},
                     "persistentVolumeReclaimPolicy": "Retain", "storageClassName": "",
                     "csi": {"driver": DRIVER, "volumeHandle": volume},
                     "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                  "namespace": APPS, "name": name, "uid": pvc.uid().unwrap()}},
        }),
    )
    .await;
    Claim { volume, pv, pvc }
}

async fn pod(plane: &Plane, name: &str, node: &str, claim: &str) -> Pod {
    create(
        &Api::namespaced(plane.plane.admin().await, APPS),
        serde_json::json!({
            "metadata": {"name": name},
            "spec": {"nodeName": node, "automountServiceAccountToken": false,
                     "containers": [{"name": "writer", "image": "writer:test"}],
                     "volumes": [{"name": "data",
                                  "persistentVolumeClaim": {"claimName": claim}}]},
        }),
    )
    .await
}

/// The VolumeAttachment the attach/detach controller would create for `pv` on `node`.
async fn attachment(plane: &Plane, pv: &str, node: &str) -> String {
    let name = format!("csi-{pv}-{node}");
    let _: VolumeAttachment = create(
        &Api::all(plane.plane.admin().await),
        serde_json::json!({
            "metadata": {"name": name},
            "spec": {"attacher": DRIVER, "nodeName": node,
                     "source": {"persistentVolumeName": pv}},
        }),
    )
    .await;
    name
}

/// The Events on the object named `name` with `reason` in the `apps` namespace.
async fn events(plane: &Plane, name: &str, reason: &str) -> Vec<Event> {
    let api: Api<Event> = Api::namespaced(plane.plane.admin().await, APPS);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .collect()
}

/// How many times an Event was seen: 1, or its series' count.
fn count(event: &Event) -> i32 {
    event.series.as_ref().map_or(1, |s| s.count)
}

fn kubectl() -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/kube-tools/kubectl");
    path.is_file().then_some(path)
}

async fn start(test: &str) -> Option<(Plane, PathBuf)> {
    let attacher = bins::find_or_skip(test, &["csi-attacher"])?.require("csi-attacher");
    let plane = Plane::start(test).await?;
    plane.plane.ensure_namespace(APPS).await;
    let client = plane.plane.admin().await;
    let _: ServiceAccount = create(
        &Api::namespaced(client.clone(), APPS),
        serde_json::json!({"metadata": {"name": "default"}}),
    )
    .await;
    for node in ["n1", "n2", "n3"] {
        plane.create_node(node).await;
        let _: k8s_openapi::api::storage::v1::CSINode = create(
            &Api::all(client.clone()),
            serde_json::json!({
                "metadata": {"name": node},
                "spec": {"drivers": [{"name": DRIVER, "nodeID": node}]},
            }),
        )
        .await;
    }
    Some((plane, attacher))
}

/// The controller with leader election, the Node watch and the Events on, as the admin.
async fn controller(plane: &Plane, name: &str) -> (ControllerProcess, PathBuf) {
    let mut args = plane.lease_args();
    args.extend([
        "--leader-elect=true".to_string(),
        format!("--leader-elect-namespace={NAMESPACE}"),
        format!("--leader-elect-identity={name}"),
        "--leader-elect-lease-duration=2s".into(),
        "--leader-elect-renew-deadline=1500ms".into(),
        "--leader-elect-retry-period=200ms".into(),
        "--watch-nodes=true".into(),
        "--events=true".into(),
    ]);
    let kubeconfig = plane.plane.kubeconfig(&Identity::Admin);
    let log = plane.path().join(format!("{name}.log"));
    let process = ControllerProcess::start_logged(
        &plane.root(),
        &plane.path().join(format!("{name}.sock")),
        &args,
        &[("KUBECONFIG".into(), kubeconfig.display().to_string())],
        Some(&log),
    )
    .await;
    (process, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_attach_is_told_on_the_pod_and_pvc_once_and_the_takeover_after_expiry() {
    let test = "attach_events_expiry";
    let Some((plane, attacher_bin)) = start(test).await else {
        return;
    };
    let (controller, log) = controller(&plane, "controller-1").await;
    let data = claim(&plane, &controller, "data-db-0").await;
    let holder = pod(&plane, "db-0", "n1", "data-db-0").await;
    let waiting = pod(&plane, "db-0-moved", "n2", "data-db-0").await;
    // n1's plugin holds the volume for db-0 and renews every D/3.
    let n1 = plane.session("n1", "n1").await;
    n1.acquire_for_pod(
        &data.volume,
        &holder.uid().unwrap(),
        Some(PodName {
            namespace: APPS.into(),
            name: "db-0".into(),
        }),
        None,
    )
    .await
    .unwrap();
    let kubeconfig = plane.plane.kubeconfig(&Identity::Admin);
    let _attacher = Attacher::start(
        &attacher_bin,
        &kubeconfig,
        &controller.socket,
        &plane.path().join("attacher.log"),
    );
    let _logs = LogsOnFailure(vec![log.clone(), plane.path().join("attacher.log")]);
    let started = Instant::now();
    let va = attachment(&plane, &data.pv, "n2").await;

    // Refused over and over: one Event series on the pod and one on the PVC.
    let (event, first) = wait_for(
        Duration::from_secs(20),
        "a VolumeHeldElsewhere Event on the waiting pod",
        || async {
            events(&plane, "db-0-moved", "VolumeHeldElsewhere")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let note = event.note.clone().unwrap_or_default();
    let holder_words = format!("pod {APPS}/db-0 (uid {})", holder.uid().unwrap());
    for needle in [
        format!(
            "volume {} is held by {holder_words} on node n1",
            data.volume
        ),
        "its lease can expire in".to_string(),
        "or fence node n1".to_string(),
    ] {
        assert!(note.contains(&needle), "{needle:?} not in {note:?}");
    }
    assert_eq!(event.type_.as_deref(), Some("Warning"));
    assert_eq!(
        event.regarding.as_ref().unwrap().uid,
        waiting.uid(),
        "{event:?}"
    );
    assert_eq!(
        event.related.as_ref().and_then(|r| r.name.as_deref()),
        Some(va.as_str())
    );
    let (pvc_event, _) = wait_for(
        Duration::from_secs(10),
        "a VolumeHeldElsewhere Event on the PVC",
        || async {
            events(&plane, "data-db-0", "VolumeHeldElsewhere")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    assert_eq!(pvc_event.regarding.as_ref().unwrap().uid, data.pvc.uid());
    assert_eq!(pvc_event.note, event.note);
    // The attacher retries (200 ms, 400 ms, 800 ms, 1 s…): the series counts them.
    let (counted, _) = wait_for(
        Duration::from_secs(15),
        "the refusal Event counted 4 times",
        || async {
            let found = events(&plane, "db-0-moved", "VolumeHeldElsewhere").await;
            assert_eq!(found.len(), 1, "one Event per pod and reason: {found:#?}");
            (count(&found[0]) >= 4).then(|| count(&found[0]))
        },
    )
    .await;
    let va_status = Api::<VolumeAttachment>::all(plane.plane.admin().await)
        .get(&va)
        .await
        .unwrap()
        .status
        .unwrap();
    assert!(!va_status.attached);
    let attach_error = va_status.attach_error.unwrap().message.unwrap();
    assert!(attach_error.contains(&holder_words), "{attach_error}");
    println!(
        "first VolumeHeldElsewhere {:.0} ms after the VolumeAttachment; series count {counted}",
        first.as_secs_f64() * 1000.0
    );
    println!("VolumeAttachment status.attachError: {attach_error}");

    // kubectl describe shows the events.k8s.io/v1 Event (v1.20 serves both views).
    if let Some(kubectl) = kubectl() {
        for what in ["pod/db-0-moved", "pvc/data-db-0"] {
            let out = Command::new(&kubectl)
                .arg(format!("--kubeconfig={}", kubeconfig.display()))
                .args(["describe", "-n", APPS, what])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("VolumeHeldElsewhere") && text.contains(&holder_words),
                "kubectl describe {what}:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let events = text.split("Events:").nth(1).unwrap_or_default();
            println!("kubectl describe {what} (Events):{events}");
        }
    } else {
        assert!(
            !bins::required(),
            "no kubectl in target/kube-tools (scripts/setup.sh fetches it)"
        );
    }

    // n1's plugin dies: no renewal. The gate grants after D(1+e)+margin unrenewed.
    let stopped = Instant::now();
    drop(n1);
    let (taken, took) = wait_for(
        Duration::from_secs(15),
        "a VolumeTakenOver Event on the waiting pod",
        || async {
            events(&plane, "db-0-moved", "VolumeTakenOver")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let note = taken.note.clone().unwrap_or_default();
    assert!(
        note.contains(&format!(
            "volume {} taken over from {holder_words} on node n1 after its lease expired",
            data.volume
        )),
        "{note}"
    );
    assert_eq!(taken.type_.as_deref(), Some("Normal"));
    wait_for(
        Duration::from_secs(5),
        "a VolumeTakenOver Event on the PVC",
        || async {
            events(&plane, "data-db-0", "VolumeTakenOver")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let refusals = count(&events(&plane, "db-0-moved", "VolumeHeldElsewhere").await[0]);
    println!(
        "holder stopped -> VolumeTakenOver in {:.0} ms (lease bound {:.0} ms); {refusals} \
         refusals in one Event; whole test {:.1} s",
        took.as_secs_f64() * 1000.0,
        common::plane::params().takeover_wait().as_secs_f64() * 1000.0,
        started.elapsed().as_secs_f64()
    );
    assert!(stopped.elapsed() < Duration::from_secs(15));
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!log.contains("cannot publish event"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_fence_is_told_on_the_pvc_and_the_takeover_names_the_fence() {
    let test = "attach_events_taint";
    let Some((plane, attacher_bin)) = start(test).await else {
        return;
    };
    let (controller, log) = controller(&plane, "controller-1").await;
    let data = claim(&plane, &controller, "data-web-0").await;
    let holder = pod(&plane, "web-0", "n3", "data-web-0").await;
    pod(&plane, "web-0-moved", "n2", "data-web-0").await;
    let n3 = plane.session("n3", "n3").await;
    n3.acquire_for_pod(
        &data.volume,
        &holder.uid().unwrap(),
        Some(PodName {
            namespace: APPS.into(),
            name: "web-0".into(),
        }),
        None,
    )
    .await
    .unwrap();
    let kubeconfig = plane.plane.kubeconfig(&Identity::Admin);
    let _attacher = Attacher::start(
        &attacher_bin,
        &kubeconfig,
        &controller.socket,
        &plane.path().join("attacher.log"),
    );
    let _logs = LogsOnFailure(vec![log.clone(), plane.path().join("attacher.log")]);
    attachment(&plane, &data.pv, "n2").await;
    wait_for(
        Duration::from_secs(20),
        "a VolumeHeldElsewhere Event on the waiting pod",
        || async {
            events(&plane, "web-0-moved", "VolumeHeldElsewhere")
                .await
                .into_iter()
                .next()
        },
    )
    .await;

    // n3 is out of service (its plugin still renews): fenced at once.
    let tainted = Instant::now();
    plane.set_taint("n3", true).await;
    let (fenced, _) = wait_for(
        Duration::from_secs(10),
        "a VolumeReleasedByFence Event on the PVC",
        || async {
            events(&plane, "data-web-0", "VolumeReleasedByFence")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let fence_took = tainted.elapsed();
    assert_eq!(
        fenced.note.as_deref(),
        Some(
            format!(
                "node n3 fenced (out-of-service taint); volume {} released",
                data.volume
            )
            .as_str()
        )
    );
    assert_eq!(fenced.regarding.as_ref().unwrap().uid, data.pvc.uid());
    let (taken, _) = wait_for(
        Duration::from_secs(10),
        "a VolumeTakenOver Event on the waiting pod",
        || async {
            events(&plane, "web-0-moved", "VolumeTakenOver")
                .await
                .into_iter()
                .next()
        },
    )
    .await;
    let note = taken.note.unwrap_or_default();
    assert!(
        note.contains("on node n3 after node n3 was fenced (out-of-service taint"),
        "{note}"
    );
    println!(
        "taint -> VolumeReleasedByFence on the PVC in {:.0} ms, VolumeTakenOver in {:.0} ms",
        fence_took.as_secs_f64() * 1000.0,
        tainted.elapsed().as_secs_f64() * 1000.0
    );
    drop(n3);
    let log = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!log.contains("cannot publish event"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_publishes_and_the_next_leader_carries_on() {
    let test = "attach_events_leader";
    let Some((plane, attacher_bin)) = start(test).await else {
        return;
    };
    let (mut first, _) = controller(&plane, "controller-1").await;
    wait_for(Duration::from_secs(10), "controller-1 leads", || async {
        (plane.leader_holder().await.as_deref() == Some("controller-1")).then_some(())
    })
    .await;
    let (second, second_log) = controller(&plane, "controller-2").await;
    let data = claim(&plane, &first, "data-q-0").await;
    let holder = pod(&plane, "q-0", "n1", "data-q-0").await;
    pod(&plane, "q-0-moved", "n2", "data-q-0").await;
    let n1 = plane.session("n1", "n1").await;
    n1.acquire_for_pod(
        &data.volume,
        &holder.uid().unwrap(),
        Some(PodName {
            namespace: APPS.into(),
            name: "q-0".into(),
        }),
        None,
    )
    .await
    .unwrap();
    // The attacher calls the follower: its gate refuses, the leader tells.
    let _attacher = Attacher::start(
        &attacher_bin,
        &plane.plane.kubeconfig(&Identity::Admin),
        &second.socket,
        &plane.path().join("attacher.log"),
    );
    attachment(&plane, &data.pv, "n2").await;
    wait_for(
        Duration::from_secs(20),
        "the refusal Event counted twice",
        || async {
            let found = events(&plane, "q-0-moved", "VolumeHeldElsewhere").await;
            found.iter().any(|e| count(e) >= 2).then_some(())
        },
    )
    .await;
    let by = |found: &[Event]| -> Vec<String> {
        found
            .iter()
            .map(|e| e.reporting_instance.clone().unwrap_or_default())
            .collect()
    };
    let found = events(&plane, "q-0-moved", "VolumeHeldElsewhere").await;
    assert_eq!(by(&found), ["controller-1"], "{found:#?}");
    assert!(
        !std::fs::read_to_string(&second_log)
            .unwrap_or_default()
            .contains("event published"),
        "the follower published"
    );

    // The leader dies; the follower takes over the Lease and the Events.
    let killed = Instant::now();
    first.kill();
    let (_, failover) = wait_for(
        Duration::from_secs(15),
        "controller-2 tells the refusal",
        || async {
            let found = events(&plane, "q-0-moved", "VolumeHeldElsewhere").await;
            by(&found)
                .contains(&"controller-2".to_string())
                .then_some(())
        },
    )
    .await;
    drop(n1);
    wait_for(
        Duration::from_secs(15),
        "controller-2 tells the takeover",
        || async {
            let found = events(&plane, "q-0-moved", "VolumeTakenOver").await;
            (by(&found) == ["controller-2"]).then_some(())
        },
    )
    .await;
    println!(
        "leader killed -> the next leader's first VolumeHeldElsewhere in {:.0} ms (leader \
         Lease 2 s); its VolumeTakenOver {:.1} s after the kill",
        failover.as_secs_f64() * 1000.0,
        killed.elapsed().as_secs_f64()
    );
}
