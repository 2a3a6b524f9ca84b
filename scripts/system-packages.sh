#!/usr/bin/env bash
# Installs (Debian, apt-get, as root) the system packages the local mesh and the tests
# use, where they are missing: Python's venv for the interop tests; iproute2, iptables
# (with ip6tables and the -save/-restore tools), nftables (the outbound TPROXY rule),
# nsenter and sysctl for pod redirection and the local mesh; Debian's CNI plugins (ptp,
# host-local, ...), through which the local mesh creates pods; tcpdump, with which the
# end-to-end tests prove nothing crosses the node link in plaintext.
set -euo pipefail
need=()
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v ip >/dev/null || need+=(iproute2)
command -v iptables-restore >/dev/null || need+=(iptables)
command -v nft >/dev/null || need+=(nftables)
command -v nsenter >/dev/null || need+=(util-linux)
command -v sysctl >/dev/null || need+=(procps)
[ -x /usr/lib/cni/ptp ] || need+=(containernetworking-plugins)
command -v tcpdump >/dev/null || need+=(tcpdump)
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> installing ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need[@]}"
fi
