#!/usr/bin/env bash
# Runs every check CI runs: starts the local services (PostgreSQL primary + replica, Redis, Kafka),
# then rustfmt, clippy (warnings are errors) and the whole workspace's tests against them.
# Usage: scripts/test.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -f "$HOME/.cargo/env" ]]; then
    # shellcheck source=/dev/null
    source "$HOME/.cargo/env"
fi
command -v cargo >/dev/null || {
    echo "test.sh: cargo not found on PATH (install Rust with rustup)" >&2
    exit 1
}

# A clean build of every test target takes about 3 GiB of disk under target/ (2.8 GiB measured).
NEEDED_GB=4
target_dir="${CARGO_TARGET_DIR:-target}"
mkdir -p "$target_dir"
free_kb=$(df -Pk "$target_dir" | awk 'NR == 2 { print $4 }')
if ((free_kb < NEEDED_GB * 1024 * 1024)); then
    echo "test.sh: warning: $((free_kb / 1024)) MiB free for $target_dir; a clean build needs about ${NEEDED_GB} GiB" >&2
fi

scripts/services.sh up

export PCF_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
export PCF_TEST_READ_DATABASE_URL=postgres://postgres@127.0.0.1:5433/postgres
export PCF_TEST_REDIS_URL=redis://127.0.0.1:6379
export PCF_TEST_KAFKA_BROKERS=127.0.0.1:9092

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

# Most tests wait on the services rather than on a core: eight at a time keep both cores
# busy (one binary holds nearly all of them; tests needing the PostgreSQL server to
# themselves take a lock of their own). Set RUST_TEST_THREADS to change it.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-8}"

step "cargo test --workspace --all-targets"
cargo test --workspace --all-targets
