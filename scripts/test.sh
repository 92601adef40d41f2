#!/usr/bin/env bash
# Runs every check CI runs: starts the local services (PostgreSQL primary + replica, Redis, Kafka,
# and the fleet's engines of --ha), then rustfmt, clippy (warnings are errors) and the whole
# workspace's tests against them, the fleet's deploys and faults under load among them.
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

# The services start in the background while the workspace builds: they need about half a
# minute, mostly waiting on Kafka's JVM, and the build needs the cores.
services_log="$target_dir/services-up.log"
scripts/services.sh up --ha >"$services_log" 2>&1 &
services_pid=$!

export PCF_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres
export PCF_TEST_READ_DATABASE_URL=postgres://postgres@127.0.0.1:5433/postgres
export PCF_TEST_REDIS_URL=redis://127.0.0.1:6379
export PCF_TEST_KAFKA_BROKERS=127.0.0.1:9092
export PCF_TEST_REDIS_CLUSTER_URL=redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002
export PCF_TEST_HA_DATABASE_URL=postgres://postgres@127.0.0.1:5442,127.0.0.1:5443/postgres
export PCF_TEST_HA_READ_DATABASE_URL=postgres://postgres@127.0.0.1:5444/postgres,postgres://postgres@127.0.0.1:5443/postgres
# The fleet's tests (tests/process/fleet.rs) on the engines of --ha, at their defaults.
export PCF_TEST_FLEET=1

step() { printf '\n==> %s\n' "$*" >&2; }

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

# The deployment artifacts: the Helm chart linted and rendered, its renderings checked, the
# scripts shellchecked (Helm is built once into a cache, about 7 minutes the first time).
step "scripts/check-chart.sh"
scripts/check-chart.sh

# Clippy lints every workspace target while the tests build, not in a build of its own:
# clippy-driver is the workspace's compiler here (what `cargo clippy` runs, with its arguments
# in CLIPPY_ARGS), so the dependencies compile once, for the tests, instead of once more for a
# check. The lints, and `-D warnings`, are those of
# `cargo clippy --workspace --all-targets -- -D warnings`.
clippy_driver="$(rustc --print sysroot)/bin/clippy-driver"
[[ -x "$clippy_driver" ]] || {
    echo "test.sh: clippy-driver not found (rustup component add clippy)" >&2
    exit 1
}
export RUSTC_WORKSPACE_WRAPPER="$clippy_driver"
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"

step "cargo test --workspace --all-targets --no-run, linted by clippy (-D warnings)"
cargo test --workspace --all-targets --no-run

step "scripts/services.sh up --ha"
if ! wait "$services_pid"; then
    cat "$services_log" >&2
    echo "test.sh: the services did not start" >&2
    exit 1
fi
cat "$services_log" >&2

# Most tests wait on the services rather than on a core: eight at a time keep both cores
# busy (one binary holds nearly all of them; tests needing the PostgreSQL server to
# themselves take a lock of their own). Set RUST_TEST_THREADS to change it.
export RUST_TEST_THREADS="${RUST_TEST_THREADS:-8}"

fleet_report="$target_dir/tmp/fleet-report.md"
rm -f "$fleet_report"

step "cargo test --workspace --all-targets"
cargo test --workspace --all-targets

if [[ -f $fleet_report ]]; then
    step "the fleet under load ($fleet_report)"
    cat "$fleet_report" >&2
fi
