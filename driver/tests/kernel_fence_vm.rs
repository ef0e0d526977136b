//! The kernel fence on kernels that run it: the fence's unit tests and the passthrough
//! suite (`tests/fuse_passthrough.rs`), run inside a VM booted with `bpf` in `lsm=`, on
//! every kernel in `../shared/vm` (or `HOLDFAST_VM_KERNELS`; see `vm/mod.rs`): a kernel
//! with FUSE built in and FUSE passthrough (6.12), and one with fuse as a module, whose
//! types live in the module's split BTF (6.1).
//!
//! The point is that the fence's tests *run*: a suite that passes because it skipped
//! (the fence did not load, the mount got no passthrough) fails here. Where no VM can be
//! started (no QEMU, no kernels) this test says why and passes, unless
//! `HOLDFAST_REQUIRE_VM=1` (set by CI), where that is a failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

mod vm;

/// Generous for TCG on a loaded machine (a boot and a suite take 5–20 s), yet short
/// enough that a test stuck in the guest fails the run within the time the whole VM
/// test is allowed.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

fn vm_required() -> bool {
    std::env::var("HOLDFAST_REQUIRE_VM").is_ok_and(|v| v == "1" || v == "true")
}

/// The unit-test binary of this crate's library and the passthrough suite's binary,
/// built by a nested cargo (a no-op when the enclosing `cargo test --workspace` built
/// them; `--workspace` resolves features the same way so nothing is rebuilt).
fn test_binaries() -> (PathBuf, PathBuf) {
    let out = holdfast_core::testkit::cargo::cargo_command()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args(["test", "--quiet", "--workspace", "--no-run", "--lib"])
        .args(["--test", "fuse_passthrough", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "building the test binaries failed");
    let (mut lib, mut passthrough) = (None, None);
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (msg["target"]["name"].as_str(), msg["executable"].as_str())
        else {
            continue;
        };
        let is_lib = msg["target"]["kind"][0] == "lib";
        match name {
            "holdfast_driver" if is_lib => lib = Some(PathBuf::from(exe)),
            "fuse_passthrough" => passthrough = Some(PathBuf::from(exe)),
            _ => {}
        }
    }
    (
        lib.expect("cargo built the driver's unit tests"),
        passthrough.expect("cargo built tests/fuse_passthrough.rs"),
    )
}

/// `(major, minor)` of a release such as `6.12.117+deb13-cloud-amd64`.
fn version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// The `N passed` count of libtest's summary line.
fn passed(console: &str) -> usize {
    console
        .lines()
        .filter_map(|l| {
            l.split_once("test result: ")?
                .1
                .split_once(" passed")?
                .0
                .rsplit(' ')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .sum()
}

fn skip_lines(console: &str) -> Vec<&str> {
    console
        .lines()
        .filter(|l| l.contains("SKIP") || l.contains("skipped:"))
        .collect()
}

#[test]
fn kernel_fence_suites_pass_inside_a_vm() {
    if let Some(why) = vm::unavailable() {
        assert!(
            !vm_required(),
            "HOLDFAST_REQUIRE_VM is set, but no VM can start: {why}"
        );
        eprintln!("SKIP: no VM for the kernel fence: {why}");
        return;
    }
    let started = Instant::now();
    let (lib, passthrough) = test_binaries();
    println!("test binaries ready after {:.1?}", started.elapsed());
    let kernels = vm::kernels().unwrap();
    for kernel in &kernels {
        let runs = [
            (
                "kernel fence unit tests",
                &lib,
                vec!["kernel_fence", "--show-output"],
            ),
            (
                "tests/fuse_passthrough.rs",
                &passthrough,
                vec!["--show-output"],
            ),
        ];
        for (suite, binary, filter) in runs {
            let run = vm::run(kernel, binary, &filter, &[], BOOT_TIMEOUT)
                .unwrap_or_else(|e| panic!("{}: the VM did not start: {e}", kernel.name));
            let skips = skip_lines(&run.console);
            println!(
                "{suite} on {}: kernel {}, LSMs {}, {} passed, {} skipped, exit {:?}, {:.1?}",
                kernel.name,
                run.release,
                run.lsms,
                passed(&run.console),
                skips.len(),
                run.status,
                run.took
            );
            let context = || format!("{suite} on kernel {}:\n{}", kernel.name, run.console);
            assert!(run.passed(), "failed: {}", context());
            assert!(
                run.lsms.split(',').any(|l| l == "bpf"),
                "BPF LSM inactive in the guest: {}",
                context()
            );
            // FUSE passthrough exists from 6.9 on; before, the passthrough suite may only
            // skip for that reason, after the fence itself loaded.
            let allowed =
                |l: &&str| version(&run.release) < (6, 9) && l.contains("has no FUSE passthrough");
            let wrong: Vec<_> = skips.iter().filter(|l| !allowed(l)).collect();
            assert!(wrong.is_empty(), "skipped {wrong:?}: {}", context());
            assert!(passed(&run.console) > 0, "no test ran: {}", context());
        }
    }
    println!(
        "kernel fence VM runs: {} kernels, {:.1?} in all",
        kernels.len(),
        started.elapsed()
    );
}

/// The data-path benchmark (`benches/datapath.rs`) inside the VM, on the newest kernel
/// there: bind mount, FUSE, and FUSE with passthrough under the kernel fence, in the
/// same rounds. `HOLDFAST_BENCH_*` variables are passed on to the guest. The backing
/// directory is the guest's tmpfs, and TCG emulates every instruction of both sides.
#[test]
#[ignore = "a benchmark, minutes of emulated I/O: run with `cargo test -p holdfast-driver --test kernel_fence_vm -- --ignored --nocapture`"]
fn datapath_benchmark_inside_a_vm() {
    if let Some(why) = vm::unavailable() {
        panic!("no VM: {why}");
    }
    let out = holdfast_core::testkit::cargo::cargo_command()
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .args([
            "bench",
            "--quiet",
            "-p",
            "holdfast-driver",
            "--bench",
            "datapath",
        ])
        .args(["--no-run", "--message-format=json"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(out.status.success(), "building the benchmark failed");
    let bench = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|m| m["target"]["name"] == "datapath")
        .and_then(|m| m["executable"].as_str().map(PathBuf::from))
        .expect("cargo built benches/datapath.rs");
    let kernel = vm::kernels()
        .unwrap()
        .into_iter()
        .max_by_key(|k| version(&k.name))
        .unwrap();
    let env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("HOLDFAST_BENCH_"))
        .collect();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    let run = vm::run(
        &kernel,
        &bench,
        &["--bench"],
        &env,
        Duration::from_secs(3 * 3600),
    )
    .expect("the VM starts");
    println!("{}", run.console);
    println!(
        "kernel {}, LSMs {}, {:.1?}",
        run.release, run.lsms, run.took
    );
    assert!(run.passed(), "the benchmark failed");
}
