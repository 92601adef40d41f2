#!/usr/bin/env bash
# PCF as a fleet on one machine, on the engines of `scripts/services.sh up --ha`, all on loopback:
#
#   haproxy   127.0.0.1:8480   in front of the API instances, health-checking /health/ready;
#                              admin socket $FLEET_DIR/haproxy.sock
#   api1-3    127.0.0.1:8481-8483  `pcf serve --role api` (the "blue" instances)
#   api4-6    127.0.0.1:8491-8493  the "green" instances of a blue-green switch (not started by up)
#   relay1-2  127.0.0.1:8484-8485  `pcf serve --role relay` (one holds the lease, one stands by)
#   proj1-2   127.0.0.1:8486-8487  `pcf serve --role projector` (each in both view groups)
#
# Usage: scripts/fleet.sh COMMAND [NAME]
#
#   up                starts haproxy and every instance above that is not running (blue API)
#   down              stops every instance (SIGTERM, then SIGKILL after 30 s) and haproxy
#   status            one line per instance; exits non-zero if one of those `up` starts is down
#   start NAME        starts one instance and waits until it is ready
#   stop NAME         SIGTERM, waits for it to exit (graceful shutdown)
#   kill NAME         SIGKILL, at once
#   rolling-restart   each API instance in turn: drained in haproxy, stopped, started, put back
#   blue-green        starts the other colour's three API instances, switches haproxy to them,
#                     drains and stops the old ones
#   haproxy CMD...    one command on haproxy's admin socket (e.g. "show servers state api")
#
# Environment: PCF_BIN (default target/release/pcf, else target/debug/pcf), FLEET_DIR (state,
# logs and pid files, default target/fleet), FLEET_DRAIN_TIMEOUT (seconds, default 30), and the
# engines, by default those of --ha:
# PCF_DATABASE_URL, PCF_READ_DATABASE_URL, PCF_REDIS_URL, PCF_KAFKA_BROKERS, PCF_KAFKA_TOPIC.
# The instances share a KEK and a JWT secret generated once into FLEET_DIR (or PCF_KEK and
# PCF_JWT_SECRET when set). Development and tests only: no TLS, loopback only.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

log() { printf 'fleet: %s\n' "$*" >&2; }
die() {
    printf 'fleet: error: %s\n' "$*" >&2
    exit 1
}
# shellcheck source=lib/packages.sh
source scripts/lib/packages.sh

# Seconds a drain waits for the requests of an instance (FLEET_DRAIN_TIMEOUT, default 30).
DRAIN_TIMEOUT="${FLEET_DRAIN_TIMEOUT:-30}"
[[ $DRAIN_TIMEOUT =~ ^[0-9]{1,5}$ ]] || die "FLEET_DRAIN_TIMEOUT must be a number of seconds"
FLEET_DIR="${FLEET_DIR:-target/fleet}"
mkdir -p "$FLEET_DIR"
FLEET_DIR=$(cd "$FLEET_DIR" && pwd)
if [[ -z ${PCF_BIN:-} ]]; then
    PCF_BIN=target/release/pcf
    [[ -x $PCF_BIN ]] || PCF_BIN=target/debug/pcf
fi
PCF_BIN=$(realpath "$PCF_BIN" 2>/dev/null) || die "no pcf binary (build one, or set PCF_BIN)"
[[ -x $PCF_BIN ]] || die "$PCF_BIN is not executable"

HAPROXY_PORT=8480
HAPROXY_SOCK="$FLEET_DIR/haproxy.sock"
BLUE=(api1 api2 api3)
GREEN=(api4 api5 api6)
WORKERS=(relay1 relay2 proj1 proj2)

export PCF_DATABASE_URL="${PCF_DATABASE_URL:-postgres://postgres@127.0.0.1:5442,127.0.0.1:5443/postgres}"
export PCF_READ_DATABASE_URL="${PCF_READ_DATABASE_URL:-postgres://postgres@127.0.0.1:5444/postgres,postgres://postgres@127.0.0.1:5443/postgres}"
export PCF_REDIS_URL="${PCF_REDIS_URL:-redis://127.0.0.1:7000,redis://127.0.0.1:7001,redis://127.0.0.1:7002}"
export PCF_KAFKA_BROKERS="${PCF_KAFKA_BROKERS:-127.0.0.1:9192,127.0.0.1:9193,127.0.0.1:9194}"
export PCF_ENV="${PCF_ENV:-production}"
export PCF_LOG="${PCF_LOG:-info}"
export PCF_LOG_FORMAT="${PCF_LOG_FORMAT:-json}"

# port NAME / role NAME : an instance's HTTP port and role.
port() {
    case $1 in
    api[1-3]) echo $((8480 + ${1#api})) ;;
    api[4-6]) echo $((8487 + ${1#api})) ;;
    relay[1-2]) echo $((8483 + ${1#relay})) ;;
    proj[1-2]) echo $((8485 + ${1#proj})) ;;
    *) die "no instance named '$1' (api1-6, relay1-2, proj1-2)" ;;
    esac
}
role() {
    case $1 in
    api*) echo api ;;
    relay*) echo relay ;;
    proj*) echo projector ;;
    esac
}

secrets() {
    if [[ -z ${PCF_KEK:-} ]]; then
        [[ -s $FLEET_DIR/kek ]] || head -c 32 /dev/urandom | base64 >"$FLEET_DIR/kek"
        PCF_KEK=$(<"$FLEET_DIR/kek")
        export PCF_KEK PCF_KEK_ID=fleet
    fi
    if [[ -z ${PCF_JWT_SECRET:-} ]]; then
        [[ -s $FLEET_DIR/jwt-secret ]] || head -c 32 /dev/urandom | base64 | tr -d '\n=' >"$FLEET_DIR/jwt-secret"
        PCF_JWT_SECRET=$(<"$FLEET_DIR/jwt-secret")
        export PCF_JWT_SECRET
    fi
    # Requests arrive through haproxy, which names the client in X-Forwarded-For; the load of a
    # fault test comes from few subjects, so the per-subject limits are high.
    cat >"$FLEET_DIR/pcf.toml" <<EOF
# Written by scripts/fleet.sh.
shutdown_delay_ms = 1500
trusted_proxies = "127.0.0.1"
rate_limit_authenticated = 1000000
rate_limit_premium = 1000000
EOF
    export PCF_CONFIG="$FLEET_DIR/pcf.toml"
}

# pid_of NAME : the pid of a running instance, checked against its command line (whichever
# binary started it), so a recycled pid is not taken for it.
pid_of() {
    local file="$FLEET_DIR/$1.pid" pid
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" |
        grep -qF "serve --role $(role "$1") --listen 127.0.0.1:$(port "$1")" || return 1
    echo "$pid"
}

ready() { [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$(port "$1")/health/ready") == 200 ]]; }

wait_for() {
    local what=$1 deadline=$((SECONDS + ${FLEET_TIMEOUT:-90}))
    shift
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || die "timed out waiting for ${what}"
        sleep 0.2
    done
}

start() {
    local name=$1 p
    if pid_of "$name" >/dev/null; then
        log "$name already running"
    else
        p=$(port "$name")
        log "starting $name ($(role "$name")) on 127.0.0.1:$p"
        setsid nohup "$PCF_BIN" serve --role "$(role "$name")" --listen "127.0.0.1:$p" \
            >>"$FLEET_DIR/$name.log" 2>&1 </dev/null &
        echo $! >"$FLEET_DIR/$name.pid"
    fi
    wait_for "$name to be ready (see $FLEET_DIR/$name.log)" ready "$name"
}

stop() {
    local name=$1 pid deadline
    pid=$(pid_of "$name") || return 0
    log "stopping $name (pid $pid)"
    kill -TERM "$pid"
    deadline=$((SECONDS + 30))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "$name did not stop within 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        sleep 0.1
    done
    rm -f "$FLEET_DIR/$name.pid"
}

kill9() {
    local pid
    pid=$(pid_of "$1") || die "$1 is not running"
    log "kill -9 $1 (pid $pid)"
    kill -KILL "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    rm -f "$FLEET_DIR/$1.pid"
}

# ---------------------------------------------------------------------------------------------
# haproxy

haproxy_cmd() { printf '%s\n' "$*" | socat - "UNIX-CONNECT:$HAPROXY_SOCK"; }

haproxy_running() { [[ -S $HAPROXY_SOCK ]] && haproxy_cmd "show info" 2>/dev/null | grep -q '^Pid:'; }

haproxy_up() {
    ensure_packages haproxy socat curl
    haproxy_running && return 0
    local server lines=""
    for server in "${BLUE[@]}"; do
        lines+="    server ${server} 127.0.0.1:$(port "$server") check"$'\n'
    done
    for server in "${GREEN[@]}"; do
        lines+="    server ${server} 127.0.0.1:$(port "$server") check"$'\n'
    done
    cat >"$FLEET_DIR/haproxy.cfg" <<EOF
# Written by scripts/fleet.sh.
global
    stats socket ${HAPROXY_SOCK} mode 600 level admin
    pidfile ${FLEET_DIR}/haproxy.pid
    log stdout format raw local0 notice

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout tunnel 1h
    # A request whose connection failed goes to another instance (never a request an
    # instance may have begun to serve).
    retries 3
    option redispatch 1
    retry-on conn-failure

frontend pcf
    bind 127.0.0.1:${HAPROXY_PORT}
    option forwardfor
    default_backend api

backend api
    balance roundrobin
    option httpchk GET /health/ready
    http-check expect status 200
    # A readiness check waits up to 1.5 s on a replica that does not answer; an instance that
    # begins to stop answers 503 for shutdown_delay_ms (1.5 s), longer than two checks.
    timeout check 3s
    default-server inter 500ms fall 2 rise 2
${lines}
EOF
    haproxy -c -q -f "$FLEET_DIR/haproxy.cfg" || die "haproxy rejects $FLEET_DIR/haproxy.cfg"
    log "starting haproxy on 127.0.0.1:${HAPROXY_PORT}"
    rm -f "$HAPROXY_SOCK"
    setsid nohup haproxy -f "$FLEET_DIR/haproxy.cfg" >>"$FLEET_DIR/haproxy.log" 2>&1 </dev/null &
    wait_for "haproxy's admin socket" haproxy_running
    # The green instances stand in maintenance until a blue-green switch (a server the
    # configuration disables cannot be enabled at run time).
    for server in "${GREEN[@]}"; do haproxy_cmd "set server api/${server} state maint" >/dev/null; done
}

haproxy_down() {
    haproxy_running || return 0
    local pid
    pid=$(haproxy_cmd "show info" | sed -n 's/^Pid: //p')
    log "stopping haproxy (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done
    rm -f "$HAPROXY_SOCK"
}

# server_state NAME : haproxy's operational state of a server: 2 = up (running).
server_up() { haproxy_cmd "show servers state api" | awk -v s="$1" '$4 == s && $6 == 2 && $7 == 0 { f = 1 } END { exit !f }'; }

# sessions NAME : the requests haproxy has in flight on a server.
sessions() { haproxy_cmd "show stat" | awk -F, -v s="$1" '$1 == "api" && $2 == s { print $5 }'; }

no_sessions() { [[ $(sessions "$1") == 0 ]]; }

# drain NAME : no new request for NAME, and a wait (FLEET_DRAIN_TIMEOUT, 30 s) for those it
# serves. What is still open after it (logged, with haproxy's sessions on NAME) finishes in
# NAME's graceful stop, which serves open requests to their end.
drain() {
    haproxy_cmd "set server api/$1 state drain" >/dev/null
    local deadline=$((SECONDS + DRAIN_TIMEOUT))
    until no_sessions "$1"; do
        if ((SECONDS >= deadline)); then
            log "$1 still has $(sessions "$1") requests in haproxy after ${DRAIN_TIMEOUT}s; its graceful stop serves them"
            haproxy_cmd "show sess" | grep -F "srv=$1 " >&2 || true
            return 0
        fi
        sleep 0.2
    done
}

enable() {
    haproxy_cmd "set server api/$1 state ready" >/dev/null
    wait_for "haproxy to see $1 up" server_up "$1"
}

# The colour serving now: blue unless api4 is up in haproxy.
serving() {
    if server_up api4 2>/dev/null; then echo green; else echo blue; fi
}

# ---------------------------------------------------------------------------------------------

cmd_up() {
    secrets
    haproxy_up
    local name
    for name in "${WORKERS[@]}" "${BLUE[@]}"; do start "$name"; done
    for name in "${BLUE[@]}"; do enable "$name"; done
    cmd_status
}

cmd_down() {
    local name
    for name in "${BLUE[@]}" "${GREEN[@]}" "${WORKERS[@]}"; do stop "$name"; done
    haproxy_down
}

cmd_status() {
    local name rc=0 pid
    if haproxy_running; then
        echo "haproxy  up    127.0.0.1:${HAPROXY_PORT}"
    else
        echo "haproxy  down  127.0.0.1:${HAPROXY_PORT}"
        rc=1
    fi
    for name in "${BLUE[@]}" "${GREEN[@]}" "${WORKERS[@]}"; do
        if pid=$(pid_of "$name"); then
            echo "$name  up    127.0.0.1:$(port "$name") ($(role "$name"), pid $pid)"
        else
            echo "$name  down  127.0.0.1:$(port "$name") ($(role "$name"))"
            [[ $name == api[4-6] ]] || rc=1
        fi
    done
    return "$rc"
}

cmd_rolling_restart() {
    secrets
    local name colour
    colour=$(serving)
    local names=("${BLUE[@]}")
    [[ $colour == green ]] && names=("${GREEN[@]}")
    for name in "${names[@]}"; do
        drain "$name"
        stop "$name"
        start "$name"
        enable "$name"
    done
}

cmd_blue_green() {
    secrets
    local old=("${BLUE[@]}") new=("${GREEN[@]}") name
    if [[ $(serving) == green ]]; then
        old=("${GREEN[@]}")
        new=("${BLUE[@]}")
    fi
    for name in "${new[@]}"; do start "$name"; done
    for name in "${new[@]}"; do enable "$name"; done
    for name in "${old[@]}"; do haproxy_cmd "set server api/$name state drain" >/dev/null; done
    for name in "${old[@]}"; do drain "$name"; done
    for name in "${old[@]}"; do stop "$name"; done
    for name in "${old[@]}"; do haproxy_cmd "set server api/$name state maint" >/dev/null; done
}

case "${1:-}" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
start)
    secrets
    start "${2:?start NAME}"
    if [[ $2 == api* ]]; then enable "$2"; fi
    ;;
stop) stop "${2:?stop NAME}" ;;
kill) kill9 "${2:?kill NAME}" ;;
rolling-restart) cmd_rolling_restart ;;
blue-green) cmd_blue_green ;;
haproxy)
    shift
    haproxy_cmd "$*"
    ;;
*)
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
    ;;
esac
