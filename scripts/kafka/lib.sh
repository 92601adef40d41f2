# shellcheck shell=bash
# Apache Kafka without a distribution: the broker's and the tools' jars come from Maven Central
# (through `mvn`, see pom.xml beside this file) into a cache outside the repository, and `java`
# runs Kafka's main classes (kafka.Kafka, kafka.tools.StorageTool, org.apache.kafka.tools.*) on
# that classpath. Sourced by scripts/services.sh and scripts/kafka/run-class.sh.
#
# Environment: PCF_KAFKA_VERSION (default below), PCF_CACHE (default ~/.cache/pcf).

KAFKA_VERSION="${PCF_KAFKA_VERSION:-4.1.1}"
KAFKA_SCRIPTS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
KAFKA_CACHE="${PCF_CACHE:-${HOME:-/root}/.cache/pcf}/kafka-${KAFKA_VERSION}"
KAFKA_LIBS="${KAFKA_CACHE}/libs"

kafka_log() { printf 'kafka: %s\n' "$*" >&2; }

# kafka_check_java : Kafka 4 needs Java 17 or newer.
kafka_check_java() {
    local v
    command -v java >/dev/null || {
        kafka_log "java not found on PATH (apt-get install openjdk-17-jre-headless)"
        return 1
    }
    v=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n1)
    if [[ -z $v || $v -lt 17 ]]; then
        kafka_log "Kafka ${KAFKA_VERSION} needs Java 17 or newer; found: $(java -version 2>&1 | head -n1)"
        return 1
    fi
}

kafka_libs_ready() { [[ -f $KAFKA_LIBS/.complete ]]; }

# kafka_fetch_libs : copy Kafka's runtime jars into KAFKA_LIBS unless they are already there.
# The jars land in a temporary directory first and are renamed into place when complete, so an
# interrupted or concurrent fetch never leaves a half-filled classpath behind.
kafka_fetch_libs() {
    kafka_libs_ready && return 0
    command -v mvn >/dev/null || {
        kafka_log "mvn not found on PATH (apt-get install maven)"
        return 1
    }
    mkdir -p "$KAFKA_CACHE"
    local tmp
    tmp=$(mktemp -d "${KAFKA_CACHE}/libs.tmp.XXXXXX")
    kafka_log "fetching Apache Kafka ${KAFKA_VERSION} jars with mvn into ${KAFKA_LIBS}"
    if ! mvn -B -f "${KAFKA_SCRIPTS_DIR}/pom.xml" -Dkafka.version="${KAFKA_VERSION}" \
        dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
        >"${KAFKA_CACHE}/mvn.log" 2>&1; then
        grep -E '\[ERROR\]' "${KAFKA_CACHE}/mvn.log" | head -n 3 >&2 || true
        rm -rf "$tmp"
        kafka_log "mvn could not fetch Apache Kafka ${KAFKA_VERSION}; see ${KAFKA_CACHE}/mvn.log"
        return 1
    fi
    [[ -f $tmp/kafka_2.13-${KAFKA_VERSION}.jar ]] || {
        rm -rf "$tmp"
        kafka_log "mvn did not produce kafka_2.13-${KAFKA_VERSION}.jar"
        return 1
    }
    echo "$KAFKA_VERSION" >"$tmp/.complete"
    rm -rf "$KAFKA_LIBS.old"
    [[ -d $KAFKA_LIBS ]] && ! kafka_libs_ready && mv -T "$KAFKA_LIBS" "$KAFKA_LIBS.old"
    # Lost a race with another fetch: theirs is as good as ours.
    mv -T "$tmp" "$KAFKA_LIBS" 2>/dev/null || rm -rf "$tmp"
    rm -rf "$KAFKA_LIBS.old"
    kafka_libs_ready
}

# kafka_tool_java CLASS ARGS... : run a Kafka command-line tool (small heap, fast start, warnings
# and errors only on stderr).
kafka_tool_java() {
    local cls=$1
    shift
    # KAFKA_TOOL_OPTS is split on purpose: it holds several JVM options.
    # shellcheck disable=SC2086
    java ${KAFKA_TOOL_OPTS:--Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Xshare:auto} \
        -Djava.awt.headless=true \
        -Dlog4j2.configurationFile="${KAFKA_SCRIPTS_DIR}/tools-log4j2.properties" \
        -cp "${KAFKA_LIBS}/*" "$cls" "$@"
}
