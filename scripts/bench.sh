#!/usr/bin/env bash
# ztunnel's whole-path benchmark in the local mesh (as root): iperf3 (1 and 8 streams),
# sockperf 1 KB ping-pong latency, wrk new connections/s and hey at a fixed rate against
# nginx, each direct vs through two ztunnels in the same run, and ztunnel memory per
# idle proxied connection. Release build. Report: target/bench-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in iperf3 sockperf wrk hey; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v nginx >/dev/null || need+=(nginx-light)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build -q --release --bins
cargo build -q --release -p ambit-tests --example bench
exec target/release/examples/bench "$@"
