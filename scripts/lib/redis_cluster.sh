# shellcheck shell=bash
# Sourced by scripts/services.sh (which provides log, die, wait_until, ensure_packages and
# TIMEOUT): the redis_cluster service of the fleet (--ha). Six redis-server processes in
# cluster mode on 127.0.0.1:7000-7005, three primaries with a replica each, no persistence,
# a node timeout of 2 s so that a stopped primary's replica takes over within seconds.
# Data and nodes.conf in /var/lib/pcf-services/redis-cluster/<port>, logs in /var/log/redis.

REDIS_CLUSTER_HOST=127.0.0.1
REDIS_CLUSTER_PORTS=(7000 7001 7002 7003 7004 7005)
REDIS_CLUSTER_DIR=/var/lib/pcf-services/redis-cluster
REDIS_CLUSTER_NODE_TIMEOUT=2000

redis_cluster_cli() {
    local port=$1
    shift
    redis-cli -h "$REDIS_CLUSTER_HOST" -p "$port" "$@"
}

redis_cluster_node_ready() { [[ $(redis_cluster_cli "$1" ping 2>/dev/null) == PONG ]]; }

redis_cluster_nodes_ready() {
    local port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        redis_cluster_node_ready "$port" || return 1
    done
}

# The cluster is formed and serves every slot, as every node sees it.
redis_cluster_healthy() {
    local port info
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        info=$(redis_cluster_cli "$port" cluster info 2>/dev/null) || return 1
        [[ $info == *cluster_state:ok* && $info == *cluster_slots_ok:16384* ]] || return 1
        [[ $info == *cluster_known_nodes:6* ]] || return 1
    done
}

# No node knows another: the cluster was never formed (or was reset).
redis_cluster_unformed() {
    local port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        [[ $(redis_cluster_cli "$port" cluster info 2>/dev/null) == *cluster_known_nodes:1[^0-9]* ]] ||
            return 1
    done
}

redis_cluster_start_node() {
    local port=$1 dir="${REDIS_CLUSTER_DIR}/$1"
    install -d -m 0700 "$dir"
    redis-server --port "$port" --bind "$REDIS_CLUSTER_HOST" --daemonize yes \
        --cluster-enabled yes --cluster-config-file "$dir/nodes.conf" \
        --cluster-node-timeout "$REDIS_CLUSTER_NODE_TIMEOUT" \
        --save '' --appendonly no --dir "$dir" \
        --logfile "/var/log/redis/pcf-redis-cluster-${port}.log" \
        --pidfile "$dir/redis-server.pid" ||
        die "could not start redis-server on port ${port}"
}

# Forgets whatever cluster the nodes were in (their data too), so that it is created anew.
redis_cluster_reset() {
    local port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        redis_cluster_cli "$port" flushall >/dev/null 2>&1 || true
        redis_cluster_cli "$port" cluster reset hard >/dev/null 2>&1 ||
            die "could not reset the cluster node on port ${port}"
    done
}

redis_cluster_create() {
    local nodes=() port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do nodes+=("${REDIS_CLUSTER_HOST}:${port}"); done
    log "creating the Redis Cluster on ${nodes[*]}"
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >/dev/null ||
        die "redis-cli --cluster create failed"
}

redis_cluster_up() {
    ensure_packages redis-server
    if redis_cluster_nodes_ready && redis_cluster_healthy; then
        log "redis_cluster already running"
        return 0
    fi
    install -d -m 0755 /var/log/redis
    local port
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        if ! redis_cluster_node_ready "$port"; then
            log "starting redis cluster node on ${REDIS_CLUSTER_HOST}:${port}"
            redis_cluster_start_node "$port"
        fi
    done
    wait_until "redis cluster nodes on ${REDIS_CLUSTER_HOST}:7000-7005" redis_cluster_nodes_ready ||
        die "the redis cluster nodes are not ready; see /var/log/redis/pcf-redis-cluster-*.log"
    # Nodes restarted from their nodes.conf find each other again: give them a moment.
    if redis_cluster_unformed; then
        redis_cluster_create
    elif ! TIMEOUT=10 wait_until "the redis cluster to recover" redis_cluster_healthy; then
        log "the redis cluster is not formed (or is broken); creating it anew"
        redis_cluster_reset
        redis_cluster_create
    fi
    wait_until "redis cluster state ok with every slot covered" redis_cluster_healthy ||
        die "the redis cluster is not healthy; see redis-cli -p 7000 cluster info"
}

redis_cluster_down() {
    local port stopped=0
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        if redis_cluster_node_ready "$port"; then
            redis_cluster_cli "$port" shutdown nosave >/dev/null 2>&1 || true
            stopped=1
        fi
    done
    ((stopped)) || return 0
    log "stopping redis_cluster"
    local deadline=$((SECONDS + TIMEOUT))
    for port in "${REDIS_CLUSTER_PORTS[@]}"; do
        while redis_cluster_node_ready "$port" && ((SECONDS < deadline)); do sleep 0.2; done
    done
}

redis_cluster_status() {
    if command -v redis-cli >/dev/null && redis_cluster_nodes_ready && redis_cluster_healthy; then
        echo "redis_cluster  up    ${REDIS_CLUSTER_HOST}:7000-7005"
    else
        echo "redis_cluster  down  ${REDIS_CLUSTER_HOST}:7000-7005"
        return 1
    fi
}
