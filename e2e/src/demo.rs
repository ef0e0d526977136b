//! The failover story `scripts/demo.sh` tells (the `holdfast-demo` binary; also run by
//! `tests/demo.rs`, so it cannot rot). A [`Cluster`] of two node plugins on etcd; a
//! writer holding a volume on node1; a [`Fault`] that leaves node1 running but unable
//! to prove its session live (cut off from etcd, or its plugin frozen); node1's writes
//! refused with EIO; node2, retrying NodePublishVolume as kubelet would, granted the
//! volume once node1's session must have run out, and its first write landing.
//!
//! [`failover`] says what it does as it goes and returns a [`Timeline`] of measured
//! instants (its `Display` is the timeline the demo prints) together with the checker's
//! verdict on the backing file: every acknowledged record there, and none of node1's
//! beyond the file's length at node2's grant.

use std::fmt;
use std::time::{Duration, Instant};

use crate::cluster::SERIAL_LOCK;
use crate::writer::{EventKind, Writer};
use crate::{errno, Cluster, Landed, LeaseTiming};

const FILE: &str = "log";
const WRITE_EVERY: Duration = Duration::from_millis(20);
/// How often node2 asks for the volume (kubelet backs off from 500 ms; faster here).
const RETRY_EVERY: Duration = Duration::from_millis(50);

/// What happens to node1 at t = 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Its network namespace cut off (etcd unreachable; its storage is not).
    Partition,
    /// Its plugin stopped with SIGSTOP, woken with SIGCONT after node2's first write.
    Pause,
}

impl Fault {
    pub fn parse(name: &str) -> Option<Fault> {
        match name {
            "partition" => Some(Fault::Partition),
            "pause" => Some(Fault::Pause),
            _ => None,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Fault::Partition => {
                "node1 cut off from etcd (its veth down); node1's plugin and writer run on"
            }
            Fault::Pause => {
                "node1's plugin frozen (SIGSTOP: a long GC pause, a stalled VM); \
                 its writer's next write waits in FUSE"
            }
        }
    }

    fn short(self) -> &'static str {
        match self {
            Fault::Partition => "node1 partitioned from etcd",
            Fault::Pause => "node1's plugin paused (SIGSTOP)",
        }
    }
}

/// D = 5 s, margin 1 s, ε = 0.01: the bounds stay visible and the story takes ~15 s.
pub fn timing() -> LeaseTiming {
    LeaseTiming {
        duration: Duration::from_secs(5),
        margin: Duration::from_secs(1),
        epsilon: 0.01,
    }
}

/// What one run measured. Instants are on this process's monotonic clock.
pub struct Timeline {
    pub fault: Fault,
    pub timing: LeaseTiming,
    /// t = 0.
    pub fault_at: Instant,
    /// Pause only: when node1's plugin was woken.
    pub resumed_at: Option<Instant>,
    /// node1's writer's last acknowledged record and when it was reported.
    pub node1_last_ack: Option<(u64, Instant)>,
    /// node1's writer's first failed write: errno, when.
    pub node1_first_error: Option<(i32, Instant)>,
    /// Every errno node1's writer was given.
    pub node1_errors: Vec<i32>,
    pub granted_at: Instant,
    /// NodePublishVolume refusals node2 got before its grant, and the first one.
    pub refusals: (usize, String),
    pub node2_first_ack: Instant,
    /// The backing file's length at node2's grant.
    pub grant_offset: u64,
    /// Records of node1 and of node2 in the backing file.
    pub landed: (usize, usize),
    /// The checker's verdict.
    pub check: Result<(), String>,
}

fn say(what: impl fmt::Display) {
    println!("demo: {what}");
}

/// Polls `f` every 5 ms (yielding to the runtime, so a Ctrl-C is seen) until it gives
/// a value or `timeout` passes.
async fn until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits, saying so, while another run on this machine holds the clusters' lock
/// (polling, so a Ctrl-C is seen; [`Cluster::start`] then takes the lock itself).
async fn wait_for_other_runs() {
    use rustix::fs::{flock, FlockOperation};
    let lock = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(SERIAL_LOCK);
    let Ok(lock) = lock else { return };
    let free = || flock(&lock, FlockOperation::NonBlockingLockExclusive).is_ok();
    if !free() {
        say(format_args!(
            "waiting for another end-to-end run on this machine to finish ({SERIAL_LOCK})"
        ));
        while !free() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Runs the story once on a fresh cluster, torn down before it returns (or when the
/// future is dropped). `Err` if a step did not happen at all.
pub async fn failover(fault: Fault, timing: LeaseTiming) -> Result<Timeline, String> {
    // Declared before the cluster so that they are dropped after it: a write blocked
    // in a frozen plugin's FUSE mount ends only once that plugin is killed.
    let (mut a, mut b): (Writer, Writer);
    wait_for_other_runs().await;
    say("building the node plugin and controller if they are stale");
    crate::bins::driver();
    say(format_args!(
        "starting etcd, the controller and node plugins node1 and node2, each in its own \
         network namespace (lease D = {:?}, margin {:?}, ε = {})",
        timing.duration, timing.margin, timing.epsilon
    ));
    let cluster = Cluster::start_with(2, timing).await;
    let volume = cluster.create_volume("demo", &[]).await;
    let target1 = cluster
        .publish(1, &volume, "pod-a")
        .await
        .map_err(|e| format!("NodePublishVolume on node1: {e}"))?;
    let file = cluster.data_dir(&volume.id).join(FILE);
    say(format_args!(
        "volume {} published on node1 for pod-a: FUSE mount {}",
        volume.id,
        target1.display()
    ));
    a = Writer::start(&target1.join(FILE), "pod-a", WRITE_EVERY, u32::MAX);
    until(Duration::from_secs(10), || {
        (a.acked().len() >= 50).then_some(())
    })
    .await
    .ok_or("node1's writer got no acknowledgements")?;
    say(format_args!(
        "pod-a's writer on node1 appends a checksummed 64-byte record + fsync every \
         {WRITE_EVERY:?} to {FILE}; its backing file is {}",
        file.display()
    ));

    let fault_at = Instant::now();
    match fault {
        Fault::Partition => cluster.partition(1),
        Fault::Pause => cluster.pause(1),
    }
    say(format_args!("t=0: {}", fault.describe()));
    say("node2, where the pod is rescheduled, asks for the volume for pod-b every 50 ms");
    let target2 = cluster.target(2, "pod-b");
    let give_up = fault_at + timing.takeover_after() * 3;
    let mut refusals = (0, String::new());
    let granted_at = loop {
        match cluster
            .publish_at(2, &volume, "pod-b", &target2, None)
            .await
        {
            Ok(()) => break Instant::now(),
            Err(status) if Instant::now() >= give_up => {
                return Err(format!(
                    "node2 was never granted the volume: {status}\n{}",
                    cluster.log_tail(2, 30)
                ))
            }
            Err(status) => {
                if refusals.0 == 0 {
                    refusals.1 = format!("{:?}: {}", status.code(), status.message());
                }
                refusals.0 += 1;
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    };
    let grant_offset = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
    say(format_args!(
        "node2 granted the volume after {} refusals; pod-b's writer starts on node2",
        refusals.0
    ));
    b = Writer::start(&target2.join(FILE), "pod-b", WRITE_EVERY, 3);
    let node2_first_ack = until(Duration::from_secs(10), || {
        let events = b.events();
        events
            .iter()
            .find(|e| e.kind == EventKind::Ack)
            .map(|e| e.at)
    })
    .await
    .ok_or("node2's writer got no acknowledgement")?;

    let mut resumed_at = None;
    if fault == Fault::Pause {
        tokio::time::sleep(Duration::from_millis(300)).await;
        cluster.resume(1);
        resumed_at = Some(Instant::now());
        say("node1's plugin woken (SIGCONT), long past its deadline");
    }
    // node1's writer keeps trying, and must keep failing; node2's writes keep landing.
    until(Duration::from_secs(5), || a.first_error()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    a.stop();
    b.stop();
    say("both writers stopped; the checker reads the backing file directly");

    let landed = Landed::read(&file)?;
    let check = landed
        .acknowledged_present("pod-a", &a.acked())
        .and_then(|()| landed.acknowledged_present("pod-b", &b.acked()))
        .and_then(|()| landed.nothing_from_after("pod-a", grant_offset))
        .and_then(|()| landed.no_interleave("pod-a", "pod-b"));
    let events = a.events();
    let last_ack = events.iter().rev().find(|e| e.kind == EventKind::Ack);
    Ok(Timeline {
        fault,
        timing,
        fault_at,
        resumed_at,
        node1_last_ack: last_ack.map(|e| (e.seq, e.at)),
        node1_first_error: a.first_error(),
        node1_errors: a.errors(),
        granted_at,
        refusals,
        node2_first_ack,
        grant_offset,
        landed: (landed.of("pod-a").count(), landed.of("pod-b").count()),
        check,
    })
}

fn errno_name(errno: i32) -> String {
    match errno {
        errno::EIO => "EIO".into(),
        errno::ENOTCONN => "ENOTCONN".into(),
        other => format!("errno {other}"),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.3}s", d.as_secs_f64())
}

impl Timeline {
    /// `at` relative to the fault, signed.
    fn t(&self, at: Instant) -> String {
        match at.checked_duration_since(self.fault_at) {
            Some(after) => format!("t=+{}", secs(after)),
            None => format!("t=-{}", secs(self.fault_at - at)),
        }
    }

    /// The earliest grant the protocol allows, counted from the fault: node1's last
    /// renewal may precede it by one renewal interval.
    pub fn earliest_grant(&self) -> Duration {
        self.timing.takeover_after() - self.timing.renew_interval()
    }
}

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rows = vec![(self.fault_at, format!("fault  {}", self.fault.short()))];
        if let Some((seq, at)) = self.node1_last_ack {
            rows.push((at, format!("node1  last write acknowledged (record {seq})")));
        }
        if let Some(at) = self.resumed_at {
            rows.push((at, "node1  plugin woken (SIGCONT)".into()));
        }
        if let Some((errno, at)) = self.node1_first_error {
            let errors = &self.node1_errors;
            let eio = errors.iter().filter(|e| **e == errno::EIO).count();
            let (name, n) = (errno_name(errno), errors.len());
            let what = format!("first write refused: {name} ({n} refused in all, {eio} EIO)");
            rows.push((at, format!("node1  {what}")));
        }
        let granted = format!("granted the volume, after {} refusals", self.refusals.0);
        rows.push((self.granted_at, format!("node2  {granted}")));
        rows.push((
            self.node2_first_ack,
            "node2  first write acknowledged".into(),
        ));
        rows.sort_by_key(|(at, _)| *at);

        writeln!(f, "timeline (t=0: {})", self.fault.short())?;
        for (at, what) in &rows {
            writeln!(f, "  {:<10} {what}", self.t(*at))?;
        }
        if let Some((_, at)) = self.node1_last_ack {
            let gap = secs(self.granted_at.saturating_duration_since(at));
            writeln!(
                f,
                "  node1's last acknowledged write came {gap} before node2's grant"
            )?;
        }
        let timing = self.timing;
        writeln!(f, "bounds")?;
        writeln!(
            f,
            "  node1 stops its I/O within D - margin = {} of its last proven renewal",
            secs(timing.self_fence_after())
        )?;
        writeln!(
            f,
            "  node2 may be granted once it saw node1's session unrenewed for D(1+ε) + margin = {}:\n  \
             no earlier than t=+{}, as node1's last renewal may precede the fault by D/3 = {}",
            secs(timing.takeover_after()),
            secs(self.earliest_grant()),
            secs(timing.renew_interval()),
        )?;
        if !self.refusals.1.is_empty() {
            writeln!(f, "node2's first refusal: {}", self.refusals.1)?;
        }
        let (a, b) = self.landed;
        let verdict = match &self.check {
            Ok(()) => "OK".to_string(),
            Err(e) => format!("FAILED: {e}"),
        };
        write!(
            f,
            "check: the backing file holds {a} records of node1 and {b} of node2, every acknowledged\n  \
             one exactly once; none of node1's beyond byte {} (the file's length at node2's grant): {verdict}",
            self.grant_offset
        )
    }
}
