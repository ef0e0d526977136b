#!/usr/bin/env bash
# Runs holdfast on this machine without Kubernetes (--standalone: one process, an
# in-memory lease store), with volumes as directories under .holdfast/backend and the
# CSI socket at .holdfast/csi.sock. Run as root: it mounts.
# Extra arguments go to holdfast-driver, e.g. scripts/demo.sh --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/setup.sh
state="$PWD/.holdfast"
mkdir -p "$state/backend" "$state/state"
echo "demo: CSI endpoint unix://$state/csi.sock (Ctrl-C stops the plugin)"
exec cargo run --quiet -p holdfast-driver -- \
    --standalone \
    --endpoint "unix://$state/csi.sock" \
    --backend-root "$state/backend" \
    --state-dir "$state/state" \
    --log-format text \
    "$@"
