#!/usr/bin/env bash
# Local development/test services for PCF, all on loopback:
#
#   pg_primary  PostgreSQL 15 primary            127.0.0.1:5432  (cluster "15 main")
#   pg_replica  PostgreSQL 15 streaming replica  127.0.0.1:5433  (cluster "15 replica")
#   redis       Redis, no persistence            127.0.0.1:6379
#   kafka       Apache Kafka, KRaft, one node    127.0.0.1:9092  (controller 127.0.0.1:9093)
#
# With --ha, the fleet's engines as well (scripts/lib/*_ha.sh, scripts/lib/redis_cluster.sh):
#
#   pg_ha          PostgreSQL 15 primary 127.0.0.1:5442, synchronous standby :5443, asynchronous
#                  read replica :5444
#   redis_cluster  Redis Cluster, three primaries and three replicas, 127.0.0.1:7000-7005
#   kafka_ha       Apache Kafka, KRaft, three brokers 127.0.0.1:9192-9194 (controllers
#                  :9195-9197), topics with replication factor 3 and min.insync.replicas=2
#
# Usage: scripts/services.sh up|down|status [--ha | SERVICE]
#
#   With a SERVICE (one of the names above), only that one: `up kafka_ha` brings back a killed
#   Kafka node of the fleet, for example.
#
#   up      installs missing Debian packages, configures and starts every service that is not
#           already running, and waits until each one is ready. Running services are left alone.
#   down    stops every service (replica before primary).
#   status  prints one line per service; exits non-zero if any service is down.
#
# These services are for development and tests only: PostgreSQL trusts every loopback TCP
# connection (so postgres://postgres@127.0.0.1:5432/DB works on both ports), runs with fsync=off,
# Redis has no password and no persistence, and Kafka has no auth. Nothing listens beyond 127.0.0.1.
#
# Plain Debian 12 as root, no systemd, no Docker: clusters are driven with pg_ctlcluster and
# Redis is started daemonized. Kafka has no Debian package: its jars come from Maven Central
# through `mvn` (scripts/kafka/pom.xml) into a cache outside the repository (scripts/kafka/lib.sh),
# and `java` runs the broker's main class in the background; its data (/var/lib/pcf-kafka)
# survives `down`, its logs go to /var/log/pcf-kafka. scripts/kafka-topics.sh and
# scripts/kafka/run-class.sh run Kafka's command-line tools on the same jars.
#
# Each service is a set of functions <name>_up, <name>_down and <name>_status; add a service by
# writing those and listing it in SERVICES below.
#
# Environment: SERVICES_TIMEOUT (seconds to wait for readiness, default 90); for Kafka also
# PCF_KAFKA_VERSION and PCF_CACHE (see scripts/kafka/lib.sh).
set -euo pipefail

SERVICES=(pg_primary pg_replica redis kafka)
# The fleet's engines, started by `up --ha` after the ones above; `down` stops those running.
HA_SERVICES=(pg_ha redis_cluster kafka_ha)

PG_VERSION=15
PG_HOST=127.0.0.1
PG_PRIMARY_CLUSTER=main
PG_PRIMARY_PORT=5432
PG_REPLICA_CLUSTER=replica
PG_REPLICA_PORT=5433
PG_REPLICA_SLOT=pcf_replica
REDIS_HOST=127.0.0.1
REDIS_PORT=6379
KAFKA_HOST=127.0.0.1
KAFKA_PORT=9092
KAFKA_CONTROLLER_PORT=9093
KAFKA_HOME=/var/lib/pcf-kafka     # server.properties, cluster-id, pid file; data/ holds the logs
KAFKA_LOG_DIR=/var/log/pcf-kafka
TIMEOUT="${SERVICES_TIMEOUT:-90}"

export DEBIAN_FRONTEND=noninteractive
export PATH="/usr/lib/postgresql/${PG_VERSION}/bin:${PATH}:/usr/sbin:/sbin"

log() { printf 'services: %s\n' "$*" >&2; }
die() {
    printf 'services: error: %s\n' "$*" >&2
    exit 1
}

# ---------------------------------------------------------------------------------------------
# helpers

# shellcheck source=lib/packages.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/lib/packages.sh"

# wait_until DESCRIPTION COMMAND... : retry COMMAND every 0.5 s until it succeeds or TIMEOUT.
wait_until() {
    local what=$1
    shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for ${what}"
            return 1
        fi
        sleep 0.5
    done
}

as_postgres() { runuser -u postgres -- "$@"; }

# ---------------------------------------------------------------------------------------------
# PostgreSQL (shared by primary and replica)

pg_conf_dir() { echo "/etc/postgresql/${PG_VERSION}/$1"; }
pg_data_dir() { echo "/var/lib/postgresql/${PG_VERSION}/$1"; }

pg_ensure_packages() { ensure_packages "postgresql-${PG_VERSION}" "postgresql-client-${PG_VERSION}"; }

pg_running() { pg_ctlcluster "$PG_VERSION" "$1" status >/dev/null 2>&1; }

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$1"; }

# psql_at PORT SQL : run SQL over loopback TCP as postgres, unaligned tuples only.
psql_at() { psql "postgres://postgres@${PG_HOST}:$1/postgres" -X -v ON_ERROR_STOP=1 -Atqc "$2"; }

# pg_configure CLUSTER : write our settings and loopback trust rules into the cluster's config.
# Prints "changed" when anything was written. Both clusters get identical settings: a hot standby
# refuses to start when max_connections (and friends) are lower than on its primary.
pg_configure() {
    local cluster=$1 dir changed=0
    dir=$(pg_conf_dir "$cluster")
    mkdir -p "$dir/conf.d"
    grep -Eq "^[[:space:]]*include_dir[[:space:]]*=?[[:space:]]*'conf\.d'" "$dir/postgresql.conf" ||
        die "$dir/postgresql.conf does not include conf.d"

    local conf="$dir/conf.d/pcf-services.conf" want
    want=$(
        cat <<'EOF'
# Written by scripts/services.sh (PCF development and tests only). Do not edit by hand.
listen_addresses = '127.0.0.1'
max_connections = 300
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_keep_size = 256MB
max_slot_wal_keep_size = 4GB
hot_standby = on
hot_standby_feedback = on
# Test data only: trade crash safety of the machine for speed (CREATE DATABASE, many commits).
fsync = off
EOF
    )
    if [[ ! -f $conf || $(cat "$conf") != "$want" ]]; then
        printf '%s\n' "$want" >"$conf"
        chown postgres:postgres "$conf"
        changed=1
    fi

    # pg_hba.conf: first match wins, so our trust rules go in a marked block at the very top.
    local hba="$dir/pg_hba.conf" begin='# BEGIN pcf scripts/services.sh' end='# END pcf scripts/services.sh'
    if ! grep -qxF "$begin" "$hba"; then
        local tmp
        tmp=$(mktemp)
        {
            echo "$begin"
            echo "# Development and tests only: trust every loopback TCP connection."
            echo "host    all             all             127.0.0.1/32            trust"
            echo "host    all             all             ::1/128                 trust"
            echo "host    replication     all             127.0.0.1/32            trust"
            echo "host    replication     all             ::1/128                 trust"
            echo "$end"
            cat "$hba"
        } >"$tmp"
        cat "$tmp" >"$hba" # keep owner and mode of the original file
        rm -f "$tmp"
        changed=1
    fi
    ((changed == 1)) && echo changed
    return 0
}

# pg_apply_config CLUSTER PORT : after a config change on a running cluster, reload it, and
# restart it only if a changed setting needs a restart (for example right after the package
# install started it with its defaults).
pg_apply_config() {
    local cluster=$1 port=$2
    log "reloading ${PG_VERSION}/${cluster} configuration"
    pg_ctlcluster "$PG_VERSION" "$cluster" reload
    sleep 1
    local pending
    pending=$(as_postgres psql -X -p "$port" -h /var/run/postgresql -d postgres -Atqc \
        "select count(*) from pg_settings where pending_restart" 2>/dev/null || echo 1)
    if [[ $pending != 0 ]]; then
        log "restarting ${PG_VERSION}/${cluster} for settings that need a restart"
        pg_ctlcluster "$PG_VERSION" "$cluster" restart
    fi
}

pg_prepare_runtime_dirs() {
    install -d -o postgres -g postgres -m 2775 /var/run/postgresql
    install -d -o postgres -g postgres -m 1775 /var/log/postgresql 2>/dev/null || true
}

# pg_start CLUSTER PORT : start the cluster unless it already runs, then wait for readiness.
# pg_try_start CLUSTER PORT : starts CLUSTER unless it runs, and waits for it to answer;
# fails (logged) when it does not start or answer.
pg_try_start() {
    local cluster=$1 port=$2
    if pg_running "$cluster"; then
        log "${PG_VERSION}/${cluster} already running"
    else
        log "starting ${PG_VERSION}/${cluster} on ${PG_HOST}:${port}"
        pg_ctlcluster "$PG_VERSION" "$cluster" start || return 1
    fi
    wait_until "PostgreSQL ${PG_VERSION}/${cluster} on ${PG_HOST}:${port}" pg_ready "$port"
}

# pg_start CLUSTER PORT : pg_try_start, ending the script when it fails.
pg_start() {
    pg_try_start "$1" "$2" ||
        die "PostgreSQL ${PG_VERSION}/$1 did not start or answer; see /var/log/postgresql/postgresql-${PG_VERSION}-$1.log"
}

pg_stop() {
    local cluster=$1
    if [[ -d $(pg_conf_dir "$cluster") ]] && pg_running "$cluster"; then
        log "stopping ${PG_VERSION}/${cluster}"
        pg_ctlcluster "$PG_VERSION" "$cluster" stop -m fast
    fi
}

# ---------------------------------------------------------------------------------------------
# service: pg_primary

pg_primary_up() {
    pg_ensure_packages
    pg_prepare_runtime_dirs
    if [[ ! -d $(pg_conf_dir "$PG_PRIMARY_CLUSTER") ]]; then
        log "creating cluster ${PG_VERSION}/${PG_PRIMARY_CLUSTER} on port ${PG_PRIMARY_PORT}"
        pg_createcluster "$PG_VERSION" "$PG_PRIMARY_CLUSTER" --port "$PG_PRIMARY_PORT" >/dev/null
    fi
    local changed
    changed=$(pg_configure "$PG_PRIMARY_CLUSTER")
    if pg_running "$PG_PRIMARY_CLUSTER" && [[ $changed == changed ]]; then
        pg_apply_config "$PG_PRIMARY_CLUSTER" "$PG_PRIMARY_PORT"
    fi
    pg_start "$PG_PRIMARY_CLUSTER" "$PG_PRIMARY_PORT"
}

pg_primary_down() { pg_stop "$PG_PRIMARY_CLUSTER"; }

pg_primary_status() {
    if pg_ready "$PG_PRIMARY_PORT" 2>/dev/null; then
        echo "pg_primary  up    ${PG_HOST}:${PG_PRIMARY_PORT}"
    else
        echo "pg_primary  down  ${PG_HOST}:${PG_PRIMARY_PORT}"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------
# service: pg_replica (streaming replica of pg_primary, made with pg_basebackup -R)

pg_replica_streaming() {
    [[ $(psql_at "$PG_REPLICA_PORT" "select count(*) from pg_stat_wal_receiver where status = 'streaming'" 2>/dev/null) == 1 ]]
}

# Replace the replica's data directory with a fresh base backup of the primary.
pg_replica_clone() {
    local data
    data=$(pg_data_dir "$PG_REPLICA_CLUSTER")
    pg_stop "$PG_REPLICA_CLUSTER"
    log "cloning ${PG_HOST}:${PG_PRIMARY_PORT} into ${data} (pg_basebackup -R)"
    # A slot keeps the WAL the replica still needs while it is stopped (bounded by
    # max_slot_wal_keep_size); a stale one from an earlier clone is dropped first.
    psql_at "$PG_PRIMARY_PORT" "select pg_drop_replication_slot(slot_name) from pg_replication_slots
                                 where slot_name = '${PG_REPLICA_SLOT}' and not active" >/dev/null
    rm -rf "$data"
    install -d -o postgres -g postgres -m 0700 "$data"
    as_postgres pg_basebackup -h "$PG_HOST" -p "$PG_PRIMARY_PORT" -U postgres -D "$data" \
        -R -X stream -C -S "$PG_REPLICA_SLOT" --checkpoint=fast --no-password ||
        die "pg_basebackup from ${PG_HOST}:${PG_PRIMARY_PORT} failed"
}

pg_replica_up() {
    pg_ensure_packages
    pg_prepare_runtime_dirs
    pg_ready "$PG_PRIMARY_PORT" || die "pg_replica needs pg_primary up on ${PG_HOST}:${PG_PRIMARY_PORT}"

    local data
    data=$(pg_data_dir "$PG_REPLICA_CLUSTER")
    if [[ ! -d $(pg_conf_dir "$PG_REPLICA_CLUSTER") ]]; then
        log "creating cluster ${PG_VERSION}/${PG_REPLICA_CLUSTER} on port ${PG_REPLICA_PORT}"
        pg_createcluster "$PG_VERSION" "$PG_REPLICA_CLUSTER" --port "$PG_REPLICA_PORT" >/dev/null
    fi
    local changed
    changed=$(pg_configure "$PG_REPLICA_CLUSTER")

    if pg_running "$PG_REPLICA_CLUSTER"; then
        [[ $changed == changed ]] && pg_apply_config "$PG_REPLICA_CLUSTER" "$PG_REPLICA_PORT"
        pg_start "$PG_REPLICA_CLUSTER" "$PG_REPLICA_PORT"
        return 0
    fi

    # Not running. A data directory without standby.signal is not a replica (for example the
    # empty cluster pg_createcluster just made): clone it from the primary.
    local cloned=0
    if [[ ! -f $data/standby.signal ]]; then
        pg_replica_clone
        cloned=1
    fi
    pg_start "$PG_REPLICA_CLUSTER" "$PG_REPLICA_PORT"
    if ! wait_until "the replica to stream from the primary" pg_replica_streaming; then
        # The primary may have been recreated, or the WAL the replica needs is gone.
        ((cloned == 0)) || die "replica on ${PG_HOST}:${PG_REPLICA_PORT} does not stream from the primary"
        log "replica does not stream from the primary; cloning it again"
        pg_replica_clone
        pg_start "$PG_REPLICA_CLUSTER" "$PG_REPLICA_PORT"
        wait_until "the replica to stream from the primary" pg_replica_streaming ||
            die "replica on ${PG_HOST}:${PG_REPLICA_PORT} does not stream from the primary"
    fi
}

pg_replica_down() { pg_stop "$PG_REPLICA_CLUSTER"; }

pg_replica_status() {
    if pg_ready "$PG_REPLICA_PORT" 2>/dev/null; then
        local note="(not streaming)"
        pg_replica_streaming && note="(streaming from ${PG_HOST}:${PG_PRIMARY_PORT})"
        echo "pg_replica  up    ${PG_HOST}:${PG_REPLICA_PORT} ${note}"
    else
        echo "pg_replica  down  ${PG_HOST}:${PG_REPLICA_PORT}"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------
# service: redis

redis_ready() { [[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]; }

redis_up() {
    ensure_packages redis-server
    if redis_ready; then
        log "redis already running"
        return 0
    fi
    log "starting redis on ${REDIS_HOST}:${REDIS_PORT}"
    install -d -m 0755 /var/log/redis
    local dir=/var/lib/pcf-services/redis
    install -d -m 0700 "$dir"
    redis-server --port "$REDIS_PORT" --bind "$REDIS_HOST" --daemonize yes \
        --save '' --appendonly no --dir "$dir" \
        --logfile /var/log/redis/pcf-redis-server.log \
        --pidfile "$dir/redis-server.pid" ||
        die "could not start redis-server"
    wait_until "redis on ${REDIS_HOST}:${REDIS_PORT}" redis_ready ||
        die "redis is not ready; see /var/log/redis/pcf-redis-server.log"
}

redis_down() {
    if redis_ready; then
        log "stopping redis"
        redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" shutdown nosave >/dev/null 2>&1 || true
        local deadline=$((SECONDS + TIMEOUT))
        while redis_ready && ((SECONDS < deadline)); do sleep 0.2; done
    fi
}

redis_status() {
    if command -v redis-cli >/dev/null && redis_ready; then
        echo "redis       up    ${REDIS_HOST}:${REDIS_PORT}"
    else
        echo "redis       down  ${REDIS_HOST}:${REDIS_PORT}"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------
# service: kafka (Apache Kafka in KRaft mode, one combined broker + controller)

# shellcheck source=/dev/null # scripts/kafka/lib.sh, checked on its own
source "$(dirname "${BASH_SOURCE[0]}")/kafka/lib.sh"

KAFKA_DATA_DIR="${KAFKA_HOME}/data"
KAFKA_CONF="${KAFKA_HOME}/server.properties"
KAFKA_PID_FILE="${KAFKA_HOME}/kafka.pid"

# kafka_pid : print the pid of our broker (the java process running kafka.Kafka with our
# server.properties); fails when none runs. The pid file is tried first, checked against the
# process's command line so a recycled pid is not mistaken for it; without it (lost, or
# overwritten by a concurrent start that failed) the process table is searched.
kafka_is_broker() {
    [[ $(cat "/proc/$1/comm" 2>/dev/null) == java ]] &&
        tr '\0' ' ' 2>/dev/null <"/proc/$1/cmdline" | grep -qF "kafka.Kafka ${KAFKA_CONF}"
}

kafka_pid() {
    local pid dir
    if [[ -f $KAFKA_PID_FILE ]]; then
        pid=$(<"$KAFKA_PID_FILE")
        if [[ $pid =~ ^[0-9]+$ ]] && kafka_is_broker "$pid"; then
            echo "$pid"
            return 0
        fi
    fi
    for dir in /proc/[0-9]*; do
        pid=${dir#/proc/}
        if kafka_is_broker "$pid"; then
            echo "$pid"
            return 0
        fi
    done
    return 1
}

kafka_port_open() { timeout 2 bash -c ": </dev/tcp/${KAFKA_HOST}/${KAFKA_PORT}" 2>/dev/null; }

# kafka_ready : the broker answers a metadata request (TopicCommand --list), which it does only
# once it has caught up with its KRaft metadata and is really serving.
kafka_ready() {
    kafka_port_open || return 1
    timeout 30 "${KAFKA_SCRIPTS_DIR}/run-class.sh" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "${KAFKA_HOST}:${KAFKA_PORT}" --list >/dev/null 2>&1
}

kafka_configure() {
    install -d -m 0755 "$KAFKA_HOME" "$KAFKA_LOG_DIR"
    install -d -m 0700 "$KAFKA_DATA_DIR"
    local want
    want=$(
        cat <<EOF
# Written by scripts/services.sh (PCF development and tests only). Do not edit by hand.
process.roles=broker,controller
node.id=1
controller.quorum.bootstrap.servers=${KAFKA_HOST}:${KAFKA_CONTROLLER_PORT}
listeners=PLAINTEXT://${KAFKA_HOST}:${KAFKA_PORT},CONTROLLER://${KAFKA_HOST}:${KAFKA_CONTROLLER_PORT}
advertised.listeners=PLAINTEXT://${KAFKA_HOST}:${KAFKA_PORT},CONTROLLER://${KAFKA_HOST}:${KAFKA_CONTROLLER_PORT}
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${KAFKA_DATA_DIR}
# Applications create their topics explicitly; auto-creation stays on as Kafka's default.
auto.create.topics.enable=true
num.partitions=6
default.replication.factor=1
min.insync.replicas=1
offsets.topic.replication.factor=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# The log cleaner (compacting __consumer_offsets) keeps its dedupe buffer on the heap for
# the broker's life: 128 MiB by default, a quarter of the heap below. With it the live set
# sat at the heap occupancy that starts G1's concurrent marking, and the broker marked
# again and again, taking a core in bursts. 16 MiB holds about 600,000 keys per pass.
log.cleaner.dedupe.buffer.size=16777216
EOF
    )
    if [[ ! -f $KAFKA_CONF || $(cat "$KAFKA_CONF") != "$want" ]]; then
        printf '%s\n' "$want" >"$KAFKA_CONF"
        if kafka_pid >/dev/null; then
            log "kafka configuration changed; it applies after scripts/services.sh down && up"
        fi
    fi
}

# kafka_format : format the storage once, as a single-node dynamic KRaft quorum. The cluster id
# is generated once and kept beside the data.
kafka_format() {
    [[ -f $KAFKA_DATA_DIR/meta.properties ]] && return 0
    local id_file="${KAFKA_HOME}/cluster-id" id
    if [[ ! -s $id_file ]]; then
        id=$(kafka_tool_java kafka.tools.StorageTool random-uuid) || die "kafka: could not generate a cluster id"
        echo "$id" >"$id_file"
    fi
    id=$(<"$id_file")
    log "formatting kafka storage ${KAFKA_DATA_DIR} (cluster id ${id})"
    kafka_tool_java kafka.tools.StorageTool format --standalone -t "$id" -c "$KAFKA_CONF" \
        >"${KAFKA_LOG_DIR}/format.log" 2>&1 ||
        die "kafka storage format failed; see ${KAFKA_LOG_DIR}/format.log"
}

kafka_up() {
    if ! command -v java >/dev/null; then ensure_packages openjdk-17-jre-headless; fi
    if ! command -v mvn >/dev/null; then ensure_packages maven; fi
    kafka_check_java || die "kafka needs Java 17 or newer"
    # One `up` at a time sets Kafka up (two test runs may start together); the lock is released
    # when this function returns, and the broker does not inherit it.
    install -d -m 0755 "$KAFKA_HOME"
    local lock_fd
    exec {lock_fd}>"${KAFKA_HOME}/.lock"
    flock -w "$TIMEOUT" "$lock_fd" || die "another scripts/services.sh holds ${KAFKA_HOME}/.lock"
    kafka_fetch_libs || die "could not fetch Apache Kafka ${KAFKA_VERSION}"
    kafka_configure

    if kafka_pid >/dev/null || kafka_port_open; then
        log "kafka already running"
    else
        kafka_format
        log "starting kafka ${KAFKA_VERSION} on ${KAFKA_HOST}:${KAFKA_PORT}"
        rm -f "$KAFKA_PID_FILE"
        local log_size=0
        [[ -f ${KAFKA_LOG_DIR}/server.log ]] && log_size=$(stat -c %s "${KAFKA_LOG_DIR}/server.log")
        # The inner shell writes its own pid and then becomes the JVM (exec), so the pid file
        # names the broker itself; setsid detaches it from this script's session and terminal.
        # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
        setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka "$KAFKA_PID_FILE" \
            java -Xms256m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
            -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
            -Djava.awt.headless=true -Dkafka.logs.dir="$KAFKA_LOG_DIR" \
            -Dlog4j2.configurationFile="${KAFKA_SCRIPTS_DIR}/log4j2.properties" \
            -cp "${KAFKA_LIBS}/*" kafka.Kafka "$KAFKA_CONF" \
            >>"${KAFKA_LOG_DIR}/kafka.out" 2>&1 </dev/null {lock_fd}>&- &
        # Wait for the listener, failing fast if the JVM dies (bad config, port taken, ...).
        local started=$SECONDS
        until kafka_port_open; do
            if ((SECONDS - started >= TIMEOUT)); then
                die "timed out after ${TIMEOUT}s waiting for kafka on ${KAFKA_HOST}:${KAFKA_PORT}; see ${KAFKA_LOG_DIR}/server.log"
            fi
            if ((SECONDS - started >= 2)) && ! kafka_pid >/dev/null; then
                # This start's errors only: server.log keeps earlier runs' lines.
                tail -c "+$((log_size + 1))" "${KAFKA_LOG_DIR}/server.log" 2>/dev/null |
                    grep -E '^\[.*\] (ERROR|FATAL)' | tail -n 5 >&2 || true
                tail -n 5 "${KAFKA_LOG_DIR}/kafka.out" >&2 2>/dev/null || true
                die "kafka exited during start; see ${KAFKA_LOG_DIR}/server.log and kafka.out"
            fi
            sleep 0.5
        done
    fi
    wait_until "kafka on ${KAFKA_HOST}:${KAFKA_PORT} to answer metadata requests" kafka_ready ||
        die "kafka is not ready; see ${KAFKA_LOG_DIR}/server.log"
    exec {lock_fd}>&-
}

kafka_down() {
    local pid
    pid=$(kafka_pid) || return 0
    log "stopping kafka (pid ${pid})"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$pid" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            log "kafka did not stop within ${TIMEOUT}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$KAFKA_PID_FILE"
}

kafka_status() {
    if kafka_port_open; then
        local pid note="(Kafka ${KAFKA_VERSION}, KRaft)"
        pid=$(kafka_pid) && note="(Kafka ${KAFKA_VERSION}, KRaft, pid ${pid})"
        echo "kafka       up    ${KAFKA_HOST}:${KAFKA_PORT} ${note}"
    else
        echo "kafka       down  ${KAFKA_HOST}:${KAFKA_PORT}"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------------

# shellcheck source=lib/pg_ha.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/pg_ha.sh"
# shellcheck source=lib/redis_cluster.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/redis_cluster.sh"
# shellcheck source=lib/kafka_ha.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/kafka_ha.sh"

# The services `up` and `status` act on: the single-node ones, and with --ha the fleet's too;
# or the one named.
selected() {
    if [[ -n ${ONLY:-} ]]; then
        echo "$ONLY"
        return 0
    fi
    echo "${SERVICES[@]}"
    [[ ${HA:-0} == 1 ]] && echo "${HA_SERVICES[@]}"
    return 0
}

cmd_up() {
    local s
    for s in $(selected); do "${s}_up"; done
    cmd_status
}

# Stops everything, the fleet's engines included (each stop does nothing when it is not running),
# and first the fleet of scripts/fleet.sh in its default directory, if one runs there.
cmd_down() {
    local all=("${SERVICES[@]}" "${HA_SERVICES[@]}") i fleet_dir
    [[ -n $ONLY ]] && all=("$ONLY")
    fleet_dir="$(dirname "${BASH_SOURCE[0]}")/../target/fleet"
    if [[ -z $ONLY ]] && compgen -G "${fleet_dir}/*.pid" >/dev/null; then
        "$(dirname "${BASH_SOURCE[0]}")/fleet.sh" down || log "scripts/fleet.sh down failed"
    fi
    for ((i = ${#all[@]} - 1; i >= 0; i--)); do "${all[i]}_down"; done
}

cmd_status() {
    local s rc=0
    for s in $(selected); do "${s}_status" || rc=1; done
    return "$rc"
}

# Sourced (scripts/pg-ha.sh): the functions only.
[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

command=${1:-}
HA=0
ONLY=
if [[ ${2:-} == --ha ]]; then
    HA=1
elif [[ -n ${2:-} ]]; then
    command=usage
    for s in "${SERVICES[@]}" "${HA_SERVICES[@]}"; do
        [[ $2 == "$s" ]] && command=$1 && ONLY=$2
    done
fi
case "$command" in
up) cmd_up ;;
down) cmd_down ;;
status) cmd_status ;;
*)
    echo "usage: $0 up|down|status [--ha | SERVICE]" >&2
    exit 2
    ;;
esac
