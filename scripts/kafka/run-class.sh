#!/usr/bin/env bash
# Runs one of Apache Kafka's command-line main classes on the cached classpath, like the
# distribution's bin/kafka-run-class.sh. Fetches the jars first if they are not cached yet.
#
# Usage: scripts/kafka/run-class.sh MAIN_CLASS [ARGS...]
#   e.g. scripts/kafka/run-class.sh org.apache.kafka.tools.ConsoleProducer \
#            --bootstrap-server 127.0.0.1:9092 --topic t
#        scripts/kafka/run-class.sh org.apache.kafka.tools.consumer.ConsoleConsumer \
#            --bootstrap-server 127.0.0.1:9092 --topic t --from-beginning --max-messages 1
#
# Environment: KAFKA_TOOL_OPTS (JVM options), PCF_KAFKA_VERSION, PCF_CACHE (see lib.sh).
set -euo pipefail

if (($# < 1)); then
    echo "usage: $0 MAIN_CLASS [ARGS...]" >&2
    exit 2
fi

# shellcheck source=/dev/null # lib.sh beside this file, checked on its own
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

kafka_check_java
kafka_fetch_libs
kafka_tool_java "$@"
