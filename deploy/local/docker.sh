#!/usr/bin/env bash
# A Docker engine for kcons' testcontainers tests on a machine without one (Debian, as root).
#
#   deploy/local/docker.sh start    install docker.io when missing, start dockerd, print `export DOCKER_HOST=...`
#   deploy/local/docker.sh stop     stop the dockerd this script started
#   deploy/local/docker.sh status   exit 0 when it answers
#   deploy/local/docker.sh env      print the export lines (DOCKER_HOST, TESTCONTAINERS_RYUK_DISABLED)
#
# The engine is private to kcons: vfs storage, its own data root, exec root, socket and pid file under
# KCONS_DOCKER_DIR (default /var/lib/kcons-docker), no TCP socket, no iptables rules, and published
# ports bound to 127.0.0.1 by default: nothing listens beyond loopback. Safe to run again: a running
# engine is reused. Ryuk (testcontainers' reaper image) is not available offline, so the exported
# environment turns it off; kcons stops its own containers.
set -euo pipefail
dir=${KCONS_DOCKER_DIR:-/var/lib/kcons-docker}
sock="$dir/docker.sock"
pidfile="$dir/docker.pid"
host="unix://$sock"

log() { echo "kcons docker: $*" >&2; }

answering() { [ -S "$sock" ] && DOCKER_HOST="$host" timeout 10 docker version --format '{{.Server.Version}}' >/dev/null 2>&1; }

running_pid() {
    # The recorded pid, only if it is still a dockerd (a reused pid is not ours).
    [ -f "$pidfile" ] || return 1
    local pid
    pid=$(cat "$pidfile")
    [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q "dockerd .*--pidfile $pidfile" || return 1
    echo "$pid"
}

install() {
    if command -v dockerd >/dev/null && command -v docker >/dev/null; then return 0; fi
    if [ "$(id -u)" != 0 ]; then
        log "dockerd is missing; install it with: sudo apt-get install -y --no-install-recommends docker.io"
        exit 1
    fi
    log "installing docker.io"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends docker.io >/dev/null
}

print_env() {
    echo "export DOCKER_HOST=$host"
    echo "export TESTCONTAINERS_RYUK_DISABLED=true"
}

start() {
    install
    if answering; then print_env; return 0; fi
    if pid=$(running_pid); then
        log "dockerd $pid is running but not answering yet"
    else
        mkdir -p "$dir/root" "$dir/exec"
        rm -f "$sock" "$pidfile"
        log "starting dockerd (data root $dir/root, socket $sock)"
        # setsid: the engine outlives the shell that started it and gets none of its signals.
        setsid dockerd --host "$host" --data-root "$dir/root" --exec-root "$dir/exec" --pidfile "$pidfile" \
            --storage-driver vfs --iptables=false --ip6tables=false --ip 127.0.0.1 --userland-proxy=true \
            --log-level warn </dev/null >>"$dir/dockerd.log" 2>&1 &
    fi
    for _ in $(seq 1 120); do
        if answering; then print_env; return 0; fi
        sleep 0.5
    done
    log "dockerd did not answer within 60s; its log:"
    tail -n 30 "$dir/dockerd.log" >&2 || true
    exit 1
}

stop() {
    local pid
    if ! pid=$(running_pid); then log "not running"; return 0; fi
    kill -TERM "$pid"
    for _ in $(seq 1 60); do
        [ -d "/proc/$pid" ] || { log "stopped"; return 0; }
        sleep 0.5
    done
    log "dockerd $pid did not stop within 30s; killing it"
    kill -KILL "$pid" || true
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    status) answering ;;
    env) print_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
