# The holdfast image: both binaries, holdfast-driver (the node DaemonSet) and
# holdfast-controller (the Deployment), chosen by the chart's `command`.
#
#   docker build -t ghcr.io/holdfast-csi/holdfast:0.1.0 .
#
# Without a registry or a container builder, scripts/image.sh makes the same image from
# the workspace's own binaries and imports it into containerd.
#
# What the binaries need at run time is only glibc and libgcc_s: the driver mounts FUSE
# and bind mounts with mount(2) itself and opens /dev/fuse directly, so the image needs
# no mount, umount, fusermount3 or ip. /dev/fuse comes from the host (the node plugin
# runs privileged).
#
# The image runs as root. The node plugin must (mounts, /dev/fuse, killing the holders
# of a fenced bind volume); the controller creates volume directories in the backend
# root and removes whole volume trees that workloads wrote under any uid, which a
# non-root user cannot do on a root-owned export.

FROM rust:1.88-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bins -p holdfast-driver -p holdfast-controller \
    && mkdir /out \
    && cp target/release/holdfast-driver target/release/holdfast-controller /out/ \
    && strip /out/holdfast-driver /out/holdfast-controller

# Distroless "cc": glibc, libgcc_s and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12
COPY --from=build /out/ /usr/local/bin/
USER 0:0
CMD ["holdfast-driver", "--help"]
