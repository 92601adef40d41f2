# shellcheck shell=bash
# Sourced by scripts/services.sh: the kafka_ha service of the fleet (--ha).
kafka_ha_up() { die "kafka_ha is not available yet"; }
kafka_ha_down() { :; }
kafka_ha_status() {
    echo "kafka_ha  down"
    return 1
}
