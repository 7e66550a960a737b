"""Logging for the ``kcons`` commands: INFO by default, text or one JSON object per line.

``KCONS_LOG_LEVEL`` (a level name such as ``INFO`` or ``DEBUG``, or a number) overrides the
default level and ``-v``; ``KCONS_LOG_FORMAT=json`` writes one JSON object per line with
``time``, ``level``, ``logger``, ``message``, the process' context fields (relay name, node id,
group: :func:`add_context`) and any field a library passed with ``extra=`` (``partition``...).
librdkafka's own lines reach the same handler through the ``logger`` every kcons Kafka client is
given (:data:`kcons.kafka.client.LIBRDKAFKA_LOGGER`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sys
from typing import Any

from kcons.errors import ConfigError

__all__ = ["JsonFormatter", "add_context", "configure", "explicit_level", "quiet_by_default"]

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVEL_ENV = "KCONS_LOG_LEVEL"
_FORMAT_ENV = "KCONS_LOG_FORMAT"

#: Fields every record of this process carries (set once by a long-running command).
_context: dict[str, Any] = {}
#: Attributes every LogRecord has; anything else on a record came from ``extra=`` or the context.
_STANDARD = set(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}
_explicit = False


class _ContextFilter(logging.Filter):
    """Adds the process' context fields to each record (a record's own ``extra=`` wins)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time (UTC ISO 8601), level, logger, message, context and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value if isinstance(value, str | int | float | bool | None) else str(value)
        if record.exc_info:
            out["exception"] = record.exc_text or self.formatException(record.exc_info)  # exc_text: redacted
        return json.dumps(out, ensure_ascii=False)


class _TextFormatter(logging.Formatter):
    """The usual text line, followed by the context and extra fields as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{k}={v}" for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")]
        return f"{line} [{' '.join(fields)}]" if fields else line


def _level_from_env() -> int | None:
    raw = os.environ.get(_LEVEL_ENV, "").strip()
    if not raw:
        return None
    if raw.isdigit():
        return int(raw)
    level = logging.getLevelName(raw.upper())
    if not isinstance(level, int):
        raise ConfigError(_LEVEL_ENV, f"expected DEBUG, INFO, WARNING, ERROR or CRITICAL, got {raw!r}")
    return level


def configure(verbose: int = 0) -> None:
    """Install the one stderr handler: level from KCONS_LOG_LEVEL, else DEBUG with ``-v``, else INFO.

    Raises ConfigError naming KCONS_LOG_LEVEL or KCONS_LOG_FORMAT when either is not understood.
    """
    global _explicit
    fmt = os.environ.get(_FORMAT_ENV, "text").strip().lower() or "text"
    if fmt not in ("text", "json"):
        raise ConfigError(_FORMAT_ENV, f"expected text or json, got {fmt!r}")
    env_level = _level_from_env()
    _explicit = env_level is not None or verbose > 0
    level = env_level if env_level is not None else (logging.DEBUG if verbose > 0 else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else _TextFormatter(TEXT_FORMAT))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def explicit_level() -> bool:
    """True when the operator chose the level (KCONS_LOG_LEVEL or ``-v``)."""
    return _explicit


def quiet_by_default(level: int = logging.WARNING) -> None:
    """For interactive commands (``kcons demo``): use ``level`` unless the operator chose one.

    librdkafka's own lines (transient broker connection and coordinator messages, which kcons
    retries and reports through its own errors) are then silenced as well.
    """
    if not _explicit:
        logging.getLogger().setLevel(level)
        logging.getLogger("kcons.librdkafka").setLevel(logging.CRITICAL + 1)


def add_context(**fields: Any) -> None:
    """Attach fields (relay, node, group...) to every later record of this process."""
    _context.update({k: v for k, v in fields.items() if v is not None})
