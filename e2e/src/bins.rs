//! Where the system's binaries are, and making sure they are current.
//!
//! Cargo gives a test `CARGO_BIN_EXE_*` only for its own package's binaries, so the
//! node plugin and controller are found beside the running test executable: it lives in
//! `target/<profile>/deps/`, they in `target/<profile>/`. Before the first use in a
//! process the harness runs `cargo build --workspace --bins --tests` with that target
//! dir and profile (a no-op when nothing changed), so a test never runs
//! against a stale binary. If cargo is unavailable (a test executable run by hand) or
//! the build fails, the existing binaries are used and a warning is printed. Set
//! `HOLDFAST_E2E_NO_BUILD=1` to skip the build.

use std::path::{Path, PathBuf};
use std::sync::Once;

static BUILD: Once = Once::new();

/// `target/<profile>/`: the directory the running test executable's `deps/` is in.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe.parent().expect("executable dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The node plugin binary, built first if needed.
pub fn driver() -> PathBuf {
    ensure_built();
    existing(profile_dir().join("holdfast-driver"))
}

/// The controller binary, built first if needed.
pub fn controller() -> PathBuf {
    ensure_built();
    existing(profile_dir().join("holdfast-controller"))
}

/// The writer workload binary of this package.
pub fn writer() -> PathBuf {
    existing(profile_dir().join("hf-e2e-writer"))
}

fn existing(path: PathBuf) -> PathBuf {
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

fn ensure_built() {
    BUILD.call_once(|| {
        if std::env::var_os("HOLDFAST_E2E_NO_BUILD").is_some() {
            return;
        }
        if let Err(e) = build() {
            eprintln!("warning: could not rebuild the node plugin and controller ({e}); using the binaries in {}", profile_dir().display());
        }
    });
}

fn build() -> Result<(), String> {
    let profile_dir = profile_dir();
    let target_dir = profile_dir.parent().ok_or("no target dir")?;
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or("no profile name")?;
    // `debug` is the output directory of the `dev` profile.
    let profile = if profile == "debug" { "dev" } else { profile };
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("no workspace dir")?;
    // `--workspace --bins --tests` resolves features as `cargo test --workspace` does
    // (dev-dependencies' features included), so a run of the whole suite finds the
    // binaries it built up to date instead of relinking them with other features.
    let status = holdfast_core::testkit::cargo::cargo_command()
        .current_dir(workspace)
        .args(["build", "--quiet", "--workspace", "--bins", "--tests"])
        .args(["--profile", profile, "--target-dir"])
        .arg(target_dir)
        .status()
        .map_err(|e| format!("running cargo: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build exited with {status}"))
    }
}
