#!/usr/bin/env bash
# Builds container images offline, without a registry or a container builder: a root
# filesystem is assembled from files on this machine and written as a single-layer
# docker-archive tar, which containerd (`ctr images import`) and docker (`docker load`)
# both read.
#
#   scripts/image.sh [--profile release|debug] [--tag REF] [--out TAR] [--import SOCK]
#       The holdfast image, as the Dockerfile builds it: holdfast-driver and
#       holdfast-controller (stripped) in /usr/local/bin, the shared libraries they link
#       (as ldd lists them) and CA certificates. Cargo builds the binaries first
#       (release by default). REF defaults to the name a release publishes,
#       ghcr.io/holdfast-csi/holdfast:<workspace version>.
#
#   scripts/image.sh --busybox [--tag REF] [--pause] [--out TAR] [--import SOCK]
#       A shell image from Debian's busybox-static and its applet links (default REF
#       holdfast.test/busybox:1). With --pause its entrypoint is a pod sandbox's:
#       sleep until SIGTERM, then exit 0 (default REF holdfast.test/pause:1).
#
#   scripts/image.sh --binary PATH --tag REF [--out TAR] [--import SOCK]
#       A static binary alone, as /<its name> and the image's entrypoint: how the CSI
#       sidecars' images are made (their binaries are in ../shared/k8s).
#
#   --import SOCK imports the archive into the containerd at SOCK, namespace k8s.io
#   (the one kubelet's CRI uses). The archive's path is printed on stdout.
set -euo pipefail
cd "$(dirname "$0")/.."

die() { echo "image: $*" >&2; exit 1; }

kind=holdfast
profile=release
tag=
out=
sock=
pause=false
binary=
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="${2:?--profile needs a value}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --out) out="${2:?--out needs a value}"; shift 2 ;;
        --import) sock="${2:?--import needs a socket}"; shift 2 ;;
        --busybox) kind=busybox; shift ;;
        --pause) kind=busybox; pause=true; shift ;;
        --binary) kind=binary; binary="${2:?--binary needs a path}"; shift 2 ;;
        -h | --help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $1 (see --help)" ;;
    esac
done

target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{etc,tmp,usr/local/bin}
chmod 1777 "$rootfs/tmp"

# Copies a host file into the rootfs at the same path, following symlinks.
copy_in() {
    mkdir -p "$rootfs$(dirname "$1")"
    cp -L "$1" "$rootfs$1"
}

entrypoint='null'
cmd='null'
case "$kind" in
holdfast)
    # Cargo's profile "dev" builds into target/debug; any other profile into its name.
    case "$profile" in
        debug | dev) profile=dev dir=debug ;;
        *) dir="$profile" ;;
    esac
    version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
    [ -n "$version" ] || die "no version in Cargo.toml"
    tag="${tag:-ghcr.io/holdfast-csi/holdfast:$version}"
    echo "image: building the binaries (profile $profile)" >&2
    cargo build --locked --quiet --profile "$profile" --bins -p holdfast-driver -p holdfast-controller >&2
    for bin in holdfast-driver holdfast-controller; do
        src="$target_dir/$dir/$bin"
        [ -x "$src" ] || die "$src was not built"
        # Stripped: the release profile keeps line tables, the debug one everything.
        strip -o "$rootfs/usr/local/bin/$bin" "$src"
        # Every library the dynamic loader resolves, and the loader itself.
        ldd "$src" | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }' | while read -r lib; do
            copy_in "$lib"
        done
    done
    copy_in /etc/ssl/certs/ca-certificates.crt
    cmd='["holdfast-driver","--help"]'
    ;;
busybox)
    # Debian's busybox-static installs /bin/busybox, linked statically: the image has
    # no libraries.
    bb=/bin/busybox
    dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'ok installed' ||
        die "busybox-static is not installed (scripts/setup.sh installs it)"
    mkdir -p "$rootfs/bin"
    cp "$bb" "$rootfs/bin/busybox"
    for applet in $("$bb" --list); do
        [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
    done
    if $pause; then
        tag="${tag:-holdfast.test/pause:1}"
        # A pod sandbox only holds the pod's namespaces open; its process is PID 1 of the
        # sandbox, so it must end on SIGTERM (a shell ignores it unless trapped).
        entrypoint='["/bin/sh","-c","trap \"exit 0\" TERM INT; while :; do sleep 3600 & wait $!; done"]'
    else
        tag="${tag:-holdfast.test/busybox:1}"
        cmd='["/bin/sh"]'
    fi
    ;;
binary)
    [ -n "$tag" ] || die "--binary needs --tag"
    [ -x "$binary" ] || die "$binary is not an executable"
    ldd "$binary" >/dev/null 2>&1 && die "$binary is dynamically linked; only static binaries go alone"
    name="$(basename "$binary")"
    cp "$binary" "$rootfs/$name"
    entrypoint="$(jq -cn --arg p "/$name" '[$p]')"
    ;;
esac
case "$tag" in
    *:*) ;;
    *) die "--tag must name a tag (REPO:TAG): $tag" ;;
esac
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin' >"$rootfs/etc/passwd"
printf '%s\n' 'root:x:0:' 'nonroot:x:65532:' >"$rootfs/etc/group"

# The layer: deterministic (sorted names, fixed times and owners), so that the same
# binaries give the same image id.
archive="$work/archive"
mkdir -p "$archive"
tar --create --file "$archive/layer.tar" --directory "$rootfs" --sort=name \
    --mtime=@0 --owner=0 --group=0 --numeric-owner --format=posix \
    --pax-option=exthdr.name=%d/PaxHeaders/%f,delete=atime,delete=ctime .
layer_sha="$(sha256sum "$archive/layer.tar" | cut -d' ' -f1)"
config="$(jq -cn --arg diff "sha256:$layer_sha" --argjson entrypoint "$entrypoint" --argjson cmd "$cmd" '{
    architecture: "amd64", os: "linux", created: "1970-01-01T00:00:00Z",
    config: {
        Env: ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        Entrypoint: $entrypoint, Cmd: $cmd, User: "0:0", WorkingDir: "/"
    },
    rootfs: {type: "layers", diff_ids: [$diff]}
}')"
config_sha="$(printf '%s' "$config" | sha256sum | cut -d' ' -f1)"
printf '%s' "$config" >"$archive/$config_sha.json"
jq -cn --arg config "$config_sha.json" --arg tag "$tag" \
    '[{Config: $config, RepoTags: [$tag], Layers: ["layer.tar"]}]' >"$archive/manifest.json"

if [ -z "$out" ]; then
    mkdir -p "$target_dir/image"
    name="${tag##*/}"
    out="$target_dir/image/${name/:/-}.tar"
fi
tar --create --file "$out" --directory "$archive" --sort=name --mtime=@0 \
    --owner=0 --group=0 --numeric-owner manifest.json "$config_sha.json" layer.tar
echo "image: $tag: $(du -k "$out" | cut -f1) KiB archive, layer sha256:${layer_sha:0:12}" >&2

if [ -n "$sock" ]; then
    command -v ctr >/dev/null || die "ctr not found (scripts/setup.sh installs containerd)"
    ctr -a "$sock" -n k8s.io images import "$out" >&2 ||
        die "could not import $out into containerd at $sock"
fi
echo "$out"
