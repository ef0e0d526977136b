//! The controller as a process: volumes outlive it, SIGTERM stops it cleanly.

mod common;

use common::*;
use holdfast_core::csi::v1::volume_capability::access_mode::Mode;
use holdfast_core::csi::v1::*;

#[tokio::test]
async fn restart_keeps_volumes_and_publications() {
    let mut fx = Fixture::start().await;
    let mut c = fx.client().await;
    let a = c
        .create_volume(create_request("pvc-a"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    let b = c
        .create_volume(create_request("pvc-b"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    c.controller_publish_volume(ControllerPublishVolumeRequest {
        volume_id: a.volume_id.clone(),
        node_id: "n1".into(),
        volume_capability: Some(mount_cap(Mode::SingleNodeWriter)),
        ..Default::default()
    })
    .await
    .unwrap();
    drop(c);
    assert!(fx.process.terminate().await.success());

    fx.process = ControllerProcess::start(&fx.root(), &fx.dir.path().join("c.sock")).await;
    let mut c = fx.client().await;
    let listed = c
        .list_volumes(ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut ids: Vec<String> = listed
        .entries
        .iter()
        .map(|e| e.volume.as_ref().unwrap().volume_id.clone())
        .collect();
    ids.sort();
    let mut expected = vec![a.volume_id.clone(), b.volume_id.clone()];
    expected.sort();
    assert_eq!(ids, expected);
    let got = c
        .controller_get_volume(ControllerGetVolumeRequest {
            volume_id: a.volume_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got.status.unwrap().published_node_ids,
        vec!["n1".to_string()]
    );
    // CreateVolume after the restart is still an idempotent retry.
    let again = c
        .create_volume(create_request("pvc-a"))
        .await
        .unwrap()
        .into_inner()
        .volume
        .unwrap();
    assert_eq!(again, a);
}

#[tokio::test]
async fn sigterm_stops_cleanly_and_removes_the_socket() {
    let mut fx = Fixture::start().await;
    let socket = fx.process.socket.clone();
    assert!(socket.exists());
    let status = fx.process.terminate().await;
    assert!(status.success(), "{status}");
    assert!(!socket.exists(), "socket left behind");
}

#[tokio::test]
async fn bad_command_lines_fail_fast() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_holdfast-controller"))
            .args(args)
            .env_remove("CSI_ENDPOINT")
            .env_remove("HOLDFAST_BACKEND_ROOT")
            .output()
            .unwrap()
    };
    let missing_root = dir.path().join("nope");
    let endpoint = format!("--endpoint=unix://{}/c.sock", dir.path().display());
    let out = run(&[
        &endpoint,
        &format!("--backend-root={}", missing_root.display()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend root"));
    let out = run(&[
        "--endpoint=tcp://0.0.0.0:1",
        &format!("--backend-root={}", dir.path().display()),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unix"));
    let out = run(&[&endpoint]);
    assert!(!out.status.success(), "--backend-root is required");
}
