#!/usr/bin/env bash
# Starts Ambit's certificate authority locally and shows it issuing SPIFFE
# certificates: to a workload for itself, and to a node agent (ztunnel) for a pod on
# its node. The CA keeps serving on 127.0.0.1:15012 until Ctrl-C.
#
# This is what exists today (the foundation); the local mesh of network namespaces
# replaces it as the demo once ztunnel and the control plane land.
set -euo pipefail
cd "$(dirname "$0")/.."

work=${AMBIT_DEMO_DIR:-.ambit-demo}
listen=${AMBIT_DEMO_LISTEN:-127.0.0.1:15012}
mkdir -p "$work"

echo "==> building"
cargo build -q -p ambit-ca --bin ambit-ca --example request_cert
bin=target/debug

# Fresh random tokens for this run.
rand() { head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n'; }
workload_token=$(rand)
agent_token=$(rand)
cat > "$work/tokens.yaml" <<YAML
- token: "$workload_token"
  identity: spiffe://cluster.local/ns/shop/sa/cart
- token: "$agent_token"
  identity: spiffe://cluster.local/ns/ambit-system/sa/ztunnel
  nodeAgent: true
  node: node-a
YAML
chmod 600 "$work/tokens.yaml"

echo "==> starting ambit-ca on $listen (root in $work/ca)"
"$bin/ambit-ca" --root-dir "$work/ca" --listen "$listen" --tokens "$work/tokens.yaml" \
    2> >(tee "$work/ca.log" >&2) &
ca_pid=$!
trap 'kill $ca_pid 2>/dev/null; wait $ca_pid 2>/dev/null' EXIT

for _ in $(seq 1 100); do
    grep -q "CA serving" "$work/ca.log" 2>/dev/null && break
    kill -0 $ca_pid 2>/dev/null || { echo "ambit-ca exited; see $work/ca.log" >&2; exit 1; }
    sleep 0.1
done
grep -q "CA serving" "$work/ca.log" || { echo "ambit-ca did not start" >&2; exit 1; }

echo "==> a workload asks for its own identity"
"$bin/examples/request_cert" --ca "$listen" --root "$work/ca/root-cert.pem" \
    --token "$workload_token" --identity spiffe://cluster.local/ns/shop/sa/cart --out "$work/cart"

echo "==> ztunnel (node agent) asks for a pod on its node"
"$bin/examples/request_cert" --ca "$listen" --root "$work/ca/root-cert.pem" \
    --token "$agent_token" --impersonate \
    --identity spiffe://cluster.local/ns/shop/sa/pay --out "$work/pay"

echo "==> the workload may not ask for someone else (expect PermissionDenied)"
if "$bin/examples/request_cert" --ca "$listen" --root "$work/ca/root-cert.pem" \
    --token "$workload_token" --impersonate \
    --identity spiffe://cluster.local/ns/shop/sa/pay --out "$work/denied"; then
    echo "unexpectedly issued" >&2; exit 1
fi

if command -v openssl >/dev/null; then
    echo "==> the issued leaf"
    openssl x509 -in "$work/cart/cert-chain.pem" -noout -subject -ext subjectAltName,extendedKeyUsage -dates
fi

echo
echo "CA serving on $listen; root: $work/ca/root-cert.pem; tokens: $work/tokens.yaml"
echo "Ctrl-C to stop."
wait $ca_pid
