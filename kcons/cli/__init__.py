"""The ``kcons`` command: the one place that parses a command line or installs a signal handler.

Each sub-command group lives in a module of its own (:mod:`kcons.cli.dev`, :mod:`kcons.cli.demo`,
:mod:`kcons.cli.outbox`, :mod:`kcons.cli.raft`, :mod:`kcons.cli.cache`,
:mod:`kcons.cli.audit`) and is mounted on :func:`main` here. Library classes never install
signal handlers: the commands wire SIGTERM/SIGINT to the objects they run with
:func:`kcons.cli.signals.stop_on_signals`.
"""

from __future__ import annotations

import logging
import sys

import click

from kcons import __version__

__all__ = ["main"]


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(__version__, prog_name="kcons")
def main(verbose: int) -> None:
    """kcons: nothing lost, nothing duplicated, nothing stale, for Kafka and Redis."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


@main.command()
def version() -> None:
    """Print the kcons version and the librdkafka it runs on."""
    from kcons.kafka.client import library_versions

    ck_version, rdkafka_version = library_versions()
    click.echo(f"kcons {__version__} (confluent-kafka {ck_version}, librdkafka {rdkafka_version})")


def _mount_subcommands() -> None:
    """Attach the command groups, each defined in its own module of this package."""
    from kcons.cli.audit import audit_cli
    from kcons.cli.cache import cache_cli
    from kcons.cli.demo import demo, demo_worker
    from kcons.cli.dev import dev
    from kcons.cli.outbox import outbox
    from kcons.cli.raft import raft

    for command in (dev, demo, demo_worker, cache_cli, outbox, raft, audit_cli):
        main.add_command(command)


_mount_subcommands()
