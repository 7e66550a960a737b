"""The Kafka of a fault run: one broker from the stack, or a 3-broker cluster of the run's own."""

from __future__ import annotations

import contextlib

from kcons.testing import start_stack
from kcons.testing.local import KafkaCluster


def kafka_for_run(services: contextlib.ExitStack, brokers: int) -> tuple[str, KafkaCluster | None]:
    """Enter the run's Kafka into ``services``: (bootstrap, the cluster when the run has its own).

    Only a cluster of the run's own may have brokers killed; the single broker may be shared
    (``KCONS_KAFKA_BOOTSTRAP``).
    """
    if brokers == 3:
        cluster = services.enter_context(KafkaCluster(3))
        return cluster.bootstrap, cluster
    return services.enter_context(start_stack(redis=False, postgres=False)).kafka_bootstrap, None
