#!/usr/bin/env bash
# Everything CI checks, in the order that fails fastest: set-up, formatting, lints, the
# Helm chart and manifests (rendered, schema-validated, and fed to the real binaries),
# then every test of the workspace. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh --deploy-check
venv="${HOLDFAST_DEPLOY_CHECK_VENV:-$PWD/target/deploy-check-venv}"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked --quiet -- -D warnings
echo "== chart and manifests"
cargo build --workspace --bins --locked --quiet
"$venv/bin/python" scripts/deploy-check.py --binaries "${CARGO_TARGET_DIR:-target}/debug"
echo "== cargo test"
# In CI the kernel fence's tests must run in their VM (tests/kernel_fence_vm.rs): a VM
# that cannot start fails the run there, where on a developer's machine it is a skip.
if [ "${CI:-}" = true ]; then
    export HOLDFAST_REQUIRE_VM=1
fi
# --show-output: the figures tests measure (simulated schedules, takeover latencies,
# time to EIO) are part of what a run reports.
cargo test --workspace --locked -- --show-output
