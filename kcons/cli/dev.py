"""``kcons dev``: a local Kafka (KRaft), Redis and PostgreSQL for development, recorded in a state file."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import click

from kcons.cli.errors import click_error
from kcons.errors import KconsError
from kcons.testing.procs import ProcessRecord, delete_marked_dir, mark_dir, records_of, stop_groups

log = logging.getLogger(__name__)

__all__ = ["dev"]


def _state_file() -> Path:
    base = os.environ.get("KCONS_STATE_DIR") or os.path.join(
        os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state"), "kcons"
    )
    return Path(base) / "dev.json"


def _load_state() -> dict[str, Any] | None:
    path = _state_file()
    if not path.is_file():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except ValueError:
        return None
    return data


def _records(state: dict[str, Any]) -> list[ProcessRecord]:
    """The recorded processes of a state file that still are the ones recorded.

    State files written before start times were recorded hold bare ids: such an id counts only
    while its command line names one of the stack's recorded folders.
    """
    if "procs" in state:
        return [ProcessRecord.from_json(p) for p in state["procs"]]
    dirs = [str(d) for d in state.get("dirs", [])]
    legacy = records_of(int(p) for p in state.get("pids", []))
    return [r for r in legacy if any(d and d in arg for d in dirs for arg in r.cmdline)]


def _pids(state: dict[str, Any]) -> list[int]:
    return [int(p["pid"]) for p in state["procs"]] if "procs" in state else [int(p) for p in state.get("pids", [])]


def _running(state: dict[str, Any]) -> dict[int, bool]:
    """Each recorded pid and whether the recorded process (not a reuse of its id) still runs."""
    live = {r.pid for r in _records(state) if r.is_running()}
    return {pid: pid in live for pid in _pids(state)}


@click.group()
def dev() -> None:
    """A local Kafka (KRaft), Redis and PostgreSQL for development, on 127.0.0.1."""


@dev.command("setup")
@click.option("--install-system-packages", is_flag=True,
              help="Install missing Debian packages (redis-server, postgresql, Java, Maven) with apt-get "
                   "without asking; otherwise kcons asks on a terminal, or prints the command and fails.")  # fmt: skip
def dev_setup(install_system_packages: bool) -> None:
    """Install what the local stack needs (Debian packages when allowed, Kafka jars via Maven)."""
    from kcons.testing.install import ensure_all

    try:
        timings = ensure_all(True if install_system_packages else None)
    except KconsError as exc:
        raise click_error(exc) from None
    click.echo(json.dumps({"setup": "ok", **timings}))


@dev.command("up")
@click.option("--brokers", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="Kafka brokers to run.")  # fmt: skip
def dev_up(brokers: str) -> None:
    """Start Kafka, Redis and PostgreSQL in the background and record them in a state file."""
    from kcons.testing import local
    from kcons.testing.install import ensure_all

    state = _load_state()
    if state and all(_running(state).values()):
        click.echo(f"already running (state in {_state_file()}); `kcons dev down` first to restart")
        return
    if state:
        _teardown(state)
    try:
        ensure_all()
        t0 = time.monotonic()
        kafka = local.KafkaCluster(int(brokers)).start()
        t_kafka = time.monotonic() - t0
        redis_srv = local.RedisServer().start()
        pg = local.PostgresServer().start()
    except KconsError as exc:
        raise click_error(exc) from None
    procs = [*kafka.nodes, redis_srv.process, pg.process]
    for svc in (kafka, redis_srv, pg):
        local._LIVE.discard(svc)  # keep them running after this command exits
    owner = uuid.uuid4().hex
    for folder in (kafka.base_dir, redis_srv.base_dir, pg.base_dir):
        mark_dir(folder, owner)
    new_state = {
        "id": owner,
        "started_at": time.time(),
        "procs": [r.to_json() for r in records_of(p.pid for p in procs if p is not None)],
        "dirs": [str(kafka.base_dir), str(redis_srv.base_dir), str(pg.base_dir)],
        "env": {
            "KCONS_KAFKA_BOOTSTRAP": kafka.bootstrap,
            "KCONS_REDIS_URL": redis_srv.url,
            "KCONS_POSTGRES_DSN": pg.dsn,
        },
    }
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(new_state, indent=2))
    click.echo(f"kafka {kafka.bootstrap} (started in {t_kafka:.1f}s), redis {redis_srv.url}, "
               f"postgres {pg.dsn}")  # fmt: skip
    click.echo('run: eval "$(kcons dev env)"')


@dev.command("env")
def dev_env() -> None:
    """Print ``export KCONS_...`` lines for the running stack (use with eval)."""
    state = _load_state()
    if not state:
        raise click.ClickException("no local stack is running: run `kcons dev up` first")
    dead = [pid for pid, up in _running(state).items() if not up]
    if dead:
        raise click.ClickException(f"the local stack is not healthy (processes {dead} exited): "
                                   "run `kcons dev down && kcons dev up`")  # fmt: skip
    click.echo("export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in state["env"].items()))


@dev.command("status")
def dev_status() -> None:
    """Show whether the local stack is running."""
    state = _load_state()
    if not state:
        click.echo("not running")
        sys.exit(1)
    alive = _running(state)
    click.echo(json.dumps({"running": all(alive.values()), "pids": alive, **state["env"]}))
    sys.exit(0 if all(alive.values()) else 1)


def _teardown(state: dict[str, Any]) -> None:
    """Stop the recorded process groups that still are ours and delete the folders marked as ours."""
    skipped = stop_groups(_records(state))
    if skipped:
        log.warning("not signalled (the id now names another process or none): %s", skipped)
    for folder in state.get("dirs", []):
        path = Path(folder)
        if "procs" in state:
            owned = delete_marked_dir(path, str(state.get("id")))
        else:  # legacy state: only kcons' own temporary folders
            owned = path.parent == Path(tempfile.gettempdir()) and path.name.startswith("kcons-")
            if owned:
                shutil.rmtree(path, ignore_errors=True)
        if not owned and path.exists():
            log.warning("left %s in place: it is not marked as this stack's folder", path)
    _state_file().unlink(missing_ok=True)


@dev.command("down")
def dev_down() -> None:
    """Stop the local stack and delete its data."""
    state = _load_state()
    if not state:
        click.echo("not running")
        return
    _teardown(state)
    click.echo("stopped")


@dev.command("smoke")
@click.option("--messages", default=1000, show_default=True, help="Messages in the round trip.")
def dev_smoke(messages: int) -> None:
    """Round trip through the stack named by KCONS_*: Kafka produce/consume, Redis, PostgreSQL."""
    from kcons.testing.smoke import run_smoke

    try:
        result = run_smoke(messages)
    except KconsError as exc:
        raise click_error(exc) from None
    click.echo(json.dumps(result))
    if not result["ok"]:
        sys.exit(1)
