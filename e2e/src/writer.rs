//! [`Writer`]: the parent's handle on one `hf-e2e-writer` process (see that binary for
//! its line protocol). A reader thread turns its stdout into [`Event`]s stamped with
//! the instant they arrived, so tests can ask "how many acknowledged?", "when did the
//! first error come, with which errno?" and "is a write stuck, since when?".
//!
//! The writer is a separate process so that a write blocked in a frozen or dead FUSE
//! mount can always be ended with SIGKILL (FUSE waits are killable), whatever happens
//! to the test. Dropping the handle kills it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One line of the writer's report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Start,
    Ack,
    Err(i32),
    OpenErr(i32),
}

#[derive(Clone, Copy, Debug)]
pub struct Event {
    pub kind: EventKind,
    pub seq: u64,
    pub at: Instant,
}

/// A running writer process.
pub struct Writer {
    pub id: String,
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
}

impl Writer {
    /// Starts appending records as `id` to `file` every `interval`; exits after
    /// `max_errors` consecutive failed writes.
    pub fn start(file: &Path, id: &str, interval: Duration, max_errors: u32) -> Writer {
        let mut child = Command::new(crate::bins::writer())
            .arg(file)
            .arg(id)
            .arg(interval.as_millis().to_string())
            .arg(max_errors.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hf-e2e-writer");
        let stdout = child.stdout.take().expect("writer stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(event) = parse(&line) {
                    sink.lock().unwrap().push(event);
                }
            }
        });
        Writer {
            id: id.to_string(),
            child,
            events,
        }
    }

    /// A copy of every event so far.
    pub fn events(&self) -> Vec<Event> {
        self.events.lock().unwrap().clone()
    }

    /// The acknowledged sequence numbers.
    pub fn acked(&self) -> Vec<u64> {
        self.events()
            .iter()
            .filter(|e| e.kind == EventKind::Ack)
            .map(|e| e.seq)
            .collect()
    }

    /// The first failed write (or open): its errno and when it was reported.
    pub fn first_error(&self) -> Option<(i32, Instant)> {
        self.events().iter().find_map(|e| match e.kind {
            EventKind::Err(errno) | EventKind::OpenErr(errno) => Some((errno, e.at)),
            _ => None,
        })
    }

    /// Every errno reported, in order.
    pub fn errors(&self) -> Vec<i32> {
        self.events()
            .iter()
            .filter_map(|e| match e.kind {
                EventKind::Err(errno) | EventKind::OpenErr(errno) => Some(errno),
                _ => None,
            })
            .collect()
    }

    /// When the write in flight started, if the last thing reported is a `start`.
    pub fn stuck_since(&self) -> Option<Instant> {
        let events = self.events();
        match events.last() {
            Some(e) if e.kind == EventKind::Start => Some(e.at),
            _ => None,
        }
    }

    /// Waits until at least `n` records are acknowledged; false on timeout.
    pub fn wait_acked(&self, n: usize, timeout: Duration) -> bool {
        wait_for(timeout, || self.acked().len() >= n)
    }

    /// Waits for the first error; returns it, or `None` on timeout.
    pub fn wait_error(&self, timeout: Duration) -> Option<(i32, Instant)> {
        let mut found = None;
        wait_for(timeout, || {
            found = self.first_error();
            found.is_some()
        });
        found
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the process has exited (by itself or killed by someone else, such as
    /// a plugin fencing a bind volume); returns its status and when it was seen gone.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<(ExitStatus, Instant)> {
        let mut exited = None;
        wait_for(timeout, || {
            exited = self.child.try_wait().ok().flatten();
            exited.is_some()
        });
        exited.map(|status| (status, Instant::now()))
    }

    /// SIGKILL and reap; the events stay readable. Idempotent.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Let the reader thread drain what the process wrote before it died.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(line: &str) -> Option<Event> {
    let mut fields = line.split(' ');
    let word = fields.next()?;
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<i64>().ok());
    let first = number(fields.next())?;
    let (kind, seq) = match word {
        "start" => (EventKind::Start, first as u64),
        "ack" => (EventKind::Ack, first as u64),
        "err" => (EventKind::Err(number(fields.next())? as i32), first as u64),
        "openerr" => (EventKind::OpenErr(first as i32), 0),
        _ => return None,
    };
    Some(Event {
        kind,
        seq,
        at: Instant::now(),
    })
}

/// Polls `done` every 5 ms until it holds (true) or `timeout` passes (false).
pub fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
