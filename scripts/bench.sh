#!/usr/bin/env bash
# ztunnel's whole-path benchmark in the local mesh (as root): iperf3 (1 and 8 streams),
# sockperf 1 KB ping-pong latency, wrk new connections/s, each direct vs through two
# ztunnels in the same run. Release build. Report: target/bench-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in iperf3 sockperf wrk; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
cargo build -q --release --bins
cargo build -q --release -p ambit-tests --example bench
exec target/release/examples/bench
