//! The out-of-service taint on a real kube-apiserver, with the real controller binary
//! watching Nodes and a real etcd lease store in which node sessions (`SessionLease`,
//! D = 1 s) renew and hold claims: the taint fences the node's claims within about a
//! second, the node's session sees its fence and revokes its write deadline (the
//! driver's data path stops on that; its FUSE path is not mounted here), and the
//! controller's attach gate grants the volume to another node; the fence survives a
//! controller restart unrewritten; removing the taint does not lift the fence until
//! the node's plugin starts a new session; a fence made with `holdfast-controller
//! fence` is never lifted by the taint's removal. Figures are printed (`--nocapture`).

mod common;

use std::time::{Duration, Instant};

use common::plane::{wait_for, Plane};
use common::*;
use holdfast_core::clock::Mono;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;
use holdfast_core::lease::ClaimState;

async fn create_volume(process: &ControllerProcess, name: &str) -> String {
    process
        .controller()
        .await
        .create_volume(create_request(name))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap()
        .volume_id
}

async fn attach(
    process: &ControllerProcess,
    volume: &str,
    node: &str,
) -> Result<(), tonic::Status> {
    process
        .controller()
        .await
        .controller_publish_volume(ControllerPublishVolumeRequest {
            volume_id: volume.into(),
            node_id: node.into(),
            volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
            ..Default::default()
        })
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_taint_fences_at_once_and_its_removal_waits_for_a_new_session() {
    let Some(plane) = Plane::start("out_of_service_taint").await else {
        return;
    };
    plane.create_node("n1").await;
    let controller = plane.replica("controller-1").await;
    wait_for(Duration::from_secs(10), "the controller leads", || async {
        (controller.leader_gauge().await? == 1.0).then_some(())
    })
    .await;
    let volume = create_volume(&controller.process, "pvc-taint").await;
    let n1 = plane.session("n1", "n1-old").await;
    n1.acquire(&volume, "pod-a-uid", None).await.unwrap();
    attach(&controller.process, &volume, "n1").await.unwrap();

    // Taint n1: its claim is fenced within about a second.
    plane.set_taint("n1", true).await;
    let (claim, took) = wait_for(Duration::from_secs(5), "n1's claim fenced", || async {
        let claim = plane.store.get_claim(&volume).await.unwrap()?;
        (claim.value.state == ClaimState::Fenced).then_some(claim)
    })
    .await;
    let fence = plane
        .store
        .get_fence("n1")
        .await
        .unwrap()
        .expect("a fence record");
    assert!(
        fence.value.reason.starts_with("out-of-service taint"),
        "{fence:?}"
    );
    assert!(
        fence.value.reason.contains(&n1.key().instance),
        "the fence records the sessions it saw: {fence:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "taint -> claim fenced took {took:?}"
    );
    // The node's plugin sees the fence at its next renewal (D/3) and may not write.
    let (_, seen) = wait_for(
        Duration::from_secs(3),
        "n1's session sees its fence",
        || async { n1.is_fenced().then_some(()) },
    )
    .await;
    assert!(!n1.deadline().is_live_at(Mono::now()), "n1 may still write");
    // Another node may attach it now (once the orchestrator detached it from n1).
    controller
        .process
        .controller()
        .await
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: volume.clone(),
            node_id: "n1".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    attach(&controller.process, &volume, "n2").await.unwrap();
    println!(
        "taint -> claim fenced (epoch {}) in {:.0} ms; n1's session saw the fence {:.0} ms \
         later and revoked its write deadline; attach to n2 granted",
        claim.value.epoch,
        took.as_secs_f64() * 1000.0,
        seen.as_secs_f64() * 1000.0
    );

    // A restarted controller finds the fence and does not rewrite it.
    let mut controller = controller;
    controller.process.kill();
    let controller = plane.replica("controller-2").await;
    wait_for(
        Duration::from_secs(10),
        "the new controller leads",
        || async { (controller.leader_gauge().await? == 1.0).then_some(()) },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = plane.store.get_fence("n1").await.unwrap().unwrap();
    assert_eq!(again.version, fence.version, "the fence was rewritten");

    // Taint removed: the old session is all n1 has, so the fence stays.
    plane.set_taint("n1", false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        plane.store.get_fence("n1").await.unwrap().is_some(),
        "lifted without a new session"
    );
    assert!(
        controller
            .log()
            .contains("has started no session since the fence"),
        "the controller does not say why it keeps the fence:\n{}",
        controller.log()
    );
    // n1's plugin restarts (a new instance): the fence is lifted.
    let restarted = Instant::now();
    let n1_new = plane.session("n1", "n1-new").await;
    let (_, lifted) = wait_for(Duration::from_secs(5), "the fence lifted", || async {
        plane
            .store
            .get_fence("n1")
            .await
            .unwrap()
            .is_none()
            .then_some(())
    })
    .await;
    println!(
        "untaint: fence kept while only the old session existed; lifted {:.0} ms after a new \
         session started",
        lifted.as_secs_f64() * 1000.0
    );
    assert!(restarted.elapsed() < Duration::from_secs(5));
    drop(n1_new);
    drop(n1);
    let body = scrape(controller.metrics_port).await.unwrap();
    assert_eq!(
        series(
            &body,
            "holdfast_controller_fences_lifted_total{cause=\"out_of_service_taint\"}"
        ),
        Some(1.0),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admins_fence_is_never_lifted_by_the_taints_removal() {
    let Some(plane) = Plane::start("out_of_service_admin_fence").await else {
        return;
    };
    plane.create_node("n2").await;
    let controller = plane.replica("controller-1").await;
    wait_for(Duration::from_secs(10), "the controller leads", || async {
        (controller.leader_gauge().await? == 1.0).then_some(())
    })
    .await;
    let old = plane.session("n2", "n2-old").await;

    // The CLI refuses a reason that would pass for the taint's.
    let (ok, out) = plane
        .cli(&["fence", "--node", "n2", "--reason", "out-of-service taint"])
        .await;
    assert!(!ok, "{out}");
    assert!(out.contains("choose another reason"), "{out}");
    let (ok, out) = plane
        .cli(&[
            "fence",
            "--node",
            "n2",
            "--reason",
            "powered off by the agent",
        ])
        .await;
    assert!(ok, "{out}");
    let fence = plane.store.get_fence("n2").await.unwrap().unwrap();

    // Tainted and untainted, with a new session: the admin's fence stays as it was.
    plane.set_taint("n2", true).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    plane.set_taint("n2", false).await;
    let new = plane.session("n2", "n2-new").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = plane.store.get_fence("n2").await.unwrap();
    assert_eq!(after.as_ref(), Some(&fence), "the admin's fence changed");
    assert_eq!(after.unwrap().value.reason, "powered off by the agent");
    drop((old, new));
}
