//! Running cargo from inside a test, for tests that need another package's binaries or
//! an example built.

use std::process::Command;

/// A `cargo` command (the one running this test) without the variables cargo sets for
/// the test itself. Those are not configuration: left in, they reach build scripts that
/// watch them (ring's watches `CARGO_MANIFEST_DIR` and `OUT_DIR`), and the nested build
/// recompiles half the dependency tree, after which the outer build does it again.
pub fn cargo_command() -> Command {
    let mut cargo = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    const PER_CRATE: [&str; 4] = [
        "CARGO_PKG_",
        "CARGO_BIN_",
        "CARGO_MANIFEST_",
        "CARGO_CRATE_",
    ];
    const PER_RUN: [&str; 4] = [
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if PER_CRATE.iter().any(|p| name.starts_with(p)) || PER_RUN.contains(&&*name) {
            cargo.env_remove(&*name);
        }
    }
    cargo
}
