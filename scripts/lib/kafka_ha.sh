# shellcheck shell=bash
# Sourced by scripts/services.sh (needs its log, die, wait_until, ensure_packages and TIMEOUT, and
# scripts/kafka/lib.sh): the fleet's Apache Kafka, three nodes in KRaft mode, each a broker and a
# controller of one static quorum, on the same jars as the single-node broker.
#
#   node 1  broker 127.0.0.1:9192  controller 127.0.0.1:9195
#   node 2  broker 127.0.0.1:9193  controller 127.0.0.1:9196
#   node 3  broker 127.0.0.1:9194  controller 127.0.0.1:9197
#
# Topics get replication factor 3 and min.insync.replicas=2 by default (PCF creates its topics
# with the broker's defaults), so with acks=all a write survives the loss of any one node and is
# refused, not lost, while two are down. Node N keeps its configuration, pid file and data in
# /var/lib/pcf-kafka-ha/nN (data survives `down`), its logs in /var/log/pcf-kafka-ha/nN. Each
# JVM has a 384 MiB heap: the three take about 1.5 GiB of memory together.
#
# `kafka_ha_up` starts every node that is not running (so it also brings back a killed one) and
# waits until each answers metadata requests and every partition has its three replicas in sync.

KAFKA_HA_HOME=/var/lib/pcf-kafka-ha
KAFKA_HA_LOG_DIR=/var/log/pcf-kafka-ha
KAFKA_HA_NODES=(1 2 3)

kafka_ha_port() { echo $((9191 + $1)); }
kafka_ha_controller_port() { echo $((9194 + $1)); }
kafka_ha_bootstrap() { echo "${KAFKA_HOST}:9192,${KAFKA_HOST}:9193,${KAFKA_HOST}:9194"; }

kafka_ha_conf() { echo "${KAFKA_HA_HOME}/n$1/server.properties"; }

# kafka_ha_pid N : the pid of node N's JVM (checked against its command line); fails if none runs.
kafka_ha_pid() {
    local file="${KAFKA_HA_HOME}/n$1/kafka.pid" pid conf
    conf=$(kafka_ha_conf "$1")
    [[ -f $file ]] || return 1
    pid=$(<"$file")
    [[ $pid =~ ^[0-9]+$ && $(cat "/proc/$pid/comm" 2>/dev/null) == java ]] || return 1
    tr '\0' ' ' 2>/dev/null <"/proc/$pid/cmdline" | grep -qF "kafka.Kafka ${conf}" || return 1
    echo "$pid"
}

kafka_ha_port_open() { timeout 2 bash -c ": </dev/tcp/${KAFKA_HOST}/$(kafka_ha_port "$1")" 2>/dev/null; }

kafka_ha_node_ready() {
    kafka_ha_port_open "$1" || return 1
    timeout 30 "${KAFKA_SCRIPTS_DIR}/run-class.sh" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "${KAFKA_HOST}:$(kafka_ha_port "$1")" --list >/dev/null 2>&1
}

# kafka_ha_in_sync : no partition of any topic lacks a replica in its in-sync set.
kafka_ha_in_sync() {
    local out
    out=$(timeout 30 "${KAFKA_SCRIPTS_DIR}/run-class.sh" org.apache.kafka.tools.TopicCommand \
        --bootstrap-server "$(kafka_ha_bootstrap)" --describe --under-replicated-partitions 2>/dev/null) || return 1
    [[ -z $out ]]
}

kafka_ha_configure() {
    local n=$1 dir="${KAFKA_HA_HOME}/n$1" want voters
    install -d -m 0755 "$dir" "${KAFKA_HA_LOG_DIR}/n${n}"
    install -d -m 0700 "$dir/data"
    voters="1@${KAFKA_HOST}:9195,2@${KAFKA_HOST}:9196,3@${KAFKA_HOST}:9197"
    want=$(
        cat <<EOF
# Written by scripts/services.sh --ha (PCF development and tests only). Do not edit by hand.
process.roles=broker,controller
node.id=${n}
controller.quorum.voters=${voters}
listeners=PLAINTEXT://${KAFKA_HOST}:$(kafka_ha_port "$n"),CONTROLLER://${KAFKA_HOST}:$(kafka_ha_controller_port "$n")
advertised.listeners=PLAINTEXT://${KAFKA_HOST}:$(kafka_ha_port "$n")
inter.broker.listener.name=PLAINTEXT
controller.listener.names=CONTROLLER
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=${dir}/data
auto.create.topics.enable=true
num.partitions=6
default.replication.factor=3
min.insync.replicas=2
offsets.topic.replication.factor=3
transaction.state.log.replication.factor=3
transaction.state.log.min.isr=2
share.coordinator.state.topic.replication.factor=3
share.coordinator.state.topic.min.isr=2
group.initial.rebalance.delay.ms=0
# A lost node leaves the in-sync set after 10 s (the default 30 s) and a returning one catches up.
replica.lag.time.max.ms=10000
unclean.leader.election.enable=false
log.cleaner.dedupe.buffer.size=16777216
EOF
    )
    local conf
    conf=$(kafka_ha_conf "$n")
    if [[ ! -f $conf || $(cat "$conf") != "$want" ]]; then
        printf '%s\n' "$want" >"$conf"
        kafka_ha_pid "$n" >/dev/null &&
            log "kafka_ha node ${n} configuration changed; it applies after scripts/services.sh down && up --ha"
    fi
    return 0
}

# Formats a node's storage once, with the cluster id all three share.
kafka_ha_format() {
    local n=$1 dir="${KAFKA_HA_HOME}/n$1" id_file="${KAFKA_HA_HOME}/cluster-id" id
    [[ -f $dir/data/meta.properties ]] && return 0
    if [[ ! -s $id_file ]]; then
        id=$(kafka_tool_java kafka.tools.StorageTool random-uuid) || die "kafka_ha: could not generate a cluster id"
        echo "$id" >"$id_file"
    fi
    id=$(<"$id_file")
    log "formatting kafka_ha node ${n} storage (cluster id ${id})"
    kafka_tool_java kafka.tools.StorageTool format -t "$id" -c "$(kafka_ha_conf "$n")" \
        >"${KAFKA_HA_LOG_DIR}/n${n}/format.log" 2>&1 ||
        die "kafka_ha node ${n} storage format failed; see ${KAFKA_HA_LOG_DIR}/n${n}/format.log"
}

kafka_ha_start_node() {
    local n=$1 dir="${KAFKA_HA_HOME}/n$1"
    if kafka_ha_pid "$n" >/dev/null; then
        return 0
    fi
    kafka_ha_format "$n"
    log "starting kafka_ha node ${n} on ${KAFKA_HOST}:$(kafka_ha_port "$n")"
    rm -f "$dir/kafka.pid"
    # shellcheck disable=SC2016 # $$ and $1 belong to the inner shell
    setsid nohup bash -c 'echo $$ >"$1"; shift; exec "$@"' kafka "$dir/kafka.pid" \
        java -Xms256m -Xmx384m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
        -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent \
        -Djava.awt.headless=true -Dkafka.logs.dir="${KAFKA_HA_LOG_DIR}/n${n}" \
        -Dlog4j2.configurationFile="${KAFKA_SCRIPTS_DIR}/log4j2.properties" \
        -cp "${KAFKA_LIBS}/*" kafka.Kafka "$(kafka_ha_conf "$n")" \
        >>"${KAFKA_HA_LOG_DIR}/n${n}/kafka.out" 2>&1 </dev/null &
}

kafka_ha_up() {
    if ! command -v java >/dev/null; then ensure_packages openjdk-17-jre-headless; fi
    if ! command -v mvn >/dev/null; then ensure_packages maven; fi
    kafka_check_java || die "kafka needs Java 17 or newer"
    install -d -m 0755 "$KAFKA_HA_HOME" "$KAFKA_HA_LOG_DIR"
    local lock_fd n
    exec {lock_fd}>"${KAFKA_HA_HOME}/.lock"
    flock -w "$TIMEOUT" "$lock_fd" || die "another scripts/services.sh holds ${KAFKA_HA_HOME}/.lock"
    kafka_fetch_libs || die "could not fetch Apache Kafka ${KAFKA_VERSION}"
    for n in "${KAFKA_HA_NODES[@]}"; do kafka_ha_configure "$n"; done
    # All three start before any is waited on: a controller quorum needs two voters to elect.
    for n in "${KAFKA_HA_NODES[@]}"; do kafka_ha_start_node "$n" {lock_fd}>&-; done
    for n in "${KAFKA_HA_NODES[@]}"; do
        wait_until "kafka_ha node ${n} to answer metadata requests" kafka_ha_node_ready "$n" ||
            die "kafka_ha node ${n} is not ready; see ${KAFKA_HA_LOG_DIR}/n${n}/server.log"
    done
    wait_until "every kafka_ha partition to have its three replicas in sync" kafka_ha_in_sync ||
        die "kafka_ha partitions stay under-replicated; see ${KAFKA_HA_LOG_DIR}/n*/server.log"
    exec {lock_fd}>&-
}

kafka_ha_down() {
    local n pid deadline
    for n in "${KAFKA_HA_NODES[@]}"; do
        pid=$(kafka_ha_pid "$n") || continue
        log "stopping kafka_ha node ${n} (pid ${pid})"
        kill -TERM "$pid" 2>/dev/null || true
    done
    for n in "${KAFKA_HA_NODES[@]}"; do
        pid=$(kafka_ha_pid "$n") || continue
        deadline=$((SECONDS + TIMEOUT))
        while kill -0 "$pid" 2>/dev/null; do
            if ((SECONDS >= deadline)); then
                log "kafka_ha node ${n} did not stop within ${TIMEOUT}s; killing it"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.2
        done
        rm -f "${KAFKA_HA_HOME}/n${n}/kafka.pid"
    done
}

kafka_ha_status() {
    local n rc=0 pid
    for n in "${KAFKA_HA_NODES[@]}"; do
        if pid=$(kafka_ha_pid "$n") && kafka_ha_port_open "$n"; then
            echo "kafka_ha    up    ${KAFKA_HOST}:$(kafka_ha_port "$n") (node ${n}, pid ${pid})"
        else
            echo "kafka_ha    down  ${KAFKA_HOST}:$(kafka_ha_port "$n") (node ${n})"
            rc=1
        fi
    done
    return "$rc"
}
