#!/usr/bin/env bash
# The local mesh demo: a two-node cluster on this machine, made of network namespaces.
# It runs the real ambit-control and one ztunnel per node, with two pods enrolled in ambient
# mode, and sends HTTP between them over HBONE (mutual TLS). It keeps running, printing
# how to look inside, until Ctrl-C; then it tears everything down.
#
# Needs root (network namespaces, iptables); installs what it needs that is missing
# (iproute2, iptables, nftables, Debian's containernetworking-plugins) with apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "the local mesh creates network namespaces: run as root" >&2
    exit 1
fi
scripts/system-packages.sh
echo "==> building"
cargo build -q --bins
cargo build -q -p ambit-tests --example local_mesh
exec target/debug/examples/local_mesh
