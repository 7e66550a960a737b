#!/usr/bin/env bash
# Builds local images of Kafka, Redis and PostgreSQL from Debian packages only (no registry needed),
# each speaking the environment and command interface of the official image it stands in for
# (apache/kafka, redis, postgres), and prints the settings that point kcons' testcontainers
# backend at them:
#
#   eval "$(deploy/local/images/build.sh)"     # exports KCONS_TC_{KAFKA,REDIS,POSTGRES}_IMAGE
#
# Each image is tagged with a hash of its inputs (this script, the image's folder, the Debian
# suite and packages, and for Kafka the pinned broker jars) and is reused when that tag exists.
# Needs root, debootstrap (installed when missing) and a Docker engine (deploy/local/docker.sh).
# Nothing is installed inside a container: the root file system is made with debootstrap on the
# host, from the same Debian mirror as the host's apt sources, and imported.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../../.." && pwd)
suite=${KCONS_IMAGES_SUITE:-bookworm}
work=${KCONS_IMAGES_WORK:-/var/tmp/kcons-images}
debs=${KCONS_IMAGES_DEB_CACHE:-/var/cache/kcons-images/debs}
log() { echo "kcons images: $*" >&2; }

mirror() {
    # The host's own Debian mirror (deb822 or one-line sources), so the images come from where apt does.
    local uri
    uri=$(grep -hs '^URIs:' /etc/apt/sources.list.d/debian.sources | awk '{print $2}' | grep -v security | head -n1 || true)
    [ -n "$uri" ] || uri=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -n1 || true)
    echo "${KCONS_IMAGES_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}

need_tools() {
    if ! command -v debootstrap >/dev/null; then
        [ "$(id -u)" = 0 ] || { log "debootstrap is missing: sudo apt-get install -y debootstrap"; exit 1; }
        log "installing debootstrap"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null \
            || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null; }
    fi
    docker version >/dev/null 2>&1 || { log "no Docker engine answers at ${DOCKER_HOST:-the default socket}: run deploy/local/docker.sh start"; exit 1; }
}

input_hash() {  # name, packages, extra text
    { cat "$here/build.sh"; find "$here/$1" -type f -print0 | sort -z | xargs -0 cat; echo "$suite $2 $3"; } \
        | sha256sum | cut -c1-12
}

rootfs() {  # dir, packages
    local dir=$1 pkgs=$2
    rm -rf "$dir"
    mkdir -p "$dir" "$debs"
    log "debootstrap $suite with $pkgs"
    debootstrap --variant=minbase --include="$pkgs" --cache-dir="$debs" "$suite" "$dir" "$(mirror)" \
        >"$dir.log" 2>&1 || { tail -n 30 "$dir.log" >&2; exit 1; }
    # Leave out what a container never needs: package lists, docs, manuals, locales but C.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/usr/share/doc/* "$dir"/usr/share/man/* \
        "$dir"/usr/share/info/*
}

import() {  # dir, tag, docker-import --change options...
    local dir=$1 tag=$2
    shift 2
    local changes=()
    for c in "$@"; do changes+=(--change "$c"); done
    tar -C "$dir" -c . | docker import "${changes[@]}" - "$tag" >/dev/null
    rm -rf "$dir" "$dir.log"
    log "built $tag"
}

exists() { docker image inspect "$1" >/dev/null 2>&1; }

build_redis() {
    local pkgs=redis-server tag
    tag="kcons-local/redis:7-$(input_hash redis "$pkgs" "")"
    if ! exists "$tag"; then
        rootfs "$work/redis" "$pkgs"
        install -m 755 "$here/redis/entrypoint.sh" "$work/redis/usr/local/bin/docker-entrypoint.sh"
        mkdir -p "$work/redis/data"
        import "$work/redis" "$tag" 'WORKDIR /data' 'EXPOSE 6379' \
            'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["redis-server"]'
    fi
    echo "export KCONS_TC_REDIS_IMAGE=$tag"
}

build_postgres() {
    local pkgs=postgresql-15 tag
    tag="kcons-local/postgres:15-$(input_hash postgres "$pkgs" "")"
    if ! exists "$tag"; then
        rootfs "$work/postgres" "$pkgs"
        # The package's own cluster is not used: the entrypoint makes one in PGDATA.
        rm -rf "$work/postgres/var/lib/postgresql/15" "$work/postgres/etc/postgresql/15"
        install -m 755 "$here/postgres/entrypoint.sh" "$work/postgres/usr/local/bin/docker-entrypoint.sh"
        import "$work/postgres" "$tag" 'EXPOSE 5432' 'ENV PGDATA=/var/lib/postgresql/data' \
            'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            'ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]' 'CMD ["postgres"]'
    fi
    echo "export KCONS_TC_POSTGRES_IMAGE=$tag"
}

build_kafka() {
    local pkgs=openjdk-17-jre-headless jars version tag
    jars=$(cd "$repo" && python3 -m kcons.testing.install --kafka-jars-only)
    version=$(basename "$(ls "$jars"/kafka_2.13-*.jar | grep -v -e sources -e test | head -n1)" .jar)
    version=${version#kafka_2.13-}
    tag="kcons-local/kafka:$version-$(input_hash kafka "$pkgs" "$(basename "$jars")")"
    if ! exists "$tag"; then
        rootfs "$work/kafka" "$pkgs"
        local root="$work/kafka"
        mkdir -p "$root/opt/kafka/libs" "$root/opt/kafka/config" "$root/etc/kafka/docker"
        cp "$jars"/*.jar "$root/opt/kafka/libs/"
        install -m 644 "$here/kafka/default.properties" "$here/kafka/log4j2.properties" "$root/opt/kafka/config/"
        install -m 755 "$here/kafka/entrypoint.sh" "$root/etc/kafka/docker/run"
        import "$root" "$tag" 'WORKDIR /opt/kafka' 'EXPOSE 9092' \
            'ENTRYPOINT ["/etc/kafka/docker/run"]' 'CMD ["/etc/kafka/docker/run"]'
    fi
    echo "export KCONS_TC_KAFKA_IMAGE=$tag"
}

need_tools
mkdir -p "$work"
images=${*:-kafka redis postgres}
for image in $images; do
    case "$image" in
        kafka) build_kafka ;;
        redis) build_redis ;;
        postgres) build_postgres ;;
        *) log "unknown image $image (kafka, redis, postgres)"; exit 2 ;;
    esac
done
