//! The `csi` example client, run as a process against a real CSI server on a unix socket
//! (holdfast's own Identity service, with no Controller or Node service): answers are
//! printed, a Controller that is not served counts as offering nothing, and a failed call
//! prints its gRPC code and message and exits non-zero. The full walkthrough against the
//! node plugin is in the README; the plugin lives in another crate.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use holdfast_core::csi::identity::{IdentityService, Readiness, DRIVER_NAME};
use holdfast_core::csi::serve::{connect_unix, serve_unix, Endpoint};
use tokio::sync::oneshot;
use tonic::transport::Server;

/// Builds the example (a no-op when it is up to date) and returns its path, beside this
/// test binary's `deps/` directory. `--workspace` resolves features as `cargo test
/// --workspace` does, so that run's artifacts are reused instead of rebuilt.
fn csi_binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        let mut cargo = holdfast_core::testkit::cargo::cargo_command();
        let status = cargo
            .args(["build", "--quiet", "--workspace", "--example", "csi"])
            .status()
            .expect("cargo runs");
        assert!(status.success(), "building the csi example failed");
        let exe = std::env::current_exe().unwrap();
        let profile_dir = exe.parent().and_then(Path::parent).unwrap();
        profile_dir.join("examples").join("csi")
    })
}

async fn csi(args: &[&str]) -> Output {
    tokio::process::Command::new(csi_binary())
        .args(args)
        .env_remove("CSI_ENDPOINT")
        .output()
        .await
        .expect("the csi example runs")
}

/// Serves the Identity service alone on `path` until the returned sender is dropped.
async fn serve_identity_only(path: &Path) -> oneshot::Sender<()> {
    let endpoint = Endpoint::parse(path.to_str().unwrap()).unwrap();
    let readiness = Readiness::new();
    readiness.set(true);
    let router =
        Server::builder().add_service(IdentityService::new(false, readiness).into_server());
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        serve_unix(&endpoint, router, async {
            let _ = stopped.await;
        })
        .await
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while connect_unix(path).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "server at {path:?} never came up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn info_prints_the_identity_and_fails_with_the_code_of_the_missing_node_service() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let _server = serve_identity_only(&socket).await;
    let endpoint = format!("unix://{}", socket.display());

    let out = csi(&["--endpoint", &endpoint, "info"]).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(
        stdout.contains(&format!("plugin:      {DRIVER_NAME} ")),
        "{stdout}"
    );
    assert!(stdout.contains("ready:       true"), "{stdout}");
    // No Controller is served here: UNIMPLEMENTED means "offers nothing", not a failure.
    assert!(stdout.contains("controller:  none"), "{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stderr.contains("error: NodeGetInfo failed: UNIMPLEMENTED: "),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_failed_controller_call_names_the_rpc_and_its_code() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("csi.sock");
    let _server = serve_identity_only(&socket).await;
    let endpoint = format!("unix://{}", socket.display());

    let out = csi(&["--endpoint", &endpoint, "create", "vol", "--size", "1Gi"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error: CreateVolume failed: UNIMPLEMENTED: "),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_missing_socket_is_reported_with_its_cause() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("unix://{}", dir.path().join("absent.sock").display());

    let out = csi(&["--endpoint", &endpoint, "list"]).await;
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("cannot connect to"), "{stderr}");
    assert!(stderr.contains("No such file or directory"), "{stderr}");
}

#[tokio::test]
async fn bad_arguments_are_refused_before_any_call() {
    // The endpoint does not exist: a usage error must come first, with clap's status 2.
    let endpoint = "unix:///nonexistent/holdfast/csi.sock";
    for args in [
        &["--endpoint", endpoint, "create", "vol", "--size", "1Qi"][..],
        &[
            "--endpoint",
            endpoint,
            "create",
            "vol",
            "--param",
            "novalue",
        ],
        &["--endpoint", endpoint, "publish", "vol", "/tmp/target"],
    ] {
        let out = csi(args).await;
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            text(&out.stderr)
        );
    }
    let out = csi(&["--endpoint", "relative/csi.sock", "list"]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("must be absolute"));
}
