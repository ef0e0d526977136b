//! The writer workload process: `hf-e2e-writer <file> <writer-id> <interval-ms> <max-errors>`.
//!
//! Opens `<file>` once (O_WRONLY | O_APPEND | O_CREAT) and appends records 0, 1, 2, …
//! (see `holdfast_e2e::records`), one `write` of one whole record followed by `fsync`
//! each, every `<interval-ms>`. It reports on stdout, one line each, flushed at once:
//! - `start <seq>` before the write of `seq`,
//! - `ack <seq>` once the write and the fsync both returned success,
//! - `err <seq> <errno>` when either failed (the record then counts as not acknowledged),
//! - `openerr <errno>` if the file cannot be opened.
//!
//! After `<max-errors>` consecutive failures it exits. Raw syscalls on one fd, so what
//! the test sees is exactly what the kernel returned for that write.

use std::io::Write;
use std::time::Duration;

use holdfast_e2e::records::encode;
use rustix::fs::{open, Mode, OFlags};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: hf-e2e-writer <file> <writer-id> <interval-ms> <max-errors>");
        std::process::exit(2);
    }
    let (path, writer) = (&args[1], &args[2]);
    let interval = Duration::from_millis(args[3].parse().expect("interval-ms"));
    let max_errors: u32 = args[4].parse().expect("max-errors");
    let mut out = std::io::stdout().lock();
    let mut say = |line: String| {
        // The test reads these lines; if it has gone away there is no one to tell.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    let flags = OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::CLOEXEC;
    let fd = match open(path.as_str(), flags, Mode::from_raw_mode(0o644)) {
        Ok(fd) => fd,
        Err(e) => {
            say(format!("openerr {}", e.raw_os_error()));
            std::process::exit(1);
        }
    };
    let mut failures = 0;
    for seq in 0.. {
        say(format!("start {seq}"));
        let record = encode(writer, seq);
        let result = rustix::io::write(&fd, &record).and_then(|n| {
            // A short write would tear the record; report it as an error (EIO) rather
            // than count it acknowledged.
            if n != record.len() {
                return Err(rustix::io::Errno::IO);
            }
            rustix::fs::fsync(&fd)
        });
        match result {
            Ok(()) => {
                failures = 0;
                say(format!("ack {seq}"));
            }
            Err(e) => {
                failures += 1;
                say(format!("err {seq} {}", e.raw_os_error()));
                if failures >= max_errors {
                    std::process::exit(0);
                }
            }
        }
        std::thread::sleep(interval);
    }
}
