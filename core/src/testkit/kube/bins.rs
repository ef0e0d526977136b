//! Where the Kubernetes binaries come from, and what a test does when there are none.
//!
//! Lookup, first match wins:
//! 1. `HOLDFAST_KUBE_BIN`: a directory holding `kube-apiserver` (and, for tests that
//!    need them, `kube-controller-manager`, `kube-scheduler`, `kubelet`, the CSI
//!    sidecars);
//! 2. `KUBEBUILDER_ASSETS`: the directory `setup-envtest` prints, so a user with
//!    controller-runtime's tooling can run these tests as they are;
//! 3. the directory `../shared/k8s/unpack` prints, next to the repository (it
//!    decompresses and checks the binaries once, into `/var/cache/holdfast-k8s`).
//!
//! Without binaries a test skips with a printed reason, unless `HOLDFAST_REQUIRE_KUBE=1`
//! (CI sets it): then it panics, so a CI run without an API server is red, not green.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Set to `1` to turn a missing control plane from a skip into a failure.
pub const REQUIRE_ENV: &str = "HOLDFAST_REQUIRE_KUBE";
/// A directory of Kubernetes binaries, taking precedence over every other source.
pub const BIN_ENV: &str = "HOLDFAST_KUBE_BIN";
/// controller-runtime envtest's variable for the same.
pub const ENVTEST_ENV: &str = "KUBEBUILDER_ASSETS";

/// A directory that holds at least `kube-apiserver`.
#[derive(Clone, Debug)]
pub struct KubeBinaries {
    pub dir: PathBuf,
}

impl KubeBinaries {
    /// The path of `name` in the directory, if it is there.
    pub fn get(&self, name: &str) -> Option<PathBuf> {
        let path = self.dir.join(name);
        path.is_file().then_some(path)
    }

    /// The path of `name`, or a panic naming what is missing (for binaries a test cannot
    /// do without once it has decided to run).
    pub fn require(&self, name: &str) -> PathBuf {
        self.get(name).unwrap_or_else(|| {
            panic!(
                "{name} is not in {} (see {BIN_ENV} / {ENVTEST_ENV})",
                self.dir.display()
            )
        })
    }
}

/// Whether this run must fail rather than skip without a control plane.
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1" || v == "true")
}

/// The binaries, or why there are none. Looked up once per process.
pub fn find() -> Result<KubeBinaries, String> {
    static FOUND: OnceLock<Result<KubeBinaries, String>> = OnceLock::new();
    FOUND.get_or_init(lookup).clone()
}

/// The binaries with `names` in them, or `None` after printing why this test skips.
/// Under `HOLDFAST_REQUIRE_KUBE=1` a miss panics instead.
pub fn find_or_skip(test: &str, names: &[&str]) -> Option<KubeBinaries> {
    let found = find().and_then(|bins| match names.iter().find(|n| bins.get(n).is_none()) {
        Some(missing) => Err(format!("{missing} is not in {}", bins.dir.display())),
        None => Ok(bins),
    });
    match found {
        Ok(bins) => Some(bins),
        Err(why) if required() => {
            panic!("{test}: no Kubernetes control plane: {why} ({REQUIRE_ENV}=1)")
        }
        Err(why) => {
            eprintln!("SKIPPED {test}: no Kubernetes control plane: {why}; set {BIN_ENV} or {ENVTEST_ENV}");
            None
        }
    }
}

fn lookup() -> Result<KubeBinaries, String> {
    for var in [BIN_ENV, ENVTEST_ENV] {
        if let Some(dir) = std::env::var_os(var).filter(|d| !d.is_empty()) {
            return with_apiserver(PathBuf::from(dir)).map_err(|e| format!("{var}: {e}"));
        }
    }
    let unpack = shared_dir().join("k8s/unpack");
    if !unpack.is_file() {
        return Err(format!("{} does not exist", unpack.display()));
    }
    let out = Command::new("bash")
        .arg(&unpack)
        .output()
        .map_err(|e| format!("running {}: {e}", unpack.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} failed: {}",
            unpack.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    with_apiserver(PathBuf::from(dir))
}

fn with_apiserver(dir: PathBuf) -> Result<KubeBinaries, String> {
    if dir.join("kube-apiserver").is_file() {
        Ok(KubeBinaries { dir })
    } else {
        Err(format!("no kube-apiserver in {}", dir.display()))
    }
}

/// `../shared` beside the repository: where the machine's shared artefacts live.
pub fn shared_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}
