#!/usr/bin/env bash
# Drives the pg_ha topology of scripts/services.sh --ha (scripts/lib/pg_ha.sh) for failover
# tests: PostgreSQL 15 clusters ha1 (127.0.0.1:5442), ha2 (:5443) and ha3 (:5444).
#
# Usage: scripts/pg-ha.sh COMMAND
#
#   primary       prints the port of the current primary (fails when there is none)
#   kill-primary  kill -9 the current primary's postmaster and its processes
#   promote       promotes the standby of ha1/ha2 (synchronous replication off until repair,
#                 as it has no standby) and points ha3 at it
#   kill PORT     kill -9 the node on PORT
#   start PORT    starts the node on PORT as it is (an old primary starts as a primary)
#   repair        the topology back to a primary, a synchronous standby and ha3 (= services.sh
#                 up's pg_ha), cloning a node again when it cannot follow
#   status        one line per node; fails when one is down or does not stream
set -euo pipefail

# shellcheck source=services.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/services.sh"

usage() {
    echo "usage: $0 primary|kill-primary|promote|kill PORT|start PORT|repair|status" >&2
    exit 2
}

cmd_promote() {
    local n standby=''
    for n in "${PG_HA_SYNC_NODES[@]}"; do
        if pg_running "$n" && pg_ha_is_standby "$n"; then standby=$n; fi
    done
    [[ -n $standby ]] || die "neither ha1 nor ha2 is a running standby"
    log "promoting ${standby}"
    pg_ctlcluster "$PG_VERSION" "$standby" promote || die "could not promote ${standby}"
    wait_until "${standby} to accept writes" pg_ha_is_primary "$standby" ||
        die "${standby} did not leave recovery"
    # Its standby is gone: commits would wait for one forever.
    pg_ha_async "$standby" on
    # ha3 follows the new timeline (recovery_target_timeline = latest) when it can; repair
    # clones it otherwise.
    if pg_running ha3; then
        pg_ha_standby_conf ha3 "$(pg_ha_port "$standby")"
        pg_ctlcluster "$PG_VERSION" ha3 reload
    fi
    pg_ha_port "$standby"
}

case "${1:-}" in
primary)
    primary=$(pg_ha_primary) || die "no primary among ha1 and ha2"
    pg_ha_port "$primary"
    ;;
kill-primary)
    primary=$(pg_ha_primary) || die "no primary among ha1 and ha2"
    pg_ha_kill "$primary"
    pg_ha_port "$primary"
    ;;
promote) cmd_promote ;;
kill)
    [[ -n ${2:-} ]] || usage
    pg_ha_kill "$(pg_ha_node "$2")"
    ;;
start)
    [[ -n ${2:-} ]] || usage
    pg_start "$(pg_ha_node "$2")" "$2"
    ;;
repair)
    pg_ha_up
    pg_ha_status
    ;;
status) pg_ha_status ;;
*) usage ;;
esac
