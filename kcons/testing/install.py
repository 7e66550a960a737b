"""Installs what the local test services need: Kafka's jars (Maven), Redis and PostgreSQL (apt).

The Kafka broker is pinned by ``deploy/local/kafka/pom.xml``; its jars are resolved with
``mvn dependency:copy-dependencies`` into a cache folder (git-ignored ``.cache/`` in the
repository, else ``~/.cache/kcons``) keyed by the pom's hash and reused when complete.
Debian's ``redis-server`` and ``postgresql`` are installed when missing, as root only.

Run ``python -m kcons.testing.install`` (or ``kcons dev setup``) to do all of it.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kcons.errors import ServiceStartError

log = logging.getLogger(__name__)

__all__ = [
    "ensure_all",
    "ensure_debian_packages",
    "ensure_kafka_jars",
    "find_kafka_pom",
    "postgres_bin_dir",
]

_POM_RELATIVE = Path("deploy/local/kafka/pom.xml")
_COMPLETE_MARKER = ".complete"


def _repo_root() -> Path | None:
    """The source checkout this package runs from, if any (editable installs, the repo itself)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / _POM_RELATIVE).is_file():
            return parent
    cwd = Path.cwd()
    for parent in (cwd, *cwd.parents):
        if (parent / _POM_RELATIVE).is_file():
            return parent
    return None


def find_kafka_pom() -> Path:
    """Locate the pinned Kafka pom: ``KCONS_KAFKA_POM``, else the checkout's ``deploy/local/kafka``."""
    env = os.environ.get("KCONS_KAFKA_POM")
    if env:
        pom = Path(env)
        if not pom.is_file():
            raise ServiceStartError(f"KCONS_KAFKA_POM points at {pom}, which is not a file")
        return pom
    root = _repo_root()
    if root is None:
        raise ServiceStartError(
            "cannot find deploy/local/kafka/pom.xml: set KCONS_KAFKA_POM to the pom, KCONS_KAFKA_JARS "
            "to a folder of Kafka jars, or KCONS_KAFKA_BOOTSTRAP to a running broker"
        )
    return root / _POM_RELATIVE


def _cache_base() -> Path:
    root = _repo_root()
    if root is not None and os.access(root, os.W_OK):
        return root / ".cache"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kcons"


def ensure_kafka_jars() -> Path:
    """Return a folder holding the broker's jars, resolving them with Maven when needed."""
    env = os.environ.get("KCONS_KAFKA_JARS")
    if env:
        folder = Path(env)
        if not any(folder.glob("kafka_2.13-*.jar")):
            raise ServiceStartError(f"KCONS_KAFKA_JARS={folder} holds no kafka_2.13-*.jar")
        return folder
    pom = find_kafka_pom()
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()[:12]
    target = _cache_base() / f"kafka-jars-{digest}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceStartError("Maven (mvn) is not installed; it is needed to resolve the Kafka jars")
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    log.info("resolving Kafka jars from %s into %s", pom, target)
    cmd = [
        mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise ServiceStartError(f"mvn could not resolve the Kafka jars (exit {proc.returncode}):\n{tail}")
    (staging / _COMPLETE_MARKER).write_text(f"resolved in {time.monotonic() - started:.1f}s\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("Kafka jars ready in %.1fs", time.monotonic() - started)
    return target


def postgres_bin_dir() -> Path | None:
    """Find PostgreSQL's server binaries (``initdb``, ``postgres``), newest version first."""
    env = os.environ.get("KCONS_POSTGRES_BIN")
    if env:
        return Path(env)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for cand in candidates:
        if (Path(cand) / "initdb").exists() and (Path(cand) / "postgres").exists():
            return Path(cand)
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _missing_packages() -> list[str]:
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if postgres_bin_dir() is None:
        missing.append("postgresql")
    if shutil.which("java") is None:
        missing.append("openjdk-17-jre-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    return missing


def ensure_debian_packages() -> list[str]:
    """Install Redis, PostgreSQL, Java and Maven from Debian's packages when missing."""
    missing = _missing_packages()
    if not missing:
        return []
    if os.geteuid() != 0:
        raise ServiceStartError(
            f"missing packages {', '.join(missing)}: install them (apt-get install {' '.join(missing)}) "
            "or point KCONS_KAFKA_BOOTSTRAP, KCONS_REDIS_URL and KCONS_POSTGRES_DSN at running servers"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing %s with apt-get", " ".join(missing))
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
    ):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
        if proc.returncode != 0:
            raise ServiceStartError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    still = _missing_packages()
    if still:
        raise ServiceStartError(f"apt-get ran but {', '.join(still)} are still missing")
    return missing


def ensure_all() -> dict[str, float]:
    """Install everything the local backend needs; returns seconds spent per step."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ensure_debian_packages()
    timings["packages_s"] = round(time.monotonic() - t0, 2)
    t1 = time.monotonic()
    ensure_kafka_jars()
    timings["kafka_jars_s"] = round(time.monotonic() - t1, 2)
    return timings


def main() -> int:
    """Entry point of ``python -m kcons.testing.install``."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        timings = ensure_all()
    except ServiceStartError as exc:
        log.error("setup failed: %s", exc)
        return 1
    log.info("setup done: %s", timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
