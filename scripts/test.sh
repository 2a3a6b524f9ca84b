#!/usr/bin/env bash
# Ambit's whole test suite: formatting, lints, Rust unit/component/integration tests,
# then the interoperability tests that call the real binaries from foreign clients
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
