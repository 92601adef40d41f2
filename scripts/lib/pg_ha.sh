# shellcheck shell=bash
# Sourced by scripts/services.sh: the pg_ha service of the fleet (--ha).
pg_ha_up() { die "pg_ha is not available yet"; }
pg_ha_down() { :; }
pg_ha_status() {
    echo "pg_ha  down"
    return 1
}
