#!/usr/bin/env bash
# Checks the Kubernetes deployment files and the project's shell scripts with the real tools:
#
#   helm lint --strict        deploy/helm/pcf, with each values file of deploy/helm/pcf/ci/
#   helm template             the same variants, rendered; each rendering passes yamllint and
#                             deploy/helm/check_rendered.py (every role's Deployment with both
#                             probes, resources, security context, PodDisruptionBudget,
#                             ConfigMap and Secret; no secret in a ConfigMap; ...)
#   helm template (refused)   values the chart must refuse, each with its message: more
#                             projectors than Kafka partitions, a made Secret without a
#                             database URL, PCF_KEK together with a KEK file, production
#                             without a KEK, a misspelt key (values.schema.json)
#   yamllint                  the chart's plain YAML (deploy/helm/.yamllint) and
#                             deploy/prometheus (with its own settings)
#   the Containerfile         deploy/container/Containerfile has what the chart relies on
#                             (it is not built here: there is no container engine)
#   the shell scripts         scripts/*.sh scripts/lib/*.sh scripts/kafka/*.sh, by shellcheck
#
# Installs what is missing: Debian's yamllint, shellcheck and python3-yaml through
# scripts/lib/packages.sh (needs root, like scripts/services.sh), and Helm built with Go
# from the Go module proxy into a cache outside the repository,
# ${PCF_CACHE:-~/.cache/pcf}/helm-<version>/bin (about 4 minutes on two cores, once).
# HELM=/path/to/helm uses another Helm instead; GO=/path/to/go another Go.
# Usage: scripts/check-chart.sh
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

export DEBIAN_FRONTEND=noninteractive

HELM_VERSION=v4.3.2
CHART=deploy/helm/pcf
RELEASE=pcf

log() { printf 'check-chart: %s\n' "$*" >&2; }
die() {
    printf 'check-chart: error: %s\n' "$*" >&2
    exit 1
}

# shellcheck source=lib/packages.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/packages.sh"

ensure_packages yamllint shellcheck python3 python3-yaml
# Debian's python3, which has the yaml module (another python3 may come first on PATH).
PYTHON=/usr/bin/python3

# Helm: built once with `go install` into the cache. Go's module and build caches for it are
# temporary, so the cache keeps only the binary.
install_helm() {
    local cache="${PCF_CACHE:-${HOME:-/root}/.cache/pcf}/helm-${HELM_VERSION}"
    HELM="${cache}/bin/helm"
    [[ -x $HELM ]] && return 0
    local go="${GO:-}"
    if [[ -z $go ]]; then
        go=$(command -v go || true)
        [[ -n $go ]] || go=/usr/local/go/bin/go
    fi
    [[ -x $go ]] || die "Go is needed to build Helm (not on PATH nor at /usr/local/go/bin/go; set GO=)"
    mkdir -p "$cache"
    local work
    work=$(mktemp -d "${cache}/build.XXXXXX")
    log "building Helm ${HELM_VERSION} with $("$go" version) from the Go module proxy (a few minutes, once)"
    if ! GOPATH="${work}/gopath" GOCACHE="${work}/gocache" GOBIN="${work}/bin" GOFLAGS=-modcacherw \
        "$go" install "helm.sh/helm/v4/cmd/helm@${HELM_VERSION}" >"${work}/build.log" 2>&1; then
        tail -n 20 "${work}/build.log" >&2
        rm -rf "$work"
        die "go install helm.sh/helm/v4/cmd/helm@${HELM_VERSION} failed (log above)"
    fi
    mkdir -p "${cache}/bin"
    mv "${work}/bin/helm" "$HELM"
    rm -rf "$work"
}

if [[ -n ${HELM:-} ]]; then
    [[ -x $HELM ]] || die "HELM=$HELM is not an executable"
else
    install_helm
fi
log "$("$HELM" version --short 2>&1 | head -n 1) at $HELM"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

log "yamllint the chart's plain YAML"
yamllint --strict -c deploy/helm/.yamllint "$CHART/Chart.yaml" "$CHART/values.yaml" "$CHART"/ci/*.yaml

log "yamllint deploy/prometheus (its own settings)"
yamllint --strict -c deploy/prometheus/.yamllint.yml deploy/prometheus

shopt -s nullglob
variants=("$CHART"/ci/*-values.yaml)
((${#variants[@]} > 0)) || die "no values files in $CHART/ci/"

for values in "${variants[@]}"; do
    variant=$(basename "$values" -values.yaml)
    log "helm lint --strict, helm template: $variant"
    "$HELM" lint --strict "$CHART" -f "$values" >"$work/lint.log" 2>&1 || {
        cat "$work/lint.log" >&2
        die "helm lint failed for $variant"
    }
    "$HELM" template "$RELEASE" "$CHART" -f "$values" >"$work/$variant.yaml"
    yamllint --strict -c deploy/helm/.yamllint "$work/$variant.yaml"
    "$PYTHON" deploy/helm/check_rendered.py "$variant" "$work/$variant.yaml"
done

# refused MESSAGE HELM_ARGS...: helm template must fail, saying MESSAGE.
refused() {
    local message=$1
    shift
    if "$HELM" template "$RELEASE" "$CHART" "$@" >/dev/null 2>"$work/refused.log"; then
        die "helm template $* rendered; it must refuse with: $message"
    fi
    grep -qF -- "$message" "$work/refused.log" || {
        cat "$work/refused.log" >&2
        die "helm template $* failed, but without: $message"
    }
    log "refused as it must be: $*"
}
refused "projector.replicas (13) exceeds kafka.partitions (12)" --set projector.replicas=13
refused "projector.replicas (4) exceeds kafka.partitions (3)" --set kafka.partitions=3 --set projector.replicas=4
refused "secret.create needs secret.databaseUrl" --set secret.create=true
refused "set secret.kek or kekFile, not both" -f "$CHART/ci/created-secret-values.yaml" \
    --set kekFile.enabled=true --set kekFile.content=x
refused "production needs a key-encryption key" -f "$CHART/ci/created-secret-values.yaml" \
    --set secret.kek=
refused "additional properties 'projectors' not allowed" --set projectors.replicas=3

log "the Containerfile"
"$PYTHON" - deploy/container/Containerfile <<'EOF'
import re, sys
text = open(sys.argv[1], encoding="utf-8").read()
lines = re.sub(r"\\\n", " ", text).splitlines()
instr = [l.strip() for l in lines if l.strip() and not l.strip().startswith("#")]
froms = [l for l in instr if l.upper().startswith("FROM ")]
def last(word):
    found = [l for l in instr if l.upper().startswith(word + " ")]
    return found[-1] if found else ""
problems = []
if len(froms) < 2:
    problems.append("not multi-stage")
if not re.search(r"cargo build --release --locked -p pcf --bin pcf", text):
    problems.append("does not build pcf in release from Cargo.lock")
m = re.search(r'^rust-version = "([0-9.]+)"', open("Cargo.toml", encoding="utf-8").read(), re.M)
r = re.search(r"^ARG RUST_VERSION=([0-9.]+)", text, re.M)
if not (m and r) or tuple(map(int, r.group(1).split("."))) < tuple(map(int, m.group(1).split("."))):
    problems.append("RUST_VERSION is below the workspace's rust-version")
user = last("USER").split()[1:] if last("USER") else []
if not user or user[0].split(":")[0] in ("root", "0"):
    problems.append("the runtime does not run as a non-root user")
elif user[0].split(":")[0] != "10001":
    problems.append("the runtime user is not 10001, the chart's runAsUser")
if "PCF_LISTEN=0.0.0.0:8080" not in text:
    problems.append("PCF_LISTEN is not 0.0.0.0:8080")
if "PCF_DATA_DIR=/var/lib/pcf" not in text:
    problems.append("PCF_DATA_DIR is not /var/lib/pcf")
if last("ENTRYPOINT") != 'ENTRYPOINT ["/usr/local/bin/pcf"]' or last("CMD") != 'CMD ["serve"]':
    problems.append("the entrypoint is not pcf with serve as its command")
if last("STOPSIGNAL") not in ("STOPSIGNAL SIGTERM", "STOPSIGNAL SIGINT"):
    problems.append("the stop signal is neither SIGTERM nor SIGINT (what pcf serve stops gracefully on)")
if "org.opencontainers.image.title" not in text:
    problems.append("no OCI labels")
for p in problems:
    print(f"Containerfile: {p}", file=sys.stderr)
sys.exit(1 if problems else 0)
EOF

log "shellcheck scripts"
shellcheck -x -P SCRIPTDIR scripts/*.sh scripts/lib/*.sh scripts/kafka/*.sh

log "ok"
