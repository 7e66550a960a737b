"""asyncio API with the same guarantees as :mod:`kcons.kafka.producer` and :mod:`kcons.processor`.

An executor bridge, not a re-implementation: each async object drives the synchronous kcons
object, so error classification, bounded retries, fencing and re-initialisation are exactly
the same. Every blocking librdkafka call (init, flush, commit, abort, send_offsets, consume,
seek) runs on one dedicated worker thread per object, so they never overlap and never block
the event loop; ``produce`` only enqueues into librdkafka and runs on the loop. Nothing is
buffered in Python: by the time ``produce`` returns, the record is in librdkafka's queue, so
the commit's flush covers it. A daemon thread polls for delivery reports while the object is
open, which resolves the awaitables of produced records.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

from kcons.envelope import Envelope
from kcons.errors import AbortableTransactionError, ConfigError, KafkaOperationError, TimeoutExceededError
from kcons.kafka import Message, TopicPartition
from kcons.kafka.producer import HeaderList, IdempotentProducer, TransactionalProducer
from kcons.processor import (
    POISON,
    DeadLettered,
    Output,
    OutputLike,
    ProcessorStats,
    TransactionalProcessor,
    poison_of,
)

log = logging.getLogger(__name__)

__all__ = ["AsyncHandler", "AsyncIdempotentProducer", "AsyncTransactionalProcessor", "AsyncTransactionalProducer"]

T = TypeVar("T")
P = ParamSpec("P")

#: An async handler: ``await handler(message)`` returns the outputs for one input record.
AsyncHandler = Callable[[Message], Awaitable[Iterable[OutputLike]]]


class _Bridge:
    """One worker thread that runs the blocking calls of one kcons object, in order."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False)


class AsyncIdempotentProducer:
    """Async face of :class:`~kcons.kafka.producer.IdempotentProducer`: at-least-once, no broker-side duplicates."""

    sync: IdempotentProducer | TransactionalProducer

    def __init__(
        self, producer: IdempotentProducer | TransactionalProducer, *, poll_interval_s: float = 0.05
    ) -> None:
        self.sync = producer
        self._bridge = _Bridge("kcons-aio-producer")
        self._poll_interval_s = poll_interval_s
        self._stop_polling = threading.Event()
        self._poll_error: BaseException | None = None
        self._poller = threading.Thread(target=self._poll_loop, name="kcons-aio-poll", daemon=True)
        self._poller.start()

    @classmethod
    async def create(cls, config: Mapping[str, Any], **kwargs: Any) -> AsyncIdempotentProducer:
        """Build the producer (validating the config) off the event loop."""
        producer = await asyncio.to_thread(IdempotentProducer, config, **kwargs)
        return cls(producer)

    def _poll_loop(self) -> None:
        """Serve delivery reports until closed; survives the swap of a re-created producer."""
        while not self._stop_polling.is_set() and not self.sync.closed:
            try:
                self.sync.poll(self._poll_interval_s)
            except KafkaOperationError as exc:  # fatal: the producer closed itself; surfaced on next use
                self._poll_error = exc
                if self.sync.closed:
                    return
            except Exception as exc:  # e.g. the old instance being closed while it is replaced
                log.debug("delivery poll failed (%s); retrying", exc)
                self._stop_polling.wait(self._poll_interval_s)

    def _check(self) -> None:
        if self._poll_error is not None and self.sync.closed:
            raise self._poll_error

    def produce_nowait(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Message]:
        """Enqueue now (raises BufferError if librdkafka's queue is full); the future resolves on delivery."""
        self._check()
        fut = self.sync.produce(topic, value, key, headers=headers, partition=partition, block=False)
        return asyncio.wrap_future(fut.as_future())

    async def enqueue(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
    ) -> asyncio.Future[Message]:
        """Enqueue, awaiting (bounded) while the local queue is full; returns the delivery future."""
        deadline = time.monotonic() + self.sync.flush_timeout_s
        while True:
            try:
                return self.produce_nowait(topic, value, key, headers=headers, partition=partition)
            except BufferError:
                if time.monotonic() >= deadline:
                    raise TimeoutExceededError(
                        f"the local produce queue stayed full for {self.sync.flush_timeout_s}s"
                    ) from None
                await asyncio.sleep(0.01)

    async def produce(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
    ) -> Message:
        """Produce one record and await its acknowledgement (DeliveryError if it failed)."""
        fut = await self.enqueue(topic, value, key, headers=headers, partition=partition)
        return await fut

    async def send(self, topic: str, envelope: Envelope) -> Message:
        """Produce an event (key = aggregate id, envelope headers) and await its acknowledgement."""
        return await self.produce(topic, envelope.payload, envelope.key, headers=list(envelope.headers()))

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued record is acknowledged or failed; TimeoutExceededError past the bound."""
        await self._bridge.call(self.sync.flush, timeout)

    async def close(self, timeout: float | None = None) -> None:
        """Flush (bounded) and close."""
        self._stop_polling.set()
        try:
            await self._bridge.call(self.sync.close, timeout)
        finally:
            self._bridge.shutdown()

    async def __aenter__(self) -> AsyncIdempotentProducer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncTransactionalProducer(AsyncIdempotentProducer):
    """Async face of :class:`~kcons.kafka.producer.TransactionalProducer`: ``async with producer.transaction():``."""

    sync: TransactionalProducer

    def __init__(self, producer: TransactionalProducer, *, poll_interval_s: float = 0.05) -> None:
        super().__init__(producer, poll_interval_s=poll_interval_s)

    @classmethod
    async def create(cls, config: Mapping[str, Any], **kwargs: Any) -> AsyncTransactionalProducer:
        """Build the producer and run init_transactions (bounded) off the event loop."""
        producer = await asyncio.to_thread(TransactionalProducer, config, **kwargs)
        return cls(producer)

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransactionalProducer]:
        """Begin; on normal exit flush everything produced inside and commit; on exception abort.

        Raises like :meth:`kcons.kafka.producer.TransactionalProducer.transaction`.
        """
        await self._bridge.call(self.sync.begin_transaction)
        try:
            yield self
        except BaseException as exc:
            reason = "exception" if isinstance(exc, Exception) else "interrupted"
            await self._bridge.call(self.sync.abort_after_error, reason)
            raise
        await self._bridge.call(self.sync.commit_transaction)

    async def enqueue_in_transaction(
        self,
        topic: str,
        value: bytes | str | None,
        key: bytes | str | None = None,
        *,
        headers: HeaderList | None = None,
        partition: int | None = None,
    ) -> None:
        """Queue a record in the open transaction without a future (a failed delivery fails the commit).

        Awaits (bounded by ``flush_timeout_s``) while the local queue is full.
        """
        deadline = time.monotonic() + self.sync.flush_timeout_s
        while True:
            try:
                self.sync.enqueue(topic, value, key, headers=headers, partition=partition, block=False)
                return
            except BufferError:
                if time.monotonic() >= deadline:
                    raise TimeoutExceededError(
                        f"the local produce queue stayed full for {self.sync.flush_timeout_s}s"
                    ) from None
                await asyncio.sleep(0.01)

    async def send_offsets(self, offsets: list[TopicPartition], group_metadata: Any, timeout: float = 30.0) -> None:
        """Add consumer offsets to the open transaction."""
        await self._bridge.call(self.sync.send_offsets, offsets, group_metadata, timeout)

    async def run_in_transaction(
        self, work: Callable[[AsyncTransactionalProducer], Awaitable[T]], *, attempts: int = 5
    ) -> T:
        """Run ``await work(producer)`` in a transaction; on an abortable error abort and re-run it all (bounded)."""
        if attempts < 1:
            raise ConfigError("attempts", f"must be >= 1, got {attempts}")
        retrying = AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_exponential(multiplier=0.05, max=1.0),
            retry=retry_if_exception_type(AbortableTransactionError),
            reraise=True,
        )

        async def once() -> T:
            async with self.transaction():
                return await work(self)

        return await retrying(once)

    async def __aenter__(self) -> AsyncTransactionalProducer:
        return self


class AsyncTransactionalProcessor:
    """Exactly-once consume-transform-produce with an async handler.

    The handler runs on the event loop for a whole batch *before* the transaction opens; then
    the outputs, the offsets and the commit go through the synchronous
    :class:`~kcons.processor.TransactionalProcessor` logic on a worker thread. A handler
    exception rewinds to the committed offsets (no transaction was open) and is raised from
    :meth:`run`. Same arguments as the synchronous processor (``input_topics=`` is a deprecated
    name of ``topics=``); no signal handler is installed: call :meth:`stop` from yours, e.g.
    ``loop.add_signal_handler(signal.SIGTERM, processor.stop)``.
    """

    def __init__(
        self,
        consumer_config: Mapping[str, Any],
        producer_config: Mapping[str, Any],
        topics: Sequence[str] | None = None,
        handler: AsyncHandler | None = None,
        **kwargs: Any,
    ) -> None:
        if handler is None:
            raise ConfigError("handler", "is required: it maps each input record to its outputs")
        self.handler = handler
        self.core = TransactionalProcessor(consumer_config, producer_config, topics, _no_sync_handler, **kwargs)
        self._bridge = _Bridge("kcons-aio-processor")

    @classmethod
    async def create(
        cls,
        consumer_config: Mapping[str, Any],
        producer_config: Mapping[str, Any],
        topics: Sequence[str] | None = None,
        handler: AsyncHandler | None = None,
        **kwargs: Any,
    ) -> AsyncTransactionalProcessor:
        """Build the processor (init_transactions is blocking) off the event loop."""
        return await asyncio.to_thread(cls, consumer_config, producer_config, topics, handler, **kwargs)

    @property
    def stats(self) -> ProcessorStats:
        """Counts of committed records, outputs, transactions and rewinds."""
        return self.core.stats

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current batch."""
        self.core.stop()

    async def run(self, *, max_records: int | None = None) -> ProcessorStats:
        """Process until :meth:`stop` or ``max_records``; then close."""
        core = self.core
        try:
            await self._bridge.call(core.subscribe)
            while not core.stopping:
                batch = await self._bridge.call(core._collect_batch)
                if batch:
                    try:
                        outputs = [await self._outputs_of(msg) for msg in batch]
                    except Exception:
                        await self._bridge.call(core._rewind, "handler_error")
                        raise
                    await self._bridge.call(core._process, batch, outputs)
                await self._bridge.call(core._update_lag)
                if max_records is not None and core.stats.records >= max_records:
                    break
        finally:
            await self._bridge.call(core.close)
            self._bridge.shutdown()
        return core.stats


    async def _outputs_of(self, msg: Message) -> list[OutputLike] | DeadLettered:
        """The async handler's outputs for ``msg``, or DeadLettered when it raises DecodeError/PoisonMessageError."""
        try:
            return list(await self.handler(msg))
        except POISON as exc:
            return poison_of(exc)


def _no_sync_handler(msg: Message) -> Iterable[Output]:
    raise AssertionError("the async processor passes precomputed outputs")  # pragma: no cover
