#!/usr/bin/env bash
# Ambit's whole test suite: formatting, lints, the Kubernetes manifests against the Helm
# chart and the Kubernetes schemas, Rust unit/component/integration tests, then the
# interoperability tests that call the real binaries from foreign clients
# (Python grpcio). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "system packages"
if [ "$(id -u)" -eq 0 ]; then
    scripts/system-packages.sh
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries"
cargo build --workspace --bins --locked

# The Python interop clients need their venv before the Rust tests too: the end-to-end
# HBONE interop test (tests/tests/hbone_interop.rs) runs tests/interop/hbone_client.py.
step "Python venv for the interop clients"
venv=.venv
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
export AMBIT_PYTHON="$PWD/$venv/bin/python"

# The manifests and the Helm chart (scripts/manifests.py): Helm's library (helm-sdkpy)
# needs Python >= 3.12, which the system's python3 is not; pyenv's is used.
# After "build binaries": the check compares target/debug/ambitctl manifest generate
# with the chart rendered by Helm.
step "Kubernetes manifests: helm lint, chart == deploy/ambit.yaml == ambitctl manifest generate, Kubernetes 1.32 schemas, kustomize"
python312=""
for candidate in python3.12 "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
        python312=$candidate
        break
    fi
done
[ -n "$python312" ] || { echo "Python >= 3.12 is needed for scripts/manifests.py" >&2; exit 1; }
command -v kubectl >/dev/null || { echo "kubectl is needed (kubectl kustomize deploy/)" >&2; exit 1; }
deploy_venv=.venv-deploy
if [ ! -x "$deploy_venv/bin/python" ]; then
    "$python312" -m venv "$deploy_venv"
fi
"$deploy_venv/bin/pip" install --quiet --disable-pip-version-check -r deploy/requirements.txt
"$deploy_venv/bin/python" scripts/manifests.py check

step "Rust tests"
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-fail-fast
    # nextest does not run doc tests.
    cargo test --workspace --doc --locked
else
    cargo test --workspace --locked --no-fail-fast
fi

step "interop tests (Python grpcio client against the real binaries)"
AMBIT_CA_BIN="$(realpath "${CARGO_TARGET_DIR:-target}")/debug/ambit-ca" "$venv/bin/python" -m pytest -q tests/interop
