# shellcheck shell=bash
# Sourced by scripts/services.sh (and scripts/pg-ha.sh): the pg_ha service of the fleet (--ha).
#
# Three PostgreSQL 15 clusters on loopback, independent of pg_primary/pg_replica:
#
#   ha1  127.0.0.1:5442  the primary at first
#   ha2  127.0.0.1:5443  its SYNCHRONOUS standby at first
#   ha3  127.0.0.1:5444  an ASYNCHRONOUS read replica of whichever of ha1/ha2 is the primary
#
# Every node has synchronous_standby_names = 'ANY 1 (ha1, ha2)' and each standby's
# primary_conninfo carries its cluster name as application_name, so whichever of ha1/ha2 is the
# standby is the synchronous one (before and after a failover) and ha3 never is. A commit is
# acknowledged once the synchronous standby has flushed its WAL (synchronous_commit = on).
#
# fsync = off, as on the other test clusters: "flushed" then means written to the operating
# system, not to the disk. That still survives what the tests do (kill -9 of PostgreSQL
# processes: the kernel keeps the page cache), but not a crash of the machine, where an
# acknowledged commit could be lost on both nodes. Never run a real deployment like that.
#
# Failover is manual (scripts/pg-ha.sh promote). The promoted standby has no synchronous
# standby until the old primary rejoins, and with synchronous_standby_names kept, every commit
# would wait for one forever: promotion therefore turns synchronous replication off on the new
# primary (conf.d/zz-pcf-ha-async.conf, a degraded mode that acknowledges commits held by one
# node only), and `pg_ha_up` (scripts/pg-ha.sh repair) turns it back on once the other node
# streams again.
#
# The standby settings (primary_conninfo) live in the cluster's configuration directory
# (/etc/postgresql/15/haN/conf.d/pcf-ha-standby.conf), not in the data directory, so a base
# backup of one node never carries another node's settings; standby.signal marks a standby.
# No replication slots: wal_keep_size (256MB) keeps the WAL a briefly stopped standby needs, and
# one that fell further behind is cloned again.

PG_HA_NODES=(ha1 ha2 ha3)
PG_HA_SYNC_NODES=(ha1 ha2)
PG_HA_LOCK=/var/lib/postgresql/.pcf-pg-ha.lock
PG_HA_LOCK_FD=''

# pg_ha_port NODE : the node's port.
pg_ha_port() {
    case $1 in
    ha1) echo 5442 ;;
    ha2) echo 5443 ;;
    ha3) echo 5444 ;;
    *) die "unknown pg_ha node: $1" ;;
    esac
}

# pg_ha_node PORT : the node listening on PORT.
pg_ha_node() {
    local n
    for n in "${PG_HA_NODES[@]}"; do
        if [[ $(pg_ha_port "$n") == "$1" ]]; then
            echo "$n"
            return 0
        fi
    done
    die "no pg_ha node listens on port $1"
}

# pg_ha_start NODE : starts NODE unless it runs; the server does not inherit pg_ha_up's lock.
pg_ha_start() { pg_ha_starting pg_start "$1"; }

# pg_ha_try_start NODE : pg_ha_start, failing instead of ending the script when NODE does not
# start or answer within 30 s (a standby that cannot follow the new timeline stops at once).
pg_ha_try_start() { TIMEOUT=30 pg_ha_starting pg_try_start "$1"; }

# pg_ha_starting START NODE : START (pg_start or pg_try_start) for NODE and its port.
pg_ha_starting() {
    local start=$1 node=$2
    if [[ -n $PG_HA_LOCK_FD ]]; then
        "$start" "$node" "$(pg_ha_port "$node")" {PG_HA_LOCK_FD}>&-
    else
        "$start" "$node" "$(pg_ha_port "$node")"
    fi
}

pg_ha_answers() { pg_ready "$(pg_ha_port "$1")" 2>/dev/null; }

# pg_ha_in_recovery NODE : prints t (standby) or f (primary); fails when the node does not answer.
pg_ha_in_recovery() { psql_at "$(pg_ha_port "$1")" "select pg_is_in_recovery()" 2>/dev/null; }

pg_ha_is_primary() { [[ $(pg_ha_in_recovery "$1") == f ]]; }
pg_ha_is_standby() { [[ $(pg_ha_in_recovery "$1") == t ]]; }

# pg_ha_timeline NODE : the timeline a primary writes on.
pg_ha_timeline() {
    psql_at "$(pg_ha_port "$1")" \
        "select ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
}

# pg_ha_streams_from NODE PORT : NODE's WAL receiver streams from the server on PORT.
pg_ha_streams_from() {
    [[ $(psql_at "$(pg_ha_port "$1")" "select count(*) from pg_stat_wal_receiver
          where status = 'streaming' and sender_port = $2" 2>/dev/null) == 1 ]]
}

# pg_ha_sync_state PRIMARY NODE : NODE's sync_state as the primary sees it (empty if not connected).
pg_ha_sync_state() {
    psql_at "$(pg_ha_port "$1")" "select sync_state from pg_stat_replication
          where application_name = '$2' and state = 'streaming'" 2>/dev/null
}

pg_ha_is_sync() { [[ $(pg_ha_sync_state "$1" "$2") =~ ^(sync|quorum)$ ]]; }

# pg_ha_primary : prints the node that is the primary: of ha1/ha2, the one answering and not in
# recovery; when both are (the old primary restarted after the other was promoted), the one on
# the newer timeline. Fails when neither is.
pg_ha_primary() {
    local n best='' best_tl=-1 tl
    for n in "${PG_HA_SYNC_NODES[@]}"; do
        pg_ha_is_primary "$n" || continue
        tl=$(pg_ha_timeline "$n") || continue
        if ((tl > best_tl)); then
            best=$n
            best_tl=$tl
        fi
    done
    [[ -n $best ]] || return 1
    echo "$best"
}

# pg_ha_create NODE : creates the cluster if needed and writes its settings. Prints "changed"
# when a setting changed.
pg_ha_create() {
    local node=$1 port dir changed
    port=$(pg_ha_port "$node")
    if [[ ! -d $(pg_conf_dir "$node") ]]; then
        log "creating cluster ${PG_VERSION}/${node} on port ${port}"
        pg_createcluster "$PG_VERSION" "$node" --port "$port" >/dev/null
    fi
    changed=$(pg_configure "$node")
    dir=$(pg_conf_dir "$node")
    local conf="$dir/conf.d/pcf-ha.conf" want
    want=$(
        cat <<'EOF'
# Written by scripts/lib/pg_ha.sh (PCF development and tests only). Do not edit by hand.
# Whichever of ha1/ha2 is the standby acknowledges commits; ha3 never does.
synchronous_standby_names = 'ANY 1 (ha1, ha2)'
synchronous_commit = on
# A promoted standby follows the newest timeline; a standby reconnects quickly.
recovery_target_timeline = 'latest'
wal_retrieve_retry_interval = 1s
EOF
    )
    if [[ ! -f $conf || $(cat "$conf") != "$want" ]]; then
        printf '%s\n' "$want" >"$conf"
        chown postgres:postgres "$conf"
        changed=changed
    fi
    [[ $changed == changed ]] && echo changed
    return 0
}

# pg_ha_standby_conf NODE PRIMARY_PORT : makes NODE a standby of the server on PRIMARY_PORT
# when it next starts (or reloads: primary_conninfo is reloadable).
pg_ha_standby_conf() {
    local node=$1 port=$2 conf
    conf="$(pg_conf_dir "$node")/conf.d/pcf-ha-standby.conf"
    printf '%s\n' "# Written by scripts/lib/pg_ha.sh. Do not edit by hand." \
        "primary_conninfo = 'host=${PG_HOST} port=${port} user=postgres application_name=${node}'" >"$conf"
    chown postgres:postgres "$conf"
    as_postgres touch "$(pg_data_dir "$node")/standby.signal"
}

# pg_ha_async NODE on|off : the degraded mode of a primary without its synchronous standby.
pg_ha_async() {
    local conf
    conf="$(pg_conf_dir "$1")/conf.d/zz-pcf-ha-async.conf"
    if [[ $2 == on ]]; then
        printf '%s\n' "# Written by scripts/pg-ha.sh promote; removed by repair." \
            "synchronous_standby_names = ''" >"$conf"
        chown postgres:postgres "$conf"
    else
        rm -f "$conf"
    fi
    if pg_running "$1"; then pg_ctlcluster "$PG_VERSION" "$1" reload; fi
}

# pg_ha_kill NODE : kill -9 the postmaster and every process it started, as if its machine
# had gone (a postmaster's orphaned backends could otherwise serve a while longer).
pg_ha_kill() {
    local node=$1 pid_file pid child
    pid_file="$(pg_data_dir "$node")/postmaster.pid"
    [[ -f $pid_file ]] || return 0
    pid=$(head -n 1 "$pid_file")
    [[ $pid =~ ^[0-9]+$ ]] || return 0
    [[ $(cat "/proc/${pid}/comm" 2>/dev/null) == postgres ]] || return 0
    log "killing ${PG_VERSION}/${node} (postmaster ${pid}) with SIGKILL"
    local children
    children=$(ps -o pid= --ppid "$pid" || true)
    kill -KILL "$pid" 2>/dev/null || true
    for child in $children; do kill -KILL "$child" 2>/dev/null || true; done
    local deadline=$((SECONDS + 10))
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.1; done
}

# pg_ha_stop NODE : a fast shutdown, and an immediate one if that does not finish.
pg_ha_stop() {
    local node=$1
    pg_running "$node" || return 0
    log "stopping ${PG_VERSION}/${node}"
    pg_ctlcluster "$PG_VERSION" "$node" stop -m fast ||
        pg_ctlcluster "$PG_VERSION" "$node" stop -m immediate || true
}

# pg_ha_clone NODE PRIMARY : replaces NODE's data with a base backup of PRIMARY and starts it
# as PRIMARY's standby.
pg_ha_clone() {
    local node=$1 primary=$2 data pport
    data=$(pg_data_dir "$node")
    pport=$(pg_ha_port "$primary")
    pg_ha_stop "$node"
    log "cloning ${primary} (${PG_HOST}:${pport}) into ${data} (pg_basebackup)"
    rm -rf "$data"
    install -d -o postgres -g postgres -m 0700 "$data"
    as_postgres pg_basebackup -h "$PG_HOST" -p "$pport" -U postgres -D "$data" \
        -X stream --checkpoint=fast --no-password ||
        die "pg_basebackup of ${primary} into ${node} failed"
    pg_ha_standby_conf "$node" "$pport"
    pg_ha_start "$node"
}

# pg_ha_follow NODE PRIMARY : makes NODE a streaming standby of PRIMARY: left alone when it
# already is; restarted with primary_conninfo pointing at PRIMARY when it was a standby; cloned
# again when it was a primary (it may hold WAL the new primary never had) or cannot follow.
pg_ha_follow() {
    local node=$1 primary=$2 port pport data
    port=$(pg_ha_port "$node")
    pport=$(pg_ha_port "$primary")
    data=$(pg_data_dir "$node")
    if pg_running "$node" && pg_ha_is_standby "$node" && pg_ha_streams_from "$node" "$pport"; then
        log "${node} already streams from ${primary}"
        return 0
    fi
    local was_standby=0
    if pg_running "$node" && pg_ha_answers "$node"; then
        pg_ha_is_standby "$node" && was_standby=1
    elif [[ -f $data/standby.signal ]]; then
        was_standby=1
    fi
    if ((was_standby == 1)); then
        log "pointing ${node} at ${primary} (${PG_HOST}:${pport})"
        pg_ha_stop "$node"
        pg_ha_standby_conf "$node" "$pport"
        # An asynchronous replica may have replayed WAL the promoted standby never had: it
        # then refuses the new timeline (and stops), and is cloned again.
        if pg_ha_try_start "$node" &&
            TIMEOUT=20 wait_until "${node} to stream from ${primary}" pg_ha_streams_from "$node" "$pport"; then
            return 0
        fi
        log "${node} cannot follow ${primary} (diverged or too far behind); cloning it again"
    fi
    pg_ha_clone "$node" "$primary"
    wait_until "${node} to stream from ${primary}" pg_ha_streams_from "$node" "$pport" ||
        die "${node} does not stream from ${primary}; see /var/log/postgresql/postgresql-${PG_VERSION}-${node}.log"
}

# pg_ha_up : creates, starts or repairs the topology: finds the primary among ha1/ha2 (starting
# them when neither answers), makes the other its synchronous standby and ha3 its asynchronous
# replica, and waits until both stream and the standby counts for synchronous commits.
pg_ha_up() {
    pg_ensure_packages
    pg_prepare_runtime_dirs
    exec {PG_HA_LOCK_FD}>"$PG_HA_LOCK"
    flock -w "$TIMEOUT" "$PG_HA_LOCK_FD" || die "another scripts/services.sh or pg-ha.sh holds ${PG_HA_LOCK}"

    local n changed
    for n in "${PG_HA_NODES[@]}"; do
        changed=$(pg_ha_create "$n")
        if [[ $changed == changed ]] && pg_running "$n"; then
            pg_apply_config "$n" "$(pg_ha_port "$n")" {PG_HA_LOCK_FD}>&-
        fi
    done

    local primary
    if ! primary=$(pg_ha_primary); then
        # Neither answers as a primary: start those that are stopped, as they are.
        for n in "${PG_HA_SYNC_NODES[@]}"; do
            pg_running "$n" || pg_ha_start "$n"
        done
        if ! primary=$(pg_ha_primary); then
            # Both are standbys (their primary is gone): promote ha1.
            log "neither ha1 nor ha2 is a primary; promoting ha1"
            pg_ctlcluster "$PG_VERSION" ha1 promote || die "could not promote ha1"
            primary=$(pg_ha_primary) || die "no primary among ha1 and ha2"
        fi
    fi
    log "the primary is ${primary} (${PG_HOST}:$(pg_ha_port "$primary"))"

    local standby
    for n in "${PG_HA_SYNC_NODES[@]}"; do [[ $n == "$primary" ]] || standby=$n; done
    pg_ha_follow "$standby" "$primary"
    pg_ha_follow ha3 "$primary"

    # Synchronous again (promotion may have turned it off), on every node.
    for n in "${PG_HA_NODES[@]}"; do
        [[ -f "$(pg_conf_dir "$n")/conf.d/zz-pcf-ha-async.conf" ]] && pg_ha_async "$n" off
    done
    wait_until "${standby} to be ${primary}'s synchronous standby" pg_ha_is_sync "$primary" "$standby" ||
        die "${standby} is not a synchronous standby of ${primary}"
    exec {PG_HA_LOCK_FD}>&-
    PG_HA_LOCK_FD=''
}

pg_ha_down() {
    local n
    for n in ha3 ha2 ha1; do
        [[ -d $(pg_conf_dir "$n") ]] && pg_ha_stop "$n"
    done
    return 0
}

# pg_ha_status : one line per node; fails when any is down or does not stream.
pg_ha_status() {
    local n port rc=0 primary='' pport=''
    primary=$(pg_ha_primary 2>/dev/null) && pport=$(pg_ha_port "$primary")
    for n in "${PG_HA_NODES[@]}"; do
        port=$(pg_ha_port "$n")
        if ! pg_ha_answers "$n"; then
            echo "pg_ha ${n}  down     ${PG_HOST}:${port}"
            rc=1
        elif pg_ha_is_primary "$n"; then
            local note=''
            [[ $n != "$primary" ]] && note=' (stale: an older timeline)' && rc=1
            echo "pg_ha ${n}  primary  ${PG_HOST}:${port}${note}"
        elif [[ -n $pport ]] && pg_ha_streams_from "$n" "$pport"; then
            local state
            state=$(pg_ha_sync_state "$primary" "$n")
            echo "pg_ha ${n}  standby  ${PG_HOST}:${port} (streaming from ${primary}, ${state:-unknown})"
        else
            echo "pg_ha ${n}  standby  ${PG_HOST}:${port} (not streaming)"
            rc=1
        fi
    done
    [[ -n $primary ]] || rc=1
    return "$rc"
}
