"""One exactly-once processor worker, run as its own OS process so that it can be SIGKILLed.

Copies each input record (value = the input id) to the output topic with the same key, adding
``eos-input`` = topic/partition/offset of the input as a header, and prints one line
``committed <records> <transactions>`` to stdout after every committed transaction so a harness
can time its kills. It stops on SIGTERM after the current batch (through kcons.cli.signals: the
processor itself installs no signal handler).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from confluent_kafka import Message

from kcons.cli.signals import stop_on_signals
from kcons.processor import Output, ProcessorStats, TransactionalProcessor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--transactional-id", required=True)
    parser.add_argument("--batch-size", "--batch-max", dest="batch_size", type=int, default=100)
    parser.add_argument("--batch-timeout-s", type=float, default=0.1)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="time the handler spends on each record")
    parser.add_argument("--consumer-config", default="{}", help="extra librdkafka consumer properties (JSON)")
    parser.add_argument("--producer-config", default="{}", help="extra librdkafka producer properties (JSON)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(process)d %(name)s %(message)s")

    delay = args.delay_ms / 1000.0

    def handler(msg: Message) -> list[Output]:
        if delay:
            time.sleep(delay)
        origin = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
        return [Output(args.output, msg.value(), msg.key(), headers=[("eos-input", origin)])]

    def on_commit(stats: ProcessorStats) -> None:
        print(f"committed {stats.records} {stats.transactions}", flush=True)

    consumer_config: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap,
        "group.id": args.group,
        "auto.offset.reset": "earliest",
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1500,
        **json.loads(args.consumer_config),
    }
    producer_config: dict[str, Any] = {
        "bootstrap.servers": args.bootstrap,
        "linger.ms": 5,
        "transaction.timeout.ms": 20000,
        **json.loads(args.producer_config),
    }
    processor = TransactionalProcessor(
        consumer_config,
        producer_config,
        [args.input],
        handler,
        batch_size=args.batch_size,
        batch_timeout_s=args.batch_timeout_s,
        transactional_id=args.transactional_id,
        on_commit=on_commit,
    )
    print("ready", flush=True)
    with stop_on_signals(processor):
        stats = processor.run()
    print(f"stopped {stats.records} {stats.transactions} {stats.rewinds}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
