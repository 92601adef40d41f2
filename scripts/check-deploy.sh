#!/usr/bin/env bash
# Checks the deployment files under deploy/ with the real tools:
#
#   promtool check rules   deploy/prometheus/rules/*.yml      (syntax, PromQL, templates)
#   promtool test rules    deploy/prometheus/tests/*.test.yml (unit tests: each alert fires
#                                                               and does not fire)
#   promtool check config  deploy/prometheus/prometheus.yml   (the example configuration)
#   yamllint               deploy/prometheus                  (only when yamllint is installed)
#   the Grafana dashboard  deploy/grafana/pcf.json is JSON    (only when python3 is installed)
#
# promtool comes from Debian's `prometheus` package, installed with apt-get when promtool is not
# on PATH, as scripts/services.sh installs its packages (needs root). On a host that runs systemd,
# installing that package also enables and starts a Prometheus server; this script never starts
# one itself. PROMTOOL=/path/to/promtool uses another promtool instead.
#
# The integration test tests/it/deploy.rs runs this script, then checks the metric names the
# rules and the dashboard use against the /metrics of a running PCF.
# Usage: scripts/check-deploy.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive
export PATH="${PATH}:/usr/sbin:/sbin"

log() { printf 'check-deploy: %s\n' "$*" >&2; }
die() {
    printf 'check-deploy: error: %s\n' "$*" >&2
    exit 1
}

# shellcheck source=lib/packages.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/packages.sh"

PROMTOOL="${PROMTOOL:-promtool}"
if ! command -v "$PROMTOOL" >/dev/null; then
    [[ $PROMTOOL == promtool ]] || die "PROMTOOL=$PROMTOOL is not an executable"
    ensure_packages prometheus
    command -v promtool >/dev/null || die "the prometheus package did not install promtool"
fi
log "$("$PROMTOOL" --version 2>&1 | head -n 1)"

shopt -s nullglob
rules=(deploy/prometheus/rules/*.yml)
tests=(deploy/prometheus/tests/*.test.yml)
((${#rules[@]} > 0)) || die "no rule files in deploy/prometheus/rules/"
((${#tests[@]} > 0)) || die "no unit tests in deploy/prometheus/tests/"

log "promtool check rules ${rules[*]}"
"$PROMTOOL" check rules "${rules[@]}"

log "promtool test rules ${tests[*]}"
"$PROMTOOL" test rules "${tests[@]}"

log "promtool check config deploy/prometheus/prometheus.yml"
"$PROMTOOL" check config deploy/prometheus/prometheus.yml

if command -v yamllint >/dev/null; then
    log "yamllint deploy/prometheus"
    yamllint --strict -c deploy/prometheus/.yamllint.yml deploy/prometheus
else
    log "yamllint is not installed; skipping the YAML style check"
fi

if command -v python3 >/dev/null; then
    log "deploy/grafana/pcf.json parses as JSON"
    python3 -m json.tool deploy/grafana/pcf.json >/dev/null
else
    log "python3 is not installed; the dashboard's JSON is checked by tests/it/deploy.rs"
fi

log "ok"
