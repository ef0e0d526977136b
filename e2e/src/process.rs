//! [`Daemon`]: one real holdfast process (node plugin or controller) serving CSI on a
//! unix socket, with the faults a test injects into it: SIGKILL, SIGSTOP / SIGCONT
//! (returning only once `/proc` shows the new state) and restart with the same command.
//!
//! A node plugin is started through `nsenter --net=<ns>`, which enters the namespace and
//! then execs the plugin: the child's pid *is* the plugin's, so signals reach it.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_core::csi::serve::connect_unix;
use holdfast_core::csi::v1::identity_client::IdentityClient;
use holdfast_core::csi::v1::ProbeRequest;
use rustix::process::{kill_process, Pid, Signal};

const START_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Daemon {
    /// `argv`, the program first.
    pub command: Vec<String>,
    pub socket: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    /// Starts `command` and waits until its socket answers Probe with ready.
    pub async fn start(command: Vec<String>, socket: PathBuf, log: PathBuf) -> Daemon {
        let mut daemon = Daemon {
            command,
            socket,
            log,
            child: None,
        };
        daemon.spawn().await;
        daemon
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("open daemon log");
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .env_remove("CSI_ENDPOINT")
            .env_remove("KUBE_NODE_NAME")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.command[0]));
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if self.probe_ready().await {
                return;
            }
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "{} exited before serving ({status}):\n{}",
                    self.command.join(" "),
                    self.logs()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {START_TIMEOUT:?}:\n{}",
                self.command.join(" "),
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn probe_ready(&self) -> bool {
        let Ok(channel) = connect_unix(&self.socket).await else {
            return false;
        };
        match IdentityClient::new(channel).probe(ProbeRequest {}).await {
            Ok(reply) => reply.into_inner().ready.unwrap_or(true),
            Err(_) => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// SIGKILL and reap: a crash. Mounts and the socket file stay. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP; returns once the kernel shows the process stopped.
    pub fn pause(&self) {
        self.signal(Signal::STOP);
        self.wait_state(true);
    }

    /// SIGCONT; returns once the process runs again.
    pub fn resume(&self) {
        self.signal(Signal::CONT);
        self.wait_state(false);
    }

    fn signal(&self, signal: Signal) {
        let child = self.child.as_ref().expect("daemon is not running");
        kill_process(Pid::from_child(child), signal).expect("signal daemon");
    }

    fn wait_state(&self, stopped: bool) {
        let pid = self.pid().expect("daemon is not running");
        let deadline = Instant::now() + Duration::from_secs(5);
        while process_stopped(pid) != stopped {
            assert!(Instant::now() < deadline, "pid {pid} did not change state");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills the process if it runs and starts the same command again.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `/proc/<pid>/stat` shows state `T` (stopped).
pub fn process_stopped(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold any character: look after the last `)`.
    stat.rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
}

/// The long flags `program --help` lists (`--lease-epsilon`, …), so the harness passes
/// only flags the binary knows: it runs unchanged while lease flags are being added.
pub fn supported_flags(program: &std::path::Path, subcommand: Option<&str>) -> Vec<String> {
    let mut cmd = Command::new(program);
    cmd.args(subcommand).arg("--help");
    let out = cmd.output().map(|o| o.stdout).unwrap_or_default();
    option_names(&String::from_utf8_lossy(&out))
}

/// The long option names of a clap help text. Only option lines count
/// (`  -x, --flag <V>` / `      --flag`): descriptions may mention other flags.
fn option_names(help: &str) -> Vec<String> {
    help.lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let bytes = line.as_bytes();
            let short_first = bytes.len() > 4 && bytes[0] == b'-' && bytes[2] == b',';
            let option = if short_first {
                line[3..].trim_start()
            } else {
                line
            };
            option
                .strip_prefix("--")
                .and_then(|rest| rest.split([' ', '=', ',']).next())
                .filter(|name| !name.is_empty())
                .map(|name| format!("--{name}"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn option_names_ignore_descriptions() {
        let help = "Options:\n      --node <NODE>\n          Requires --lease-store\n  -o, --output <OUTPUT>\n          - etcd: (--etcd-endpoints, --x)\n      --lease-epsilon=<E>\n  -h, --help\n";
        assert_eq!(
            super::option_names(help),
            ["--node", "--output", "--lease-epsilon", "--help"]
        );
    }
}
