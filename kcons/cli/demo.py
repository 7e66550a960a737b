"""``kcons demo``: run the shop of :mod:`kcons.demo` end to end, and its worker processes."""

from __future__ import annotations

import json
import sys

import click

from kcons.cli import logs
from kcons.cli.errors import click_error
from kcons.cli.signals import Interrupted, interrupt_on_signals, stop_on_signals
from kcons.config import redact_text
from kcons.demo import WORKER_KINDS, WORKER_ROLES, DemoOptions, open_worker, run_demo
from kcons.errors import KconsError

__all__ = ["demo", "demo_worker"]


@click.command()
@click.option("--postgres", is_flag=True, help="Use PostgreSQL for the shop and its outbox instead of SQLite.")
@click.option("--orders", type=click.IntRange(min=1), default=3000, show_default=True, help="Orders to place.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=250.0, show_default=True,
              help="Orders per second.")  # fmt: skip
@click.option("--products", type=click.IntRange(min=1), default=20, show_default=True, help="Products (cache keys).")
@click.option("--readers", type=click.IntRange(min=0), default=2, show_default=True, help="Cache reader threads.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=300.0,
              show_default=True, help="Give up after this many seconds.")  # fmt: skip
def demo(postgres: bool, orders: int, rate: float, products: int, readers: int, timeout_s: float) -> None:
    """Run a small shop end to end with faults, and check nothing is lost, duplicated or stale.

    SIGTERM or SIGINT stops it cleanly: its worker processes, the services it started and its
    temporary directory are removed, one ``stopped: ...`` line says what, and it exits 128+signal.
    """
    if orders / rate >= timeout_s:
        raise click.UsageError(f"placing {orders} orders at {rate:g}/s takes {orders / rate:g}s, "
                               f"not less than --timeout {timeout_s:g}s")  # fmt: skip
    logs.quiet_by_default()  # progress lines are the output; KCONS_LOG_LEVEL or -v bring the logs back
    try:
        opts = DemoOptions(orders=orders, rate=rate, products=products, readers=readers, postgres=postgres,
                           timeout_s=timeout_s)  # fmt: skip
        with interrupt_on_signals():
            report = run_demo(opts, progress=lambda line: click.echo(redact_text(line), err=True))
    except KconsError as exc:
        raise click_error(exc) from None
    except Interrupted as exc:  # run_demo stopped everything and said so
        sys.exit(exc.exit_code)
    click.echo(
        f"orders committed {report['orders_committed']} (rolled back {report['orders_rolled_back']}), "
        f"published {report['published']}, duplicates dropped {report['duplicates_dropped']}, "
        f"lost {report['lost']}, duplicate effects {report['duplicate_effects']}, stale reads {report['stale']} "
        f"of {report['reads']}, {report['throughput_orders_per_s']} orders/s: {'OK' if report['ok'] else 'FAILED'}",
        err=True,
    )
    click.echo(json.dumps(report))
    if not report["ok"]:
        sys.exit(1)


@click.command("demo-worker", hidden=True)
@click.argument("role", type=click.Choice(WORKER_ROLES))
@click.option("--kind", type=click.Choice(WORKER_KINDS), required=True, help="The shop's database.")
@click.option("--db", "db_location", required=True, help="SQLite file or PostgreSQL DSN.")
@click.option("--bootstrap", required=True, help="Kafka bootstrap servers.")
@click.option("--run", "run_id", required=True, help="The demo run this worker belongs to.")
def demo_worker(role: str, kind: str, db_location: str, bootstrap: str, run_id: str) -> None:
    """A child process of ``kcons demo`` (relay or inventory consumer), stopped by SIGTERM/SIGINT."""
    logs.add_context(worker=role, run=run_id)
    worker = open_worker(role, kind, db_location, bootstrap, run_id)
    with stop_on_signals(worker):
        worker.run()
