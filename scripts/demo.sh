#!/usr/bin/env bash
# holdfast on this machine, as root (it creates network namespaces and mounts).
#
#   scripts/demo.sh [--fault partition|pause]
#       The failover story: etcd, the controller and two node plugins, each plugin in its
#       own network namespace; a writer on node1's volume; node1 cut off from etcd (or,
#       with --fault pause, its plugin frozen); its writes refused with EIO; node2 granted
#       the volume once node1's session must have run out, and writing. Prints the
#       measured timeline and checks the backing file. Ctrl-C tears everything down.
#
#   scripts/demo.sh --standalone [driver args]
#       The driver alone (one process, an in-memory lease store), volumes as directories
#       under .holdfast/backend, the CSI socket at .holdfast/csi.sock. Extra arguments go
#       to holdfast-driver, e.g. scripts/demo.sh --standalone --log-level debug
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "demo: needs root (it creates network namespaces and mounts volumes): run it as root, e.g. sudo $0${*:+ $*}" >&2
    exit 1
fi
./scripts/setup.sh

if [ "${1:-}" = "--standalone" ]; then
    shift
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
fi

exec cargo run --quiet -p holdfast-e2e --bin holdfast-demo -- "$@"
