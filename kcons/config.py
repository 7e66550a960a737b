"""Typed settings for Kafka, Redis and PostgreSQL, from arguments or ``KCONS_*`` variables.

Every value is validated when the settings object is built, so a bad configuration fails at
start with a :class:`~kcons.errors.ConfigError` that names the setting. Secrets (passwords in
URLs and DSNs, SASL passwords) never appear in ``repr`` or in error messages: use
:func:`redact` before logging any connection string.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from kcons.errors import ConfigError

__all__ = [
    "KafkaSettings",
    "PostgresSettings",
    "RedisSettings",
    "Settings",
    "check_identifier",
    "env_bool",
    "env_float",
    "env_int",
    "env_str",
    "redact",
]

N = TypeVar("N", int, float)

_SECRET_KEYS = re.compile(r"(password|secret|token|credentials?|sasl\.jaas\.config|key\.password)", re.I)
_HOSTPORT = re.compile(r"\A(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\Z")

#: What a name may be made of, by kind. ``\Z`` (not ``$``, which also matches before a final
#: newline) so that nothing follows the last allowed character.
IdentifierKind = Literal["sql", "lowercase_sql", "key"]
_IDENTIFIER_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "sql": (re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z"), "an SQL identifier [A-Za-z_][A-Za-z0-9_]*"),
    "lowercase_sql": (re.compile(r"\A[a-z_][a-z0-9_]*\Z"), "a lower-case SQL identifier [a-z_][a-z0-9_]*"),
    "key": (re.compile(r"\A[A-Za-z0-9_.:\-]+\Z"), "characters of [A-Za-z0-9_.:-]"),
}


def redact(value: str) -> str:
    """Return a connection string with any password replaced by ``***``."""
    if "://" in value:
        try:
            parts = urlsplit(value)
        except ValueError:
            return "***"
        if parts.password is not None:
            host = parts.hostname or ""
            if parts.port is not None:
                host = f"{host}:{parts.port}"
            user = parts.username or ""
            netloc = f"{user}:***@{host}"
            value = urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))
        return re.sub(r"(?i)(password=)[^&\s]*", r"\1***", value)
    # libpq key=value form.
    return re.sub(r"(?i)(password\s*=\s*)('[^']*'|\S+)", r"\1***", value)


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a client config dict with secret values replaced by ``***``."""
    return {k: ("***" if _SECRET_KEYS.search(k) else v) for k, v in config.items()}


def _get(environ: Mapping[str, str], name: str) -> str | None:
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return None
    return raw.strip()


def env_str(name: str, default: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """Read a string setting; empty counts as unset."""
    value = _get(os.environ if environ is None else environ, name)
    return default if value is None else value


def env_int(
    name: str,
    default: int,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Read an integer setting within bounds; a bad value raises ConfigError naming it."""
    raw = _get(os.environ if environ is None else environ, name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {raw!r}") from None
    return check_range(name, value, minimum, maximum)


def env_float(
    name: str,
    default: float,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    environ: Mapping[str, str] | None = None,
) -> float:
    """Read a number setting within bounds; a bad value raises ConfigError naming it."""
    raw = _get(os.environ if environ is None else environ, name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(name, f"expected a number, got {raw!r}") from None
    return check_range(name, value, minimum, maximum)


def env_bool(name: str, default: bool, environ: Mapping[str, str] | None = None) -> bool:
    """Read a boolean setting (1/0, true/false, yes/no, on/off)."""
    raw = _get(os.environ if environ is None else environ, name)
    if raw is None:
        return default
    low = raw.lower()
    if low in {"1", "true", "yes", "on"}:
        return True
    if low in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(name, f"expected true or false, got {raw!r}")


def check_range(name: str, value: N, minimum: N | None, maximum: N | None) -> N:
    """Raise ConfigError naming ``name`` when ``value`` lies outside [minimum, maximum]."""
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum}, got {value}")
    return value


def check_identifier(setting: str, value: object, *, kind: IdentifierKind, max_length: int) -> str:
    """Return ``value`` if it is a name of ``kind`` of 1 to ``max_length`` characters, else raise ConfigError.

    The one rule for names that kcons puts into SQL text or storage keys: ``sql`` and
    ``lowercase_sql`` names are safe to format into a statement unquoted (``lowercase_sql`` where
    the name is also used as a string, e.g. a NOTIFY channel, and PostgreSQL's case folding must
    not change it); ``key`` names (consumer groups, key prefixes, owner tokens) are safe in a Redis
    key or a text column and cannot contain a separator or a newline.
    """
    pattern, expected = _IDENTIFIER_RULES[kind]
    if not isinstance(value, str) or not 0 < len(value) <= max_length or pattern.match(value) is None:
        raise ConfigError(setting, f"expected 1-{max_length} characters, {expected}, got {value!r}")
    return value


def validate_bootstrap(setting: str, value: str) -> str:
    """Check a comma-separated ``host:port`` list."""
    servers = [s.strip() for s in value.split(",") if s.strip()]
    if not servers:
        raise ConfigError(setting, "expected host:port[,host:port...], got an empty value")
    for server in servers:
        hostport = server.split("://", 1)[-1]
        m = _HOSTPORT.match(hostport)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(setting, f"expected host:port, got {server!r}")
    return ",".join(servers)


@dataclass(frozen=True)
class KafkaSettings:
    """Where Kafka is and the extra librdkafka properties (names unchanged) to apply."""

    bootstrap_servers: str
    properties: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        normalised = validate_bootstrap("KCONS_KAFKA_BOOTSTRAP", self.bootstrap_servers)
        object.__setattr__(self, "bootstrap_servers", normalised)
        for key in self.properties:
            if not isinstance(key, str) or not key:
                raise ConfigError("KCONS_KAFKA_CONFIG", f"property names must be strings, got {key!r}")

    def client_config(self, **overrides: Any) -> dict[str, Any]:
        """Return a confluent-kafka config dict: bootstrap, the extra properties, then overrides."""
        config: dict[str, Any] = {"bootstrap.servers": self.bootstrap_servers}
        config.update(self.properties)
        config.update(overrides)
        return config

    def __repr__(self) -> str:
        return f"KafkaSettings(bootstrap_servers={self.bootstrap_servers!r}, " + (
            f"properties={redact_config(self.properties)!r})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KafkaSettings:
        """Build from ``KCONS_KAFKA_BOOTSTRAP`` and ``KCONS_KAFKA_CONFIG`` (a JSON object)."""
        env = os.environ if environ is None else environ
        bootstrap = env_str("KCONS_KAFKA_BOOTSTRAP", None, env)
        if bootstrap is None:
            raise ConfigError("KCONS_KAFKA_BOOTSTRAP", "is not set (expected host:port[,host:port...])")
        raw = env_str("KCONS_KAFKA_CONFIG", None, env)
        props: dict[str, Any] = {}
        if raw is not None:
            try:
                loaded = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError("KCONS_KAFKA_CONFIG", f"expected a JSON object ({exc.msg})") from None
            if not isinstance(loaded, dict):
                raise ConfigError("KCONS_KAFKA_CONFIG", "expected a JSON object of librdkafka properties")
            props = loaded
        return cls(bootstrap_servers=bootstrap, properties=props)


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is, and client timeouts in seconds."""

    url: str
    socket_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        try:
            scheme = urlsplit(self.url).scheme
        except ValueError:
            raise ConfigError("KCONS_REDIS_URL", "is not a valid URL") from None
        if scheme not in {"redis", "rediss", "unix"}:
            raise ConfigError(
                "KCONS_REDIS_URL", f"expected a redis://, rediss:// or unix:// URL, got {redact(self.url)!r}"
            )
        check_range("KCONS_REDIS_TIMEOUT_S", self.socket_timeout_s, 0.001, 3600.0)

    def __repr__(self) -> str:
        return f"RedisSettings(url={redact(self.url)!r}, socket_timeout_s={self.socket_timeout_s})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RedisSettings:
        """Build from ``KCONS_REDIS_URL`` and ``KCONS_REDIS_TIMEOUT_S``."""
        env = os.environ if environ is None else environ
        url = env_str("KCONS_REDIS_URL", None, env)
        if url is None:
            raise ConfigError("KCONS_REDIS_URL", "is not set (expected redis://host:port/db)")
        timeout = env_float("KCONS_REDIS_TIMEOUT_S", 5.0, minimum=0.001, environ=env)
        return cls(url=url, socket_timeout_s=timeout)


@dataclass(frozen=True)
class PostgresSettings:
    """Where PostgreSQL is (a libpq URL or key=value DSN) and the pool size."""

    dsn: str
    pool_min: int = 1
    pool_max: int = 10

    def __post_init__(self) -> None:
        dsn = self.dsn.strip()
        if "://" in dsn:
            scheme = urlsplit(dsn).scheme
            if scheme not in {"postgresql", "postgres"}:
                raise ConfigError("KCONS_POSTGRES_DSN", f"expected a postgresql:// URL, got {redact(dsn)!r}")
        elif "=" not in dsn:
            raise ConfigError("KCONS_POSTGRES_DSN", "expected a postgresql:// URL or key=value DSN")
        check_range("KCONS_POSTGRES_POOL_MIN", self.pool_min, 0, 1000)
        check_range("KCONS_POSTGRES_POOL_MAX", self.pool_max, max(1, self.pool_min), 1000)

    def __repr__(self) -> str:
        return f"PostgresSettings(dsn={redact(self.dsn)!r}, pool_min={self.pool_min}, pool_max={self.pool_max})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PostgresSettings:
        """Build from ``KCONS_POSTGRES_DSN``, ``KCONS_POSTGRES_POOL_MIN`` and ``_MAX``."""
        env = os.environ if environ is None else environ
        dsn = env_str("KCONS_POSTGRES_DSN", None, env)
        if dsn is None:
            raise ConfigError("KCONS_POSTGRES_DSN", "is not set (expected postgresql://user@host:port/db)")
        return cls(
            dsn=dsn,
            pool_min=env_int("KCONS_POSTGRES_POOL_MIN", 1, minimum=0, environ=env),
            pool_max=env_int("KCONS_POSTGRES_POOL_MAX", 10, minimum=1, environ=env),
        )


@dataclass(frozen=True)
class Settings:
    """All connection settings; parts a process does not use may be left ``None``."""

    kafka: KafkaSettings | None = None
    redis: RedisSettings | None = None
    postgres: PostgresSettings | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Build whatever the ``KCONS_*`` variables describe; set-but-invalid values raise."""
        env = os.environ if environ is None else environ
        return cls(
            kafka=KafkaSettings.from_env(env) if env_str("KCONS_KAFKA_BOOTSTRAP", None, env) else None,
            redis=RedisSettings.from_env(env) if env_str("KCONS_REDIS_URL", None, env) else None,
            postgres=PostgresSettings.from_env(env) if env_str("KCONS_POSTGRES_DSN", None, env) else None,
        )
