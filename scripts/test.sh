#!/usr/bin/env bash
# Runs every Switchyard test: installs what the tests need (once), checks
# formatting and the dependencies' licenses and duplicates (cargo deny),
# builds the workspace once (dev profile), then runs every suite: the Rust
# suites, the Python interop suite (tests/python) against the binaries built
# here, and the stack tests (tests/stack): scripts/up.sh --local and
# down.sh, and the compose end-to-end test on images of those same binaries
# (skipped, saying why, where no Docker daemon answers). Benchmarks are not
# run here (scripts/bench.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

# Where cargo builds (honours CARGO_TARGET_DIR and cargo config), absolute.
target_dir() {
    cargo metadata --format-version 1 --no-deps |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])'
}

say "tools"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
cargo nextest --version | head -1
if ! cargo deny --version >/dev/null 2>&1; then
    cargo install cargo-deny --locked
fi
cargo deny --version

# Real clients and origins the tests use, from Debian's packages: curl
# (HTTP/1.1, HTTP/2, TLS), nghttp (HTTP/2 frames) and nginx (an origin
# behind the ALB).
missing=()
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v nghttp >/dev/null 2>&1 || missing+=(nghttp2-client)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # The package starts a default site on port 80; the tests run their own.
    $SUDO systemctl disable --now nginx >/dev/null 2>&1 || $SUDO service nginx stop >/dev/null 2>&1 || true
fi
curl --version | head -1
/usr/sbin/nginx -v 2>&1

TARGET_DIR="$(target_dir)"
# The Python suite's packages live in a venv beside the build, pinned by
# tests/python/requirements.txt; pip runs only when that file changed.
VENV="$TARGET_DIR/python-venv"
REQS=tests/python/requirements.txt
if ! "$VENV/bin/python" -c 'import sys' >/dev/null 2>&1; then
    rm -rf "$VENV"
    python3 -m venv "$VENV" || {
        echo "python3 -m venv failed: install Python 3 with its venv module (Debian: python3-venv)" >&2
        exit 1
    }
fi
if ! cmp -s "$REQS" "$VENV/.requirements.installed"; then
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REQS"
    cp "$REQS" "$VENV/.requirements.installed"
fi
"$VENV/bin/python" --version
"$VENV/bin/python" -m pytest --version

say "format"
cargo fmt --all -- --check

say "licenses and duplicate dependencies (cargo deny, deny.toml)"
cargo deny --log-level error check licenses bans

say "build (dev profile, every target)"
cargo build --workspace --all-targets

say "doc tests"
cargo test --workspace --doc --quiet

say "tests (Rust)"
# The e2e crate starts the real binaries built above.
cargo nextest run --workspace --no-fail-fast

say "tests (Python interop, tests/python)"
# A grpcio client against the debug nlb built above. Its summary line is the
# last thing printed.
SWITCHYARD_NLB_BIN="$TARGET_DIR/debug/nlb" SWITCHYARD_ALB_BIN="$TARGET_DIR/debug/alb" \
    "$VENV/bin/python" -m pytest tests/python

say "the local stack (tests/stack/local_e2e.sh: scripts/up.sh --local, scripts/down.sh)"
bash tests/stack/local_e2e.sh "$TARGET_DIR"

say "the compose stack (tests/stack/compose_e2e.py)"
"$VENV/bin/python" tests/stack/compose_e2e.py --target-dir "$TARGET_DIR"
