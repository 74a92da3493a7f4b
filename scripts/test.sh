#!/usr/bin/env bash
# Runs every Switchyard test: installs what the tests need (once), checks
# formatting, builds the workspace once (dev profile), then runs every suite.
# Benchmarks are not run here.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

say "tools"
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install cargo-nextest --locked
fi
cargo nextest --version | head -1

say "format"
cargo fmt --all -- --check

say "build (dev profile, every target)"
cargo build --workspace --all-targets

say "doc tests"
cargo test --workspace --doc --quiet

say "tests"
# The e2e crate starts the real binaries built above. Its summary line is
# the last thing printed.
cargo nextest run --workspace --no-fail-fast
