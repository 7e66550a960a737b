"""``kcons raft``: run a node of the metadata store, or talk to a running cluster.

The cluster secret comes from ``--secret-file`` or ``KCONS_RAFT_SECRET``; nothing starts without
one and it is never printed. ``--peers`` (or ``KCONS_RAFT_PEERS``) lists every node as
``id=host:port``; nodes bind 127.0.0.1 unless their peer entry (or ``KCONS_RAFT_LISTEN``) says
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from typing import Any

import click

from kcons.cli import logs
from kcons.cli.errors import click_error
from kcons.cli.settings import PortSetting, remember_file_secret, start_metrics
from kcons.config import check_host
from kcons.errors import ConfigError, KconsError
from kcons.raft.client import RaftClient
from kcons.raft.transport import parse_peers

__all__ = ["raft"]

_peers_option = click.option(
    "--peers", envvar="KCONS_RAFT_PEERS", show_envvar=True, required=True, help="id=host:port,... for every node"
)
_secret_option = click.option(
    "--secret-file", type=click.Path(dir_okay=False), default=None,
    help="file holding the cluster secret (default: $KCONS_RAFT_SECRET; at least 16 bytes; clients need it too)",
)  # fmt: skip


def _echo(obj: Any) -> None:
    click.echo(json.dumps(obj, sort_keys=True))


_PEERS = "KCONS_RAFT_PEERS (--peers)"


def _client(peers: str, secret_file: str | None) -> RaftClient:
    remember_file_secret(secret_file)
    try:
        parse_peers(peers, _PEERS)
        return RaftClient.from_env(peers, secret_file)
    except KconsError as exc:
        raise click_error(exc) from None


@click.group()
def raft() -> None:
    """The Raft metadata store: serve a node, read and write keys, manage members."""


@raft.command()
@click.option("--id", "node_id", type=int, required=True, help="this node's id (a key of --peers)")
@_peers_option
@click.option("--data-dir", type=click.Path(file_okay=False), required=True, help="WAL and snapshot directory")
@_secret_option
@click.option("--voters", default="", help="initial voter ids (default: every peer), e.g. 1,2,3")
@click.option("--metrics-port", type=PortSetting("KCONS_METRICS_PORT"), default=None, envvar="KCONS_METRICS_PORT",
              show_envvar=True, help="serve /metrics and /healthz on this port (0 or unset: off)")  # fmt: skip
@click.option("--metrics-host", envvar="KCONS_METRICS_HOST", default="127.0.0.1", show_default=True,
              show_envvar=True, help="address for /metrics and /healthz")  # fmt: skip
@click.option("--rejoin-empty", is_flag=True,
              help="start although this member's WAL is missing or empty: the cluster removes and re-adds it, "
                   "and it neither votes nor campaigns until then")  # fmt: skip
def serve(
    node_id: int,
    peers: str,
    data_dir: str,
    secret_file: str | None,
    voters: str,
    metrics_port: int | None,
    metrics_host: str,
    rejoin_empty: bool,
) -> None:
    """Run one node until SIGTERM or SIGINT.

    A node that once held state refuses to start when its WAL is missing or empty (it could vote
    twice in one term); ``--rejoin-empty`` is the operator's explicit way back in.
    """
    from dataclasses import replace

    from kcons.raft.node import NodeSettings, RaftNode

    logs.add_context(node=node_id)
    remember_file_secret(secret_file)
    try:
        parse_peers(peers, _PEERS)
        check_host("KCONS_METRICS_HOST", metrics_host)
        settings = NodeSettings.from_env(node_id, peers, data_dir, secret_file)
        if voters:
            settings = replace(settings, voters=tuple(int(v) for v in voters.split(",") if v))
        if rejoin_empty:
            settings = replace(settings, rejoin_empty=True)
    except (KconsError, ValueError) as exc:
        raise click_error(exc) from None

    failure: list[BaseException] = []

    async def main() -> None:
        node = RaftNode(settings)
        server = None
        if metrics_port:
            server = start_metrics(metrics_port, metrics_host, port_setting="KCONS_METRICS_PORT",
                                   host_setting="KCONS_METRICS_HOST", start=False)  # fmt: skip

            def health() -> tuple[bool, str]:
                st = node.status()
                if node.failure is not None:
                    return False, f"stopped: {type(node.failure).__name__}"
                return True, f"{st['role']} term={st['term']} leader={st['leader']} applied={st['applied']}"

            server.add_health_check("raft", health)
            server.start()
        await node.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.create_task(stop.wait())
        failed = asyncio.create_task(node.wait_failed())
        await asyncio.wait({stopped, failed}, return_when=asyncio.FIRST_COMPLETED)
        for t in (stopped, failed):
            t.cancel()
        await node.stop()
        if server is not None:
            with contextlib.suppress(Exception):
                server.stop()
        if node.failure is not None:
            failure.append(node.failure)

    try:
        asyncio.run(main())
    except KconsError as exc:  # e.g. a WAL damaged before its tail: refuse to guess
        raise click_error(exc) from None
    except OSError as exc:  # the listen address: not this host's, or in use
        where = settings.listen or settings.peers[node_id]
        setting = "KCONS_RAFT_LISTEN" if settings.listen else _PEERS
        reason = exc.strerror or type(exc).__name__
        raise click_error(ConfigError(setting, f"cannot listen on {where} ({reason})")) from None
    if failure:
        raise SystemExit(3)


@raft.command()
@click.argument("key")
@click.option("--lease", is_flag=True, help="serve from the leader lease (no quorum round)")
@click.option("--node", "at_node", type=int, default=None, help="read at this node, even a follower (ReadIndex)")
@_peers_option
@_secret_option
def get(key: str, lease: bool, at_node: int | None, peers: str, secret_file: str | None) -> None:
    """Linearizable read of KEY."""
    with _client(peers, secret_file) as c:
        item = c.get(key, lease=lease, at_node=at_node)
        _echo(None if item is None else {"value": item.value, "version": item.version, "revision": item.mod_revision})


@raft.command()
@click.argument("key")
@click.argument("value")
@_peers_option
@_secret_option
def put(key: str, value: str, peers: str, secret_file: str | None) -> None:
    """Write VALUE at KEY; prints the new version."""
    with _client(peers, secret_file) as c:
        _echo({"version": c.put(key, value)})


@raft.command()
@click.argument("key")
@_peers_option
@_secret_option
def delete(key: str, peers: str, secret_file: str | None) -> None:
    """Delete KEY."""
    with _client(peers, secret_file) as c:
        _echo({"deleted": c.delete(key)})


@raft.command()
@click.argument("key")
@click.argument("expected_version", type=int)
@click.argument("value")
@_peers_option
@_secret_option
def cas(key: str, expected_version: int, value: str, peers: str, secret_file: str | None) -> None:
    """Write VALUE at KEY only if its version is EXPECTED_VERSION (0: absent). Exit 1 if refused."""
    with _client(peers, secret_file) as c:
        ok, version = c.cas(key, expected_version, value)
        _echo({"ok": ok, "version": version})
        if not ok:
            raise SystemExit(1)


@raft.command()
@click.option("--add", "add", type=int, default=None, help="add this node id as a voter")
@click.option("--remove", "remove", type=int, default=None, help="remove this voter")
@_peers_option
@_secret_option
def members(add: int | None, remove: int | None, peers: str, secret_file: str | None) -> None:
    """Show the voters and leader; or change membership one server at a time."""
    with _client(peers, secret_file) as c:
        if add is not None and remove is not None:
            raise click.UsageError("one change at a time: --add or --remove")
        if add is not None:
            c.add_member(add)
        elif remove is not None:
            c.remove_member(remove)
        m = c.members()
        _echo({"voters": m["voters"], "leader": m["leader"]})


@raft.command()
@_peers_option
@_secret_option
def status(peers: str, secret_file: str | None) -> None:
    """Each node's own view: role, term, leader, commit and applied index."""
    with _client(peers, secret_file) as c:
        out = {}
        for node in sorted(c.peers):
            try:
                out[str(node)] = c.status(node)
            except OSError as exc:
                out[str(node)] = {"error": f"unreachable: {exc.strerror or exc}"}
        _echo(out)
