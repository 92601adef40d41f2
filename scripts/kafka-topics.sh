#!/usr/bin/env bash
# kafka-topics without a Kafka distribution: runs org.apache.kafka.tools.TopicCommand on the jars
# cached by scripts/services.sh (fetched on first use). Arguments pass through unchanged:
#
#   scripts/kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --create --topic T --partitions 6
#   scripts/kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --list
#   scripts/kafka-topics.sh --bootstrap-server 127.0.0.1:9092 --describe --topic T
set -euo pipefail
exec "$(dirname "${BASH_SOURCE[0]}")/kafka/run-class.sh" org.apache.kafka.tools.TopicCommand "$@"
