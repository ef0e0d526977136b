//! A FUSE volume served from a child process, so that tests can pause (SIGSTOP) and kill
//! (SIGKILL) the server while they use the mount.
//!
//! The child is the test binary itself re-executed with `HOLDFAST_FUSE_CHILD_*` set,
//! running only the binary's `child_fuse_server` test, which calls [`serve_if_child`].

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use holdfast_core::clock::Mono;
use holdfast_core::lease::{SessionDeadline, VolumeGate};
use holdfast_driver::datapath::{FenceAction, FuseOptions, FuseVolume};

const CHILD_BACKING: &str = "HOLDFAST_FUSE_CHILD_BACKING";
const CHILD_TARGET: &str = "HOLDFAST_FUSE_CHILD_TARGET";
const CHILD_DEADLINE_MS: &str = "HOLDFAST_FUSE_CHILD_DEADLINE_MS";
const READY: &str = "HOLDFAST_FUSE_READY";
const PASSTHROUGH: &str = "HOLDFAST_FUSE_PASSTHROUGH=";
const CHILD_PASSTHROUGH: &str = "HOLDFAST_FUSE_CHILD_PASSTHROUGH";

/// A gate whose session stays live for `live` from now, never renewed.
pub fn gate_for(live: Duration) -> VolumeGate {
    let session = SessionDeadline::new();
    session.extend_to(Mono::now() + live);
    VolumeGate::new(session)
}

/// In the child: mounts and serves forever. In a normal test run: returns at once.
pub fn serve_if_child() {
    let (Some(backing), Some(target), Some(ms)) = (
        std::env::var_os(CHILD_BACKING),
        std::env::var_os(CHILD_TARGET),
        std::env::var(CHILD_DEADLINE_MS).ok(),
    ) else {
        return;
    };
    let gate = gate_for(Duration::from_millis(ms.parse().unwrap()));
    let opts = FuseOptions {
        passthrough: std::env::var_os(CHILD_PASSTHROUGH).is_some(),
        ..FuseOptions::new(FenceAction::Error)
    };
    let vol = FuseVolume::mount(Path::new(&backing), Path::new(&target), gate, opts).unwrap();
    println!("{PASSTHROUGH}{}", vol.uses_passthrough());
    println!("{READY}");
    std::io::stdout().flush().unwrap();
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        let _ = &vol;
    }
}

pub struct ChildServer {
    pub child: Child,
    target: PathBuf,
    /// When the child reported the mount ready (its deadline counts from slightly earlier).
    pub ready_at: Instant,
    /// Whether the child's mount serves read-only and write-only opens by passthrough.
    #[allow(dead_code)] // read by the passthrough suite only
    pub passthrough: bool,
}

impl ChildServer {
    #[allow(dead_code)] // used by the fencing suite, not the passthrough one
    pub fn start(backing: &Path, target: &Path, deadline: Duration) -> Self {
        Self::start_with(backing, target, deadline, false)
    }

    /// As [`ChildServer::start`], asking the child's mount for kernel passthrough.
    pub fn start_with(
        backing: &Path,
        target: &Path,
        deadline: Duration,
        passthrough: bool,
    ) -> Self {
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        if passthrough {
            cmd.env(CHILD_PASSTHROUGH, "1");
        }
        let mut child = cmd
            .args([
                "--exact",
                "child_fuse_server",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_BACKING, backing)
            .env(CHILD_TARGET, target)
            .env(CHILD_DEADLINE_MS, deadline.as_millis().to_string())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut passthrough = false;
        loop {
            let line = lines.next().expect("child exited before mounting").unwrap();
            // Not a prefix: the test harness prints "test child_fuse_server ... " before
            // the test's own output on the same line.
            if let Some((_, v)) = line.split_once(PASSTHROUGH) {
                passthrough = v.trim() == "true";
            }
            if line.contains(READY) {
                break;
            }
        }
        ChildServer {
            child,
            target: target.to_owned(),
            ready_at: Instant::now(),
            passthrough,
        }
    }

    pub fn signal(&self, sig: i32) {
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, sig) }, 0);
    }
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        // The child may already be reaped; the result does not matter here.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
    }
}
