#!/usr/bin/env bash
# Builds Ambit's container images, one per component, from the release binaries,
# without pulling a base image: each is `buildah from scratch` with its binary, the
# shared libraries it loads (as `ldd` lists them) and the few files it reads, copied
# from this (Debian) machine. Run as root; needs buildah (apt-get install buildah; add
# podman to run them).
#
#   scripts/images.sh [--registry localhost/ambit] [--tag <workspace version>]
#
# Makes <registry>/ztunnel, /control, /cni and /waypoint (the names the Helm chart's
# values image.registry and image.tag point at). Each image holds its binary on PATH
# and runs it by default (CMD, no ENTRYPOINT), so a command can be given:
#
#   podman run --rm localhost/ambit/ztunnel:0.1.0 ztunnel --version
#
# (On a host where podman cannot raise the containers' limits or use the cgroups as
# they are, as in some VMs: add `--cgroup-manager=cgroupfs --runtime runc --ulimit
# nofile=1024:1024 --ulimit nproc=4096:4096`; the images are not the cause.)
#
# ambit-control and waypoint run as user 65532 (they need no privilege); ztunnel and
# the node agent run as root for the capabilities the manifests give them. The cni
# image also carries what the node agent runs in pods' namespaces: nsenter, ip,
# iptables/ip6tables (nft backend, with its extensions) and nft. For a registry build
# without this machine's files, see deploy/Dockerfile.
set -euo pipefail
cd "$(dirname "$0")/.."

registry=localhost/ambit
tag=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
while [ $# -gt 0 ]; do
    case "$1" in
        --registry) registry=$2; shift 2 ;;
        --tag) tag=$2; shift 2 ;;
        *) echo "usage: $0 [--registry R] [--tag T]" >&2; exit 2 ;;
    esac
done
command -v buildah >/dev/null || { echo "buildah is needed: apt-get install -y buildah podman" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "run as root (buildah mounts the images' file systems)" >&2; exit 1; }

echo "==> release binaries"
CARGO_INCREMENTAL=0 cargo build --release --locked \
    -p ambit-ztunnel -p ambit-control -p ambit-cni -p ambit-waypoint --bins
bin="$(realpath "${CARGO_TARGET_DIR:-target}")/release"

# The shared libraries file $2 loads (the dynamic loader included), copied into the
# root $1 at their paths.
copy_libraries() {
    local root=$1 file=$2 lib
    for lib in $(ldd "$file" 2>/dev/null | grep -o '/[^ ]*' || true); do
        [ -e "$root$lib" ] || cp -L --parents "$lib" "$root/"
    done
}

# image <component> <binary> <user> [files of this machine to copy, at their paths...]
image() {
    local component=$1 binary=$2 user=$3; shift 3
    local name="$registry/$component:$tag"
    echo "==> $name"
    local ctr root f
    ctr=$(buildah from scratch)
    root=$(buildah mount "$ctr")
    mkdir -p "$root/usr/local/bin" "$root/usr/sbin" "$root/etc" "$root/tmp"
    chmod 1777 "$root/tmp"
    install -m 0755 "$bin/$binary" "$root/usr/local/bin/$binary"
    copy_libraries "$root" "$bin/$binary"
    for f in "$@"; do
        cp -L --parents "$f" "$root/"
        copy_libraries "$root" "$f"
    done
    printf 'root:x:0:0:root:/:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/:/sbin/nologin\n' >"$root/etc/passwd"
    printf 'root:x:0:\nnonroot:x:65532:\n' >"$root/etc/group"
    [ -z "${LINKS:-}" ] || (cd "$root" && eval "$LINKS")
    buildah umount "$ctr" >/dev/null
    buildah config \
        --cmd "[\"$binary\"]" \
        --user "$user" \
        --env PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --label org.opencontainers.image.title="ambit-$component" \
        --label org.opencontainers.image.version="$tag" \
        "$ctr"
    buildah commit --quiet --rm "$ctr" "$name" >/dev/null
    echo "    $(buildah images --format '{{.Size}}' "$name" | head -1)"
}

roots=()
[ -f /etc/ssl/certs/ca-certificates.crt ] && roots=(/etc/ssl/certs/ca-certificates.crt)

image ztunnel ztunnel 0:0
image control ambit-control 65532:65532
# The waypoint fetches JWKS over HTTPS with the system's roots.
image waypoint waypoint 65532:65532 "${roots[@]}"

# The node agent's tools, by the names net/src/redirect.rs runs (the xtables-nft
# multi-call binary answers to each iptables name it is linked as).
xtables=$(readlink -f "$(command -v iptables-nft)")
tools=("$(command -v nsenter)" "$(readlink -f "$(command -v ip)")" "$(command -v nft)" "$xtables")
extensions=(/usr/lib/x86_64-linux-gnu/xtables/*.so)
[ -e "${extensions[0]}" ] || extensions=()
# Each iptables name the agent runs, linked to the multi-call binary.
LINKS="for n in iptables iptables-save iptables-restore ip6tables ip6tables-save ip6tables-restore; do ln -sf $xtables usr/sbin/\$n; done"
LINKS=$LINKS image cni ambit-cni 0:0 "${tools[@]}" "${extensions[@]}"

echo "==> built"
buildah images --filter "reference=$registry/*:$tag"
