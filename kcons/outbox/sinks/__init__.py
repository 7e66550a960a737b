"""Outbox sinks besides Kafka (:mod:`kcons.outbox.publisher`): each implements :class:`kcons.outbox.sink.OutboxSink`.

Each sink module imports its broker's client, an optional dependency (``kcons[rabbitmq]``), so
this package imports none of them.
"""
