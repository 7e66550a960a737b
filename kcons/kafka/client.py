"""Kafka client configuration and lifecycle: the checks every kcons client config passes, and the bounded close.

:func:`check_producer_config` and :func:`check_consumer_config` return a copy of the user's
confluent-kafka config (librdkafka property names, unchanged) made safe for the guarantee, or
raise :class:`~kcons.errors.ConfigError` naming the property. :data:`SHARED_CLIENT_KEYS` is the
one list of connection and security properties a derived client (the dead-letter producer of a
consumer) copies from the client it serves. :func:`close_bounded` is the one way kcons closes a
client: an unreachable cluster must never make ``close``/``stop`` hang.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kcons.errors import ConfigError

__all__ = [
    "LIBRDKAFKA_LOGGER",
    "SHARED_CLIENT_KEYS",
    "check_consumer_config",
    "check_producer_config",
    "close_bounded",
    "library_versions",
    "shared_client_config",
    "with_logger",
]

log = logging.getLogger(__name__)

#: Prefixes of the properties a derived client shares with its source client: where the cluster
#: is and how to reach and authenticate to it, plus the callbacks and logging that go with that.
SHARED_CLIENT_KEYS: tuple[str, ...] = (
    "bootstrap.servers", "metadata.broker.list", "security.", "ssl.", "sasl.", "socket.", "broker.",
    "metadata.", "client.dns", "client.id", "client.rack", "api.version", "enable.ssl.certificate.verification",
    "oauthbearer", "error_cb", "logger", "log_level", "resolve_cb", "connections.max.idle.ms", "reconnect.backoff",
)  # fmt: skip

#: Where librdkafka's own log lines go (``%4|...|GETPID|...``): through Python logging, like every
#: other kcons line, instead of raw to stderr.
LIBRDKAFKA_LOGGER = logging.getLogger("kcons.librdkafka")


def with_logger(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` sending librdkafka's log lines to :data:`LIBRDKAFKA_LOGGER` (unless it has a ``logger``)."""
    cfg = dict(config)
    cfg.setdefault("logger", LIBRDKAFKA_LOGGER)
    return cfg


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def as_bool(setting: str, value: Any) -> bool:
    """A librdkafka boolean property (``True``, ``"true"``, ``"1"``...) as a bool, or ConfigError naming it."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(setting, f"expected true or false, got {value!r}")


def _require_bootstrap(cfg: Mapping[str, Any]) -> None:
    if "bootstrap.servers" not in cfg and "metadata.broker.list" not in cfg:
        raise ConfigError("bootstrap.servers", "is not set")


def check_producer_config(config: Mapping[str, Any], *, transactional: bool) -> dict[str, Any]:
    """Return a copy of ``config`` made safe for the guarantee, or raise ConfigError naming the property.

    Rejects ``enable.idempotence=false``, ``acks``/``request.required.acks`` other than ``all``/``-1``,
    more than 5 in-flight requests per connection, zero retries, and (when ``transactional``) a
    missing ``transactional.id``; a ``transactional.id`` on a non-transactional producer is rejected
    too, since librdkafka would then refuse every produce outside a transaction. Sets
    ``enable.idempotence=true`` and ``acks=all`` explicitly, and the default ``logger``.
    """
    cfg = with_logger(config)
    _require_bootstrap(cfg)
    if "enable.idempotence" in cfg and not as_bool("enable.idempotence", cfg["enable.idempotence"]):
        raise ConfigError("enable.idempotence", "must be true: without it retries can write duplicates")
    for name in ("acks", "request.required.acks"):
        if name in cfg and str(cfg[name]).strip().lower() not in {"all", "-1"}:
            raise ConfigError(name, f"must be all (or -1) so no acknowledged write is lost, got {cfg[name]!r}")
    inflight = cfg.get("max.in.flight.requests.per.connection", cfg.get("max.in.flight"))
    if inflight is not None and int(inflight) > 5:
        raise ConfigError("max.in.flight.requests.per.connection", f"must be <= 5 with idempotence, got {inflight}")
    for name in ("retries", "message.send.max.retries"):
        if name in cfg and int(cfg[name]) == 0:
            raise ConfigError(name, "must be > 0: the idempotent producer relies on retries")
    tid = cfg.get("transactional.id")
    if transactional and not tid:
        raise ConfigError("transactional.id", "is required for a transactional producer (stable per worker)")
    if not transactional and tid:
        raise ConfigError("transactional.id", "is set: use TransactionalProducer (or kcons.wrap) for it")
    cfg["enable.idempotence"] = True
    cfg.pop("request.required.acks", None)
    cfg["acks"] = "all"
    return cfg


def check_consumer_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the consumer config made safe for exactly-once, or raise ConfigError naming the property.

    ``group.id`` is required; ``enable.auto.commit=true`` and ``isolation.level=read_uncommitted``
    are rejected (offsets are committed inside the transaction, and aborted input must stay
    invisible); both are then set explicitly, with ``enable.auto.offset.store=false`` and the
    default ``logger``.
    """
    cfg = with_logger(config)
    if not cfg.get("group.id"):
        raise ConfigError("group.id", "is required: the processor commits offsets for its consumer group")
    _require_bootstrap(cfg)
    if "enable.auto.commit" in cfg and as_bool("enable.auto.commit", cfg["enable.auto.commit"]):
        raise ConfigError("enable.auto.commit", "must be false: offsets are committed inside each transaction")
    iso = cfg.get("isolation.level")
    if iso is not None and str(iso).strip().lower() != "read_committed":
        raise ConfigError("isolation.level", f"must be read_committed, got {iso!r}")
    cfg["enable.auto.commit"] = False
    cfg["enable.auto.offset.store"] = False
    cfg["isolation.level"] = "read_committed"
    return cfg


def shared_client_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The properties of ``config`` that a derived client must share (:data:`SHARED_CLIENT_KEYS`)."""
    return {k: v for k, v in config.items() if k.startswith(SHARED_CLIENT_KEYS)}


def close_bounded(close: Callable[[], object], timeout_s: float, what: str) -> bool:
    """Run ``close()`` in a daemon thread and wait at most ``timeout_s``; True when it finished in time.

    The one bounded close of kcons: a client whose cluster is unreachable can block in its
    close for a long time, and ``stop``/``close`` of a kcons part must not. Errors from
    ``close()`` are logged (closing is best effort), never raised; a close that overruns is
    left to finish in the background, with a warning naming ``what``.
    """
    done = threading.Event()

    def run() -> None:
        try:
            close()
        except Exception as exc:  # best effort: a broken client may refuse to close cleanly
            log.debug("closing the %s failed: %s", what, type(exc).__name__)
        finally:
            done.set()

    threading.Thread(target=run, name=f"kcons-close-{what.replace(' ', '-')}", daemon=True).start()
    if done.wait(timeout_s):
        return True
    log.warning("closing the %s took longer than %.1fs; left to finish in the background", what, timeout_s)
    return False


def library_versions() -> tuple[str, str]:
    """(confluent-kafka's version, librdkafka's version), as ``kcons version`` prints them."""
    import confluent_kafka

    ck: Any = confluent_kafka.version()
    return (ck if isinstance(ck, str) else str(ck[0])), str(confluent_kafka.libversion()[0])
