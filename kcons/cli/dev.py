"""``kcons dev``: a local Kafka (KRaft), Redis and PostgreSQL for development, recorded in a state file."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from kcons.errors import KconsError

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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@click.group()
def dev() -> None:
    """A local Kafka (KRaft), Redis and PostgreSQL for development, on 127.0.0.1."""


@dev.command("setup")
def dev_setup() -> None:
    """Install what the local stack needs (Debian packages, Kafka jars via Maven)."""
    from kcons.testing.install import ensure_all

    try:
        timings = ensure_all()
    except KconsError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps({"setup": "ok", **timings}))


@dev.command("up")
@click.option("--brokers", type=click.Choice(["1", "3"]), default="1", show_default=True,
              help="Kafka brokers to run.")  # fmt: skip
def dev_up(brokers: str) -> None:
    """Start Kafka, Redis and PostgreSQL in the background and record them in a state file."""
    from kcons.testing import local
    from kcons.testing.install import ensure_all

    state = _load_state()
    if state and all(_alive(p) for p in state["pids"]):
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
        raise click.ClickException(str(exc)) from None
    procs = [*kafka.nodes, redis_srv.process, pg.process]
    for svc in (kafka, redis_srv, pg):
        local._LIVE.discard(svc)  # keep them running after this command exits
    new_state = {
        "id": uuid.uuid4().hex,
        "started_at": time.time(),
        "pids": [p.pid for p in procs if p is not None],
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
    dead = [p for p in state["pids"] if not _alive(p)]
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
    alive = {p: _alive(p) for p in state["pids"]}
    click.echo(json.dumps({"running": all(alive.values()), "pids": alive, **state["env"]}))
    sys.exit(0 if all(alive.values()) else 1)


def _teardown(state: dict[str, Any]) -> None:
    for pid in state["pids"]:
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
    deadline = time.monotonic() + 10
    for pid in state["pids"]:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
    for d in state["dirs"]:
        shutil.rmtree(d, ignore_errors=True)
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
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(result))
    if not result["ok"]:
        sys.exit(1)
