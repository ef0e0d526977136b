//! CSI serving over real unix sockets: the Identity service answers through the
//! call-log layer, shutdown removes the socket, and taking over a socket path
//! replaces only a dead socket — never a regular file, never a live server.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use holdfast_core::csi::identity::{IdentityService, Readiness, DRIVER_NAME};
use holdfast_core::csi::serve::{
    connect_unix, serve_unix, shutdown_signal, CsiCallLog, Endpoint, ServeError,
};
use holdfast_core::csi::v1::identity_client::IdentityClient;
use holdfast_core::csi::v1::node_client::NodeClient;
use holdfast_core::csi::v1::plugin_capability::{self, service, volume_expansion};
use holdfast_core::csi::v1::{
    GetPluginCapabilitiesRequest, GetPluginInfoRequest, NodeGetInfoRequest, ProbeRequest,
};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::Server;

const WAIT: Duration = Duration::from_secs(10);

/// Log lines from every test in this binary, via one global subscriber.
fn log_text() -> String {
    String::from_utf8(captured().lock().unwrap().clone()).unwrap()
}

fn captured() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        tracing_subscriber::fmt()
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        buf
    })
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl io::Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), ServeError>>,
}

impl Running {
    async fn stop(self) -> Result<(), ServeError> {
        let _ = self.stop.send(());
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("server did not stop in time")
            .expect("server task panicked")
    }
}

/// Starts the Identity service (behind the call-log layer) on `path`.
fn start(path: &Path, readiness: Readiness) -> Running {
    captured();
    let endpoint = Endpoint::parse(path.to_str().unwrap()).unwrap();
    let router = Server::builder()
        .layer(CsiCallLog)
        .add_service(IdentityService::new(true, readiness).into_server());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        serve_unix(&endpoint, router, async {
            let _ = stopped.await;
        })
        .await
    });
    Running { stop, task }
}

/// Waits until a client can talk to the server at `path`.
async fn client(path: &Path) -> IdentityClient<tonic::transport::Channel> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(channel) = connect_unix(path).await {
            let mut client = IdentityClient::new(channel);
            if client.probe(ProbeRequest {}).await.is_ok() {
                return client;
            }
        }
        assert!(
            Instant::now() < deadline,
            "server at {path:?} never answered"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn socket_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("plugins").join("holdfast").join("csi.sock")
}

#[tokio::test]
async fn identity_answers_over_a_unix_socket_and_shutdown_removes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let readiness = Readiness::new();
    let server = start(&path, readiness.clone());
    let mut identity = client(&path).await;

    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, DRIVER_NAME);
    assert_eq!(info.vendor_version, env!("CARGO_PKG_VERSION"));

    let caps = identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities;
    let kinds: Vec<_> = caps.iter().filter_map(|c| c.r#type).collect();
    assert!(kinds.contains(&plugin_capability::Type::Service(
        plugin_capability::Service {
            r#type: service::Type::ControllerService as i32
        }
    )));
    assert!(kinds.contains(&plugin_capability::Type::VolumeExpansion(
        plugin_capability::VolumeExpansion {
            r#type: volume_expansion::Type::Online as i32
        }
    )));

    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(false));
    readiness.set(true);
    let probe = identity.probe(ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));

    // A service this server does not carry: the status must pass through the
    // log layer unchanged (tonic answers it trailers-only).
    let mut node = NodeClient::new(connect_unix(&path).await.unwrap());
    let err = node.node_get_info(NodeGetInfoRequest {}).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unimplemented);

    let log = log_text();
    let line = |method: &str, code: &str| {
        log.lines()
            .any(|l| l.contains(method) && l.contains(code) && l.contains("elapsed_ms="))
    };
    assert!(line("/csi.v1.Identity/GetPluginInfo", "\"OK\""), "{log}");
    assert!(line("/csi.v1.Identity/Probe", "\"OK\""), "{log}");
    assert!(line("/csi.v1.Node/NodeGetInfo", "UNIMPLEMENTED"), "{log}");

    // Shut down with a client still connected, as when kubelet holds a
    // connection during a pod's termination.
    assert!(path.exists());
    server.stop().await.unwrap();
    assert!(!path.exists(), "socket file must be removed on shutdown");
    drop(identity);
}

#[tokio::test]
async fn stale_socket_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket file whose server is gone, as after a crash.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists());

    let server = start(&path, Readiness::new());
    let mut identity = client(&path).await;
    let info = identity
        .get_plugin_info(GetPluginInfoRequest {})
        .await
        .unwrap();
    assert_eq!(info.into_inner().name, DRIVER_NAME);
    drop(identity);
    server.stop().await.unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn regular_file_at_the_socket_path_is_refused_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, b"precious data").unwrap();

    let server = start(&path, Readiness::new());
    let result = tokio::time::timeout(WAIT, server.task)
        .await
        .unwrap()
        .unwrap();
    let err = result.expect_err("a regular file must not be replaced");
    assert!(matches!(err, ServeError::NotASocket { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("not a socket"), "{text}");
    assert!(text.contains(path.to_str().unwrap()), "{text}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious data");
}

#[tokio::test]
async fn live_socket_is_not_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_path(&dir);
    let first = start(&path, Readiness::new());
    let mut identity = client(&path).await;

    let second = start(&path, Readiness::new());
    let result = tokio::time::timeout(WAIT, second.task)
        .await
        .unwrap()
        .unwrap();
    let err = result.expect_err("a live socket must not be taken over");
    assert!(matches!(err, ServeError::InUse { .. }), "{err:?}");

    // The first server is untouched and still answers on the same path.
    identity.probe(ProbeRequest {}).await.unwrap();
    drop(identity);
    first.stop().await.unwrap();
    assert!(!path.exists());
}

#[tokio::test]
async fn shutdown_signal_completes_on_sigterm() {
    let mut signal = Box::pin(shutdown_signal());
    // The first poll installs the handlers; only then is SIGTERM safe to send.
    assert!(futures::poll!(signal.as_mut()).is_pending());
    rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::TERM)
        .unwrap();
    tokio::time::timeout(WAIT, signal)
        .await
        .expect("shutdown_signal did not see SIGTERM");
}
