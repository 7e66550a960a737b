#!/bin/bash
# Runs redis-server like the official redis image: arguments that start with "-" or name a .conf
# file are passed to redis-server; without a config file it listens on all interfaces with
# protected mode off (the container's port mapping decides who can reach it); runs as user redis.
set -euo pipefail
if [ "$#" = 0 ] || [ "${1#-}" != "$1" ] || [ "${1%.conf}" != "$1" ]; then
    set -- redis-server "$@"
fi
if [ "$1" = redis-server ]; then
    case " $* " in *" --protected-mode "*|*.conf*) ;; *) set -- "$@" --protected-mode no ;; esac
    case " $* " in *" --bind "*|*.conf*) ;; *) set -- "$@" --bind "* -::*" ;; esac
    if [ "$(id -u)" = 0 ]; then
        chown redis:redis /data
        exec setpriv --reuid=redis --regid=redis --init-groups "$@"
    fi
fi
exec "$@"
