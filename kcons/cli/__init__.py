"""The ``kcons`` command: the one place that parses a command line or installs a signal handler.

Each sub-command group lives in a module of its own (:mod:`kcons.cli.dev`, :mod:`kcons.cli.demo`,
:mod:`kcons.cli.outbox`, :mod:`kcons.cli.raft`, :mod:`kcons.cli.cache`,
:mod:`kcons.cli.audit`) and is mounted on :func:`main` here. Library classes never install
signal handlers: the commands wire SIGTERM/SIGINT to the objects they run with
:func:`kcons.cli.signals.stop_on_signals`.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from kcons import __version__
from kcons.cli import logs
from kcons.config import redact_text
from kcons.errors import ConfigError, KconsError

__all__ = ["main"]


class _SafeGroup(click.Group):
    """The ``kcons`` group: every failure of a command ends as one redacted line and a non-zero exit.

    A ConfigError prints ``Error: invalid setting NAME: problem``; any other exception prints its
    type and redacted text (the traceback goes to the debug log, itself redacted), so neither a
    library's message quoting a connection string nor a traceback reaches the terminal with a secret.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:  # exit 2, printed with the usage line; a flag's value may be a secret
            raise click.UsageError(redact_text(exc.format_message()), exc.ctx) from None
        except click.ClickException as exc:
            raise click.ClickException(redact_text(exc.format_message())) from None
        except (click.exceptions.Exit, click.exceptions.Abort):
            raise
        except ConfigError as exc:  # a bad setting is a usage error: exit 2
            raise click.UsageError(redact_text(str(exc))) from None
        except KconsError as exc:
            raise click.ClickException(redact_text(str(exc))) from None
        except Exception as exc:
            logging.getLogger(__name__).debug("command failed", exc_info=True)
            text = redact_text(str(exc)).strip().splitlines()
            raise click.ClickException(f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")) from None


@click.group(cls=_SafeGroup)
@click.option("-v", "--verbose", count=True, help="Debug logging (default INFO; $KCONS_LOG_LEVEL wins).")
@click.version_option(__version__, prog_name="kcons")
def main(verbose: int) -> None:
    """kcons: nothing lost, nothing duplicated, nothing stale, for Kafka and Redis.

    Logs go to stderr at INFO (KCONS_LOG_LEVEL to change it), as text or, with
    KCONS_LOG_FORMAT=json, one JSON object per line.
    """
    from kcons.cli.settings import remember_env_secrets

    remember_env_secrets()
    try:
        logs.configure(verbose)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


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
