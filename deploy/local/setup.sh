#!/usr/bin/env bash
# Installs everything kcons needs on a fresh Debian machine: the package with its dev extra
# (KCONS_SETUP_EXTRAS=lint adds the linters and deploy-file validators, as .ci/run does),
# Debian's redis-server and postgresql (and Java/Maven when missing), the pinned Kafka broker
# jars and the RocketMQ node's jars (Maven, cached in ~/.cache/kcons). Safe to run again:
# finished steps are skipped.
# Running this script is the explicit request to install system packages (no prompt).
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e ".[dev${KCONS_SETUP_EXTRAS:+,$KCONS_SETUP_EXTRAS}]"
pip_done=$(date +%s)
python3 -m kcons.testing.install --install-system-packages --rocketmq
echo "kcons setup: pip $((pip_done - start))s, services $(( $(date +%s) - pip_done ))s" >&2
