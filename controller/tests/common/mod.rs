//! Runs the real `holdfast-controller` binary on a unix socket in a temp dir, and
//! builds requests for it.

#![allow(dead_code)]

pub mod plane;
pub mod sessions;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use holdfast_core::csi::serve::connect_unix;
use holdfast_core::csi::v1::controller_client::ControllerClient;
use holdfast_core::csi::v1::identity_client::IdentityClient;
use holdfast_core::csi::v1::volume_capability::{
    access_mode::Mode, AccessMode, AccessType, BlockVolume, MountVolume,
};
use holdfast_core::csi::v1::{CapacityRange, CreateVolumeRequest, ProbeRequest, VolumeCapability};
use tonic::transport::Channel;

/// One running controller process over a backend root.
pub struct ControllerProcess {
    child: Child,
    pub socket: PathBuf,
}

impl ControllerProcess {
    /// Starts the binary and waits until it answers Probe. Its lease store is the
    /// in-process memory store, which no node shares: every claim looks free to it.
    pub async fn start(root: &Path, socket: &Path) -> ControllerProcess {
        Self::start_with(root, socket, &["--lease-store=memory".to_string()]).await
    }

    /// Starts the binary with `lease_args` (store and timing flags) instead. Metrics
    /// are off unless `lease_args` names `--metrics-address` (tests run side by side).
    pub async fn start_with(
        root: &Path,
        socket: &Path,
        lease_args: &[String],
    ) -> ControllerProcess {
        Self::start_logged(root, socket, lease_args, &[], None).await
    }

    /// [`Self::start_with`], with environment variables `env`, and the log (debug
    /// level) written to `log` when given.
    pub async fn start_logged(
        root: &Path,
        socket: &Path,
        args: &[String],
        env: &[(String, String)],
        log: Option<&Path>,
    ) -> ControllerProcess {
        let mut command = Command::new(env!("CARGO_BIN_EXE_holdfast-controller"));
        for (key, _) in std::env::vars() {
            if key.starts_with("HOLDFAST_") || key == "KUBECONFIG" || key == "POD_NAMESPACE" {
                command.env_remove(key);
            }
        }
        if !args.iter().any(|a| a.starts_with("--metrics-address")) {
            command.arg("--metrics-address=");
        }
        let stderr = match log {
            Some(path) => {
                command.arg("--log-level=debug,kube=info,hyper=info,tower=info,h2=info,rustls=info,hyper_util=info");
                Stdio::from(std::fs::File::create(path).expect("controller log file"))
            }
            // The controller's log is noise in a passing run; HOLDFAST_TEST_LOG shows it.
            None if std::env::var_os("HOLDFAST_TEST_LOG").is_some() => Stdio::inherit(),
            None => Stdio::null(),
        };
        let child = command
            .arg(format!("--endpoint=unix://{}", socket.display()))
            .arg(format!("--backend-root={}", root.display()))
            .arg("--log-format=text")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env_remove("CSI_ENDPOINT")
            .stdin(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start holdfast-controller");
        let mut process = ControllerProcess {
            child,
            socket: socket.to_owned(),
        };
        process.wait_ready().await;
        process
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("holdfast-controller exited during start: {status}");
            }
            if self.socket.exists() {
                if let Ok(channel) = connect_unix(&self.socket).await {
                    let probe = IdentityClient::new(channel).probe(ProbeRequest {}).await;
                    if probe.is_ok_and(|r| r.into_inner().ready == Some(true)) {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "holdfast-controller did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. STOP, CONT, KILL) to the process.
    pub fn signal(&self, signal: rustix::process::Signal) {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, signal).unwrap();
    }

    /// SIGKILL, and reap it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn channel(&self) -> Channel {
        connect_unix(&self.socket)
            .await
            .expect("connect to controller")
    }

    pub async fn controller(&self) -> ControllerClient<Channel> {
        ControllerClient::new(self.channel().await)
    }

    pub async fn identity(&self) -> IdentityClient<Channel> {
        IdentityClient::new(self.channel().await)
    }

    /// Sends SIGTERM and waits for the exit. Async so that this test's own client
    /// connections can answer the server's graceful-shutdown GOAWAY meanwhile.
    pub async fn terminate(&mut self) -> ExitStatus {
        let pid = rustix::process::Pid::from_raw(self.child.id() as i32).unwrap();
        rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "holdfast-controller ignored SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A temp dir holding a backend root and a socket path, plus a controller on them.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub process: ControllerProcess,
}

impl Fixture {
    pub async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("root")).unwrap();
        register_nodes(
            &dir.path().join("root"),
            &["n1", "n2", "n3", "n4", "node-1"],
        );
        let process =
            ControllerProcess::start(&dir.path().join("root"), &dir.path().join("c.sock")).await;
        Fixture { dir, process }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub async fn client(&self) -> ControllerClient<Channel> {
        self.process.controller().await
    }
}

/// Registers node ids the way a node plugin does at start (the registry is on the
/// shared backend root, so a second handle on it is what a node plugin has).
pub fn register_nodes(root: &Path, nodes: &[&str]) {
    let backend = holdfast_core::backend::Backend::open(root).unwrap();
    for node in nodes {
        backend.register_node(node).unwrap();
    }
}

pub fn mount_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Mount(MountVolume::default())),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_type: Some(AccessType::Block(BlockVolume {})),
        access_mode: Some(AccessMode { mode: mode as i32 }),
    }
}

pub fn create_request(name: &str) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.to_owned(),
        capacity_range: Some(CapacityRange {
            required_bytes: 1 << 20,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![mount_cap(Mode::SingleNodeWriter)],
        ..Default::default()
    }
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The gRPC code of a call that must fail.
pub fn code<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Code {
    match result {
        Ok(r) => panic!("expected an error, got {:?}", r.into_inner()),
        Err(status) => status.code(),
    }
}

/// A free TCP port on loopback (for `--metrics-address`).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `GET /metrics` on `127.0.0.1:port`: the body, or `None` if nothing answers.
pub async fn scrape(port: u16) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8(response).ok()?;
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    Some(text.split_once("\r\n\r\n")?.1.to_string())
}

/// The value of the series `name` (with its labels, exactly as rendered) in `body`.
pub fn series(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)?
            .strip_prefix(' ')?
            .split(' ')
            .next()?
            .parse()
            .ok()
    })
}
