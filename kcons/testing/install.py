"""Installs what the local test services need: Kafka's and RocketMQ's jars (Maven), Redis, PostgreSQL, RabbitMQ (apt).

The Kafka broker is pinned by ``kcons/testing/kafka/pom.xml`` and RocketMQ's name server,
broker and proxy by ``kcons/testing/rocketmq_broker/pom.xml`` (package data, so they ship in
the wheel); every jar each resolves to is checked against the ``jars.sha256`` beside it. The jars are
resolved with ``mvn dependency:copy-dependencies`` into a per-user cache folder
(``KCONS_CACHE_DIR``, else ``$XDG_CACHE_HOME/kcons``, else ``~/.cache/kcons``), keyed by the
hash of the pom and the checksums, and reused when complete: never into a source checkout.

Debian's ``redis-server``, ``postgresql``, a Java runtime and Maven are installed only when
asked: ``install_system_packages=True`` (``kcons dev setup --install-system-packages``) or a
``yes`` typed at an interactive prompt. ``rabbitmq-server`` is added to them only when asked
(``rabbitmq=True``, ``--rabbitmq``), under the same rule. Otherwise a missing package fails with the exact
command to run.

Run ``python -m kcons.testing.install [--install-system-packages]`` (or ``kcons dev setup``).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kcons.errors import ServiceStartError

log = logging.getLogger(__name__)

__all__ = [
    "cache_dir",
    "ensure_all",
    "ensure_debian_packages",
    "ensure_kafka_jars",
    "ensure_rocketmq_jars",
    "find_kafka_pom",
    "find_rocketmq_pom",
    "missing_packages",
    "postgres_bin_dir",
    "rabbitmq_server_binary",
]

_PACKAGE_DATA = Path(__file__).resolve().parent / "kafka"
_ROCKETMQ_DATA = Path(__file__).resolve().parent / "rocketmq_broker"
_COMPLETE_MARKER = ".complete"


def find_kafka_pom() -> Path:
    """The pinned Kafka pom: ``KCONS_KAFKA_POM``, else the one shipped inside the package."""
    env = os.environ.get("KCONS_KAFKA_POM")
    pom = Path(env) if env else _PACKAGE_DATA / "pom.xml"
    if not pom.is_file():
        setting = "KCONS_KAFKA_POM points at" if env else "the installed kcons package lacks"
        raise ServiceStartError(
            f"{setting} {pom}, which is not a file: set KCONS_KAFKA_POM to the pom, KCONS_KAFKA_JARS "
            "to a folder of Kafka jars, or KCONS_KAFKA_BOOTSTRAP to a running broker"
        )
    return pom


def _checksums(pom: Path) -> dict[str, str]:
    """Expected SHA-256 per jar name, from ``jars.sha256`` beside the pom (empty if there is none)."""
    manifest = pom.with_name("jars.sha256")
    if not manifest.is_file():
        return {}
    out: dict[str, str] = {}
    for line in manifest.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            digest, name = line.split(maxsplit=1)
            out[name.lstrip("*")] = digest
    return out


def cache_dir() -> Path:
    """The per-user cache: ``KCONS_CACHE_DIR``, else ``$XDG_CACHE_HOME/kcons``, else ``~/.cache/kcons``."""
    env = os.environ.get("KCONS_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "kcons"


def _verify_jars(folder: Path, expected: dict[str, str]) -> None:
    """Fail unless the folder holds exactly the expected jars with the expected contents."""
    if not expected:
        return
    present = {p.name for p in folder.glob("*.jar")}
    missing = sorted(set(expected) - present)
    extra = sorted(present - set(expected))
    if missing or extra:
        raise ServiceStartError(f"resolved jars differ from jars.sha256: missing {missing}, unexpected {extra}")
    for name, digest in expected.items():
        actual = hashlib.sha256((folder / name).read_bytes()).hexdigest()
        if actual != digest:
            raise ServiceStartError(f"{folder / name} has SHA-256 {actual}, jars.sha256 pins {digest}")


def ensure_kafka_jars() -> Path:
    """Return a folder holding the broker's jars, resolving and checking them with Maven when needed."""
    return _jars_from_setting("KCONS_KAFKA_JARS", "kafka_2.13-*.jar") or _resolve_jars(
        find_kafka_pom(), "kafka", "kafka_2.13-*.jar"
    )


def _jars_from_setting(setting: str, probe: str) -> Path | None:
    """The folder the setting names (it must hold a jar matching ``probe``), or None when unset."""
    env = os.environ.get(setting)
    if not env:
        return None
    folder = Path(env)
    if not any(folder.glob(probe)):
        raise ServiceStartError(f"{setting}={folder} holds no {probe}")
    return folder


def find_rocketmq_pom() -> Path:
    """The pinned RocketMQ pom shipped inside the package."""
    pom = _ROCKETMQ_DATA / "pom.xml"
    if not pom.is_file():
        raise ServiceStartError(
            f"the installed kcons package lacks {pom}: set KCONS_ROCKETMQ_JARS to a folder of RocketMQ jars"
        )
    return pom


def ensure_rocketmq_jars() -> Path:
    """A folder holding the RocketMQ name server, broker and proxy jars (``KCONS_ROCKETMQ_JARS``, else Maven)."""
    return _jars_from_setting("KCONS_ROCKETMQ_JARS", "rocketmq-proxy-*.jar") or _resolve_jars(
        find_rocketmq_pom(), "rocketmq", "rocketmq-proxy-*.jar"
    )


def _resolve_jars(pom: Path, name: str, probe: str) -> Path:
    """Resolve ``pom``'s runtime jars into the cache (once; checked against its ``jars.sha256``)."""
    expected = _checksums(pom)
    key = hashlib.sha256(pom.read_bytes() + repr(sorted(expected.items())).encode()).hexdigest()[:12]
    target = cache_dir() / f"{name}-jars-{key}"
    if (target / _COMPLETE_MARKER).is_file():
        return target
    mvn = shutil.which("mvn")
    if mvn is None:
        raise ServiceStartError(
            f"Maven (mvn) is not installed; it is needed to resolve the {name} jars: {_install_hint(['maven'])}"
        )
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    started = time.monotonic()
    log.info("resolving %s jars from %s into %s", name, pom, target)
    cmd = [
        mvn, "-B", "-q", "--strict-checksums", "-f", str(pom), "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode != 0 or not any(staging.glob(probe)):
        tail = (proc.stdout + proc.stderr)[-4000:]
        raise ServiceStartError(f"mvn could not resolve the {name} jars (exit {proc.returncode}):\n{tail}")
    try:
        _verify_jars(staging, expected)
    except ServiceStartError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    (staging / _COMPLETE_MARKER).write_text(f"resolved in {time.monotonic() - started:.1f}s\n")
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    log.info("%s jars ready in %.1fs", name, time.monotonic() - started)
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


def rabbitmq_server_binary() -> Path | None:
    """The server's start script (``KCONS_RABBITMQ_BIN``, else Debian's), or None when not installed."""
    env = os.environ.get("KCONS_RABBITMQ_BIN")
    script = Path(env or "/usr/lib/rabbitmq/bin") / "rabbitmq-server"
    return script if script.exists() else None


def missing_packages(*, rabbitmq: bool = False) -> list[str]:
    """The Debian packages the local backend needs that are not installed (``rabbitmq``: its server too)."""
    missing = []
    if shutil.which("redis-server") is None:
        missing.append("redis-server")
    if postgres_bin_dir() is None:
        missing.append("postgresql")
    if shutil.which("java") is None:
        missing.append("openjdk-17-jre-headless")
    if shutil.which("mvn") is None:
        missing.append("maven")
    if rabbitmq and rabbitmq_server_binary() is None:
        missing.append("rabbitmq-server")
    return missing


def _install_command(packages: list[str]) -> list[list[str]]:
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    return [
        [*sudo, "apt-get", "update", "-qq"],
        [*sudo, "apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages],
    ]


def _install_hint(packages: list[str]) -> str:
    return " && ".join(shlex.join(cmd) for cmd in _install_command(packages))


def _confirm(packages: list[str]) -> bool:
    """Ask on the terminal whether to install; False without a terminal."""
    if not sys.stdin.isatty():
        return False
    sys.stderr.write(f"kcons needs {', '.join(packages)}; run `{_install_hint(packages)}` now? [y/N] ")
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")


def ensure_debian_packages(install: bool | None = None, *, rabbitmq: bool = False) -> list[str]:
    """Make sure Redis, PostgreSQL, Java and Maven (and ``rabbitmq-server`` when asked) are installed.

    Returns what was installed.
    ``install=True`` installs missing packages with apt-get; ``None`` asks on an interactive
    terminal; ``False`` (or no terminal, or a "no") fails with the exact command to run.
    """
    missing = missing_packages(rabbitmq=rabbitmq)
    if not missing:
        return []
    allowed = install if install is not None else _confirm(missing)
    if not allowed:
        raise ServiceStartError(
            f"missing packages {', '.join(missing)}: install them with `{_install_hint(missing)}` "
            "(or `kcons dev setup --install-system-packages`), or point KCONS_KAFKA_BOOTSTRAP, "
            "KCONS_REDIS_URL and KCONS_POSTGRES_DSN at running servers"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("installing %s with apt-get", " ".join(missing))
    for cmd in _install_command(missing):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, check=False)
        if proc.returncode != 0:
            raise ServiceStartError(f"{' '.join(cmd)} failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    still = missing_packages(rabbitmq=rabbitmq)
    if still:
        raise ServiceStartError(f"apt-get ran but {', '.join(still)} are still missing")
    return missing


def ensure_all(
    install_system_packages: bool | None = None, *, rabbitmq: bool = False, rocketmq: bool = False
) -> dict[str, float]:
    """Install everything the local backend needs (RabbitMQ's server, RocketMQ's jars when asked); seconds per step."""
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    ensure_debian_packages(install_system_packages, rabbitmq=rabbitmq)
    timings["packages_s"] = round(time.monotonic() - t0, 2)
    t1 = time.monotonic()
    ensure_kafka_jars()
    timings["kafka_jars_s"] = round(time.monotonic() - t1, 2)
    if rocketmq:  # else the local RocketMQ node resolves them on its first start
        t2 = time.monotonic()
        ensure_rocketmq_jars()
        timings["rocketmq_jars_s"] = round(time.monotonic() - t2, 2)
    return timings


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m kcons.testing.install``."""
    parser = argparse.ArgumentParser(prog="python -m kcons.testing.install", description=__doc__.splitlines()[0])
    parser.add_argument("--install-system-packages", action="store_true",
                        help="install missing Debian packages with apt-get without asking")  # fmt: skip
    parser.add_argument("--rabbitmq", action="store_true",
                        help="also install Debian's rabbitmq-server (the RabbitMQ sink's tests)")  # fmt: skip
    parser.add_argument("--rocketmq", action="store_true",
                        help="also resolve the RocketMQ node's jars (the RocketMQ tests)")  # fmt: skip
    parser.add_argument("--kafka-jars-only", action="store_true",
                        help="only resolve the Kafka jars and print their folder")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.kafka_jars_only:
            sys.stdout.write(f"{ensure_kafka_jars()}\n")
            return 0
        timings = ensure_all(
            True if args.install_system_packages else None, rabbitmq=args.rabbitmq, rocketmq=args.rocketmq
        )
    except ServiceStartError as exc:
        log.error("setup failed: %s", exc)
        return 1
    log.info("setup done: %s", timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
