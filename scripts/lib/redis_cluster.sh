# shellcheck shell=bash
# Sourced by scripts/services.sh: the redis_cluster service of the fleet (--ha).
redis_cluster_up() { die "redis_cluster is not available yet"; }
redis_cluster_down() { :; }
redis_cluster_status() {
    echo "redis_cluster  down"
    return 1
}
