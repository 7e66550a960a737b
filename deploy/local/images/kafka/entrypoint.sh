#!/bin/bash
# Runs one Kafka node configured like the apache/kafka image: every KAFKA_* environment variable
# becomes a server.properties entry (KAFKA_ dropped, lower case, "_" -> ".", "__" -> "_", "___" -> "-"),
# except the JVM/log settings that image reserves; CLUSTER_ID formats the storage on first start.
# Without any KAFKA_* setting it runs the same single-node KRaft defaults as that image.
set -euo pipefail
config_dir=/opt/kafka/config
props="$config_dir/server.properties"
excluded=" KAFKA_VERSION KAFKA_HEAP_OPTS KAFKA_LOG4J_OPTS KAFKA_OPTS KAFKA_JMX_OPTS KAFKA_JVM_PERFORMANCE_OPTS \
KAFKA_GC_LOG_OPTS KAFKA_LOG4J_ROOT_LOGLEVEL KAFKA_LOG4J_LOGGERS KAFKA_TOOLS_LOG4J_LOGLEVEL KAFKA_JMX_HOSTNAME KAFKA_JMX_PORT "

if [ "${1:-}" != "" ] && [ "$1" != "/etc/kafka/docker/run" ]; then
    exec "$@"
fi

to_property() {
    local key=${1#KAFKA_}
    key=${key//___/$'\x01'}
    key=${key//__/$'\x02'}
    key=${key//_/.}
    key=${key//$'\x01'/-}
    key=${key//$'\x02'/_}
    printf '%s' "${key,,}"
}

mkdir -p "$config_dir"
: >"$props.tmp"
have_env=0
while IFS='=' read -r -d '' name value; do
    case "$name" in KAFKA_*) ;; *) continue ;; esac
    case "$excluded" in *" $name "*) continue ;; esac
    have_env=1
    printf '%s=%s\n' "$(to_property "$name")" "$value" >>"$props.tmp"
done < <(env -0)

if [ "$have_env" = 0 ]; then
    cp "$config_dir/default.properties" "$props.tmp"
fi
if ! grep -q '^log\.dirs=' "$props.tmp"; then
    echo "log.dirs=/tmp/kraft-combined-logs" >>"$props.tmp"
fi
# A listener list derived from the advertised one, as the official image does.
if ! grep -q '^listeners=' "$props.tmp" && [ -n "${KAFKA_ADVERTISED_LISTENERS:-}" ]; then
    echo "listeners=$(sed -e 's|://[^:]*:|://0.0.0.0:|g' <<<"$KAFKA_ADVERTISED_LISTENERS")" >>"$props.tmp"
fi
sort "$props.tmp" >"$props"
rm -f "$props.tmp"

cp_arg="/opt/kafka/libs/*"
java_opts=(${KAFKA_HEAP_OPTS:--Xmx512m -Xms256m} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true}
           -Dlog4j2.configurationFile=$config_dir/log4j2.properties ${KAFKA_OPTS:-})
cluster_id=${CLUSTER_ID:-5L6g3nShT-eMCtK--X86sw}
log_dir=$(grep -m1 '^log\.dirs=' "$props" | cut -d= -f2 | cut -d, -f1)
if [ ! -f "$log_dir/meta.properties" ]; then
    java "${java_opts[@]}" -cp "$cp_arg" kafka.tools.StorageTool format --cluster-id="$cluster_id" -c "$props" --ignore-formatted
fi
exec java "${java_opts[@]}" -cp "$cp_arg" kafka.Kafka "$props"
