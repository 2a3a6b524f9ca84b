#!/usr/bin/env bash
# The local mesh demo, the README's first command: `ambitctl local up examples/bookshop`
# runs a two-node cluster on this machine made of network namespaces: the real
# ambit-control, a ztunnel and the node agent (ambit-cni) per node, pods made through
# each node's CNI chain, the demo app in every pod, the `bookshop` namespace captured
# in ambient mode at CNI ADD and `legacy` not. It then sends a request from
# each namespace to the catalog and shows who the catalog says called it: an identity
# over HBONE (mutual TLS), none in plaintext. Then it calls `orders`, which sits behind
# the bookshop's waypoint (an L7 proxy): a GET is allowed, a POST is denied with 403 by
# the waypoint's L7 AuthorizationPolicy, and the plaintext pod cannot go around it.
# Last, a canary: the waypoint splits `reviews` 90/10 between two versions by an
# HTTPRoute, and sends tagged requests to v2. The mesh keeps running afterwards;
# `ambitctl local down` removes it.
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
ambitctl="${CARGO_TARGET_DIR:-target}/debug/ambitctl"

"$ambitctl" local up examples/bookshop

echo
echo "==> bookshop/frontend (ambient) -> http://catalog.bookshop/ : HBONE, mutual TLS"
echo "\$ ambitctl local exec bookshop/frontend -- ambitctl app get http://catalog.bookshop/"
"$ambitctl" local exec bookshop/frontend -- ambitctl app get http://catalog.bookshop/
echo
echo "==> legacy/batch (not in the mesh) -> http://catalog.bookshop/ : plaintext"
echo "\$ ambitctl local exec legacy/batch -- ambitctl app get http://catalog.bookshop/"
"$ambitctl" local exec legacy/batch -- ambitctl app get http://catalog.bookshop/
echo
echo "==> bookshop/frontend -> http://orders.bookshop/books : through its waypoint (L7), GET allowed"
echo "\$ ambitctl local exec bookshop/frontend -- ambitctl app get http://orders.bookshop/books"
"$ambitctl" local exec bookshop/frontend -- ambitctl app get http://orders.bookshop/books
echo
echo "==> bookshop/frontend -> POST http://orders.bookshop/books : denied by the waypoint's L7 policy (orders-read-only)"
echo "\$ ambitctl local exec bookshop/frontend -- ambitctl app get -X POST http://orders.bookshop/books"
"$ambitctl" local exec bookshop/frontend -- ambitctl app get -X POST http://orders.bookshop/books || true
echo
echo
echo "==> legacy/batch (plaintext) -> http://orders.bookshop/books : refused, it may not go around the waypoint"
echo "\$ ambitctl local exec legacy/batch -- ambitctl app get http://orders.bookshop/books"
"$ambitctl" local exec legacy/batch -- ambitctl app get http://orders.bookshop/books || true
echo
echo "==> bookshop/frontend -> http://reviews.bookshop/ x100 : a canary, the waypoint routes 90 % to v1 and 10 % to v2 (HTTPRoute reviews-canary)"
echo "\$ ambitctl local exec bookshop/frontend -- ambitctl app get --count 100 http://reviews.bookshop/ | grep '^hello' | sort | uniq -c"
"$ambitctl" local exec bookshop/frontend -- ambitctl app get --count 100 http://reviews.bookshop/ | grep '^hello' | cut -d' ' -f1-3 | sort | uniq -c
echo
echo "==> the same with x-canary: yes : every request to v2"
echo "\$ ambitctl local exec bookshop/frontend -- ambitctl app get --count 10 -H 'x-canary: yes' http://reviews.bookshop/ | grep '^hello' | sort | uniq -c"
"$ambitctl" local exec bookshop/frontend -- ambitctl app get --count 10 -H 'x-canary: yes' http://reviews.bookshop/ | grep '^hello' | cut -d' ' -f1-3 | sort | uniq -c
echo
echo "The mesh keeps running. $ambitctl local down removes it (namespaces, rules, processes)."
