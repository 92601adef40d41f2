# shellcheck shell=bash
# Debian packages for the project's scripts, sourced by scripts/services.sh and
# scripts/check-deploy.sh; the caller defines `log` and `die`.

APT_UPDATED=0

# ensure_packages PKG... : apt-get install whatever is not installed yet (apt-get update once).
ensure_packages() {
    local missing=() pkg
    for pkg in "$@"; do
        if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
            missing+=("$pkg")
        fi
    done
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "missing packages (${missing[*]}) and not root; install them first"
    command -v apt-get >/dev/null || die "missing packages (${missing[*]}) and no apt-get"
    if ((APT_UPDATED == 0)); then
        log "apt-get update"
        apt-get update -qq
        APT_UPDATED=1
    fi
    log "installing ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
