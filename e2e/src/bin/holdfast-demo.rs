//! `holdfast-demo [--fault partition|pause]`: the failover story of `scripts/demo.sh`
//! (see `holdfast_e2e::demo`), on this machine, as root.
//!
//! Prints what it does, then the measured timeline and the checker's verdict; exits 0
//! only if the story ran and the check passed. SIGINT (Ctrl-C) or SIGTERM at any point
//! drops the cluster: plugins, controller, etcd and writers killed, mounts lazily
//! unmounted, namespaces and veths deleted, temp dirs removed.

use std::process::ExitCode;

use holdfast_e2e::demo::{self, Fault};
use tokio::signal::unix::{signal, SignalKind};

const USAGE: &str = "usage: holdfast-demo [--fault partition|pause]";

fn parse_args() -> Result<Fault, String> {
    let mut fault = Fault::Partition;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let value = match arg.strip_prefix("--fault") {
            Some("") => args.next(),
            Some(rest) if rest.starts_with('=') => Some(rest[1..].to_string()),
            _ => return Err(format!("unknown argument {arg:?}")),
        };
        fault = value
            .as_deref()
            .and_then(Fault::parse)
            .ok_or("--fault takes partition or pause")?;
    }
    Ok(fault)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let fault = match parse_args() {
        Ok(fault) => fault,
        Err(e) => {
            eprintln!("holdfast-demo: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("holdfast-demo: needs root (it creates network namespaces and FUSE mounts)");
        return ExitCode::FAILURE;
    }
    let (Ok(mut interrupt), Ok(mut terminate)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        eprintln!("holdfast-demo: cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    // The story owns the cluster: on a signal its future is dropped, and the cluster
    // with it, before `select!` returns.
    let outcome = tokio::select! {
        biased;
        _ = interrupt.recv() => Err("interrupted"),
        _ = terminate.recv() => Err("terminated"),
        result = demo::failover(fault, demo::timing()) => Ok(result),
    };
    match outcome {
        Err(signal) => {
            eprintln!("demo: {signal}; the cluster is torn down");
            ExitCode::from(130)
        }
        Ok(Err(e)) => {
            eprintln!("demo: failed: {e}");
            ExitCode::FAILURE
        }
        Ok(Ok(timeline)) => {
            println!("\n{timeline}");
            if timeline.check.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
