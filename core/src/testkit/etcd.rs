//! [`EtcdServer`]: a real, single-member etcd for tests, started from the binary the
//! `etcd-bin-vendored` crate ships.
//!
//! Each server gets its own temporary data directory and free loopback ports (found by
//! binding port 0 and releasing it; a start that loses the port to someone else is
//! retried on new ports). `start` returns once etcd answers `/health`; dropping the
//! server kills it (SIGKILL) and removes its data.
//!
//! Faults: [`EtcdServer::pause`] / [`EtcdServer::resume`] send SIGSTOP / SIGCONT (the
//! process keeps its sockets open but answers nothing — a hung or partitioned store),
//! [`EtcdServer::kill`] sends SIGKILL (connections are refused), and
//! [`EtcdServer::restart`] starts it again on the same ports and data.
//!
//! Processes in other network namespaces (e2e partitions) cannot reach the host's
//! loopback: start with [`EtcdOptions::listen_ip`] = `0.0.0.0` (or the host end of a
//! veth) and give them [`EtcdServer::client_url_at`] the address they can route to.
//!
//! From another crate's tests:
//! ```toml
//! [dev-dependencies]
//! holdfast-core = { workspace = true, features = ["testkit"] }
//! ```
//! ```no_run
//! # async fn example() {
//! use holdfast_core::store::LeaseStore;
//! let etcd = holdfast_core::testkit::etcd::EtcdServer::start();
//! let store = etcd.store("/my-test/").await; // an EtcdStore with a 2 s call timeout
//! etcd.pause(); // calls now fail with Unavailable after the timeout
//! assert!(store.list_claims().await.is_err());
//! etcd.resume();
//! # }
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rustix::process::{kill_process, Pid, Signal};

use crate::store::etcd::{EtcdStore, EtcdStoreConfig};

const START_ATTEMPTS: usize = 5;
const HEALTHY_WITHIN: Duration = Duration::from_secs(20);

/// How to start an [`EtcdServer`].
#[derive(Clone, Debug)]
pub struct EtcdOptions {
    /// fsync every commit, as in production (benchmarks); tests leave it off for speed.
    pub durable: bool,
    /// The address etcd listens on for clients (peers always use loopback).
    pub listen_ip: IpAddr,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            durable: false,
            listen_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        }
    }
}

/// A running etcd; killed when dropped.
pub struct EtcdServer {
    child: Option<Child>,
    client_port: u16,
    peer_port: u16,
    options: EtcdOptions,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd with fsync disabled (`--unsafe-no-fsync`): fast, for tests that do
    /// not measure latency nor survive a machine crash. Panics if etcd cannot start.
    pub fn start() -> EtcdServer {
        Self::start_with(EtcdOptions::default())
    }

    /// Starts etcd with fsync on every commit, as in production (for benchmarks).
    pub fn start_durable() -> EtcdServer {
        Self::start_with(EtcdOptions {
            durable: true,
            ..EtcdOptions::default()
        })
    }

    /// Starts etcd as `options` say. Panics if etcd cannot start.
    pub fn start_with(options: EtcdOptions) -> EtcdServer {
        let bin = etcd_bin_vendored::etcd_bin_path().expect("etcd binary for this platform");
        let mut last_error = String::new();
        for _ in 0..START_ATTEMPTS {
            let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
            let (client_port, peer_port) = (free_port(options.listen_ip), free_port(loopback));
            if client_port == peer_port {
                continue;
            }
            let mut server = EtcdServer {
                child: None,
                client_port,
                peer_port,
                options: options.clone(),
                dir: tempfile::tempdir().expect("temp dir for etcd"),
            };
            match server.spawn(bin.into()) {
                Ok(()) => return server,
                Err(e) => last_error = e,
            }
        }
        panic!("etcd did not start after {START_ATTEMPTS} attempts: {last_error}");
    }

    fn spawn(&mut self, bin: PathBuf) -> Result<(), String> {
        let listen = format!(
            "http://{}",
            SocketAddr::new(self.options.listen_ip, self.client_port)
        );
        let client = self.client_url();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("etcd log file: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={listen}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if !self.options.durable {
            cmd.arg("--unsafe-no-fsync");
        }
        let child = cmd.spawn().map_err(|e| format!("spawning etcd: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + HEALTHY_WITHIN;
        while Instant::now() < deadline {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "etcd exited with {status}: {}",
                    log_tail(&log_path)
                ));
            }
            if healthy(&self.client_url()) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
        Err(format!("etcd not healthy in time: {}", log_tail(&log_path)))
    }

    /// The client URL, e.g. `http://127.0.0.1:40123` (the listen address, or loopback
    /// when listening on all addresses).
    pub fn client_url(&self) -> String {
        let ip = if self.options.listen_ip.is_unspecified() {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            self.options.listen_ip
        };
        self.client_url_at(ip)
    }

    /// The client URL as reached through `ip` (e.g. the host's veth address, for a
    /// process in another network namespace).
    pub fn client_url_at(&self, ip: IpAddr) -> String {
        format!("http://{}", SocketAddr::new(ip, self.client_port))
    }

    pub fn client_port(&self) -> u16 {
        self.client_port
    }

    /// The endpoints to give an etcd client.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url()]
    }

    /// The running process's id, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// An [`EtcdStore`] on this server under `prefix`, with the default 2 s call timeout.
    pub async fn store(&self, prefix: &str) -> EtcdStore {
        let config = EtcdStoreConfig {
            prefix: prefix.to_string(),
            ..EtcdStoreConfig::new(self.endpoints())
        };
        EtcdStore::connect(config)
            .await
            .expect("connecting to test etcd")
    }

    fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("etcd is not running");
        kill_process(Pid::from_child(child), signal).expect("signalling etcd");
    }

    /// SIGSTOP: etcd stops answering but keeps its connections open. Returns once the
    /// kernel reports the process stopped (a signal is delivered asynchronously, and a
    /// request answered in between would make a fault test pass or fail by chance).
    pub fn pause(&self) {
        self.signal(Signal::STOP);
        self.wait_until_stopped(true);
    }

    /// SIGCONT after [`EtcdServer::pause`]; returns once the process runs again.
    pub fn resume(&self) {
        self.signal(Signal::CONT);
        self.wait_until_stopped(false);
    }

    fn wait_until_stopped(&self, stopped: bool) {
        let pid = self.pid().expect("etcd is not running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_stopped(pid) != stopped {
            assert!(
                Instant::now() < deadline,
                "etcd (pid {pid}) did not {} in time",
                if stopped { "stop" } else { "continue" }
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// SIGKILL, and waits for the process to be gone. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts etcd again (after [`EtcdServer::kill`]) on the same ports and data: the
    /// records written before survive. Panics if it does not come back.
    pub fn restart(&mut self) {
        self.kill();
        let bin = etcd_bin_vendored::etcd_bin_path().expect("etcd binary for this platform");
        if let Err(e) = self.spawn(bin.into()) {
            panic!("etcd did not restart: {e}");
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `/proc/<pid>/stat` says the process is stopped (state `T`).
fn process_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the command name, which is in parentheses and may contain any
    // character: look after the last `)`.
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.trim_start().starts_with('T'))
        .unwrap_or(false)
}

pub(crate) fn free_port(ip: IpAddr) -> u16 {
    let listener = TcpListener::bind(SocketAddr::new(ip, 0)).expect("binding a free port");
    listener.local_addr().expect("local addr").port()
}

/// etcd's `/health` over plain HTTP/1.0 (the client port serves HTTP beside gRPC).
fn healthy(client_url: &str) -> bool {
    let Some(Ok(addr)) = client_url
        .strip_prefix("http://")
        .map(str::parse::<SocketAddr>)
    else {
        return false;
    };
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream
        .write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.") && response.contains("\"health\":\"true\"")
}

pub(crate) fn log_tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut start = text.len().saturating_sub(2000);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].to_string()
}
