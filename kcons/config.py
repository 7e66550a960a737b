"""Typed settings for Kafka, Redis and PostgreSQL, from arguments or ``KCONS_*`` variables.

Every value is validated when the settings object is built, so a bad configuration fails at
start with a :class:`~kcons.errors.ConfigError` that names the setting. Secrets (passwords in
URLs and DSNs, SASL passwords) never appear in ``repr`` or in error messages: use
:func:`redact` before logging any connection string.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit

from kcons.errors import ConfigError

__all__ = [
    "KafkaSettings",
    "PostgresSettings",
    "RedisSettings",
    "Settings",
    "check_amqp_url",
    "check_identifier",
    "check_rocketmq_endpoints",
    "env_bool",
    "env_float",
    "env_int",
    "env_str",
    "install_log_redaction",
    "redact",
    "redact_config",
    "redact_text",
    "remember_secrets",
]

N = TypeVar("N", int, float)

#: librdkafka properties that hold a secret or key material (librdkafka's CONFIGURATION.md marks
#: them sensitive), plus the JVM/Schema Registry spellings users carry over. Any property whose
#: name matches :data:`_SECRET_KEYS` is redacted as well.
KAFKA_SECRET_PROPERTIES = frozenset(
    {
        "sasl.password",
        "sasl.oauthbearer.config",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.extensions",
        "sasl.oauthbearer.assertion.private.key.pem",
        "sasl.oauthbearer.assertion.private.key.passphrase",
        "sasl.oauthbearer.assertion.jwt.template.file",
        "sasl.kerberos.keytab",
        "sasl.kerberos.kinit.cmd",
        "sasl.jaas.config",
        "ssl.key.pem",
        "ssl.key.password",
        "ssl_key",
        "ssl.keystore.password",
        "ssl.keystore.key",
        "ssl.keystore.certificate.chain",
        "ssl.truststore.password",
        "ssl.engine.callback_data",
        "basic.auth.user.info",
        "bearer.auth.token",
    }
)
_SECRET_KEYS = re.compile(
    r"(password|passphrase|secret|token|credential|jaas|user\.info|private|keytab|kinit|\.pem\Z|(\A|[._])key\Z)", re.I
)
#: libpq connection parameters and URL query parameters that hold a secret.
_SECRET_PARAMS = re.compile(r"(password|secret|token|passphrase|credential)", re.I)
_HOSTPORT = re.compile(r"\A(\[[0-9a-fA-F:]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\Z")
_HOSTNAME = re.compile(r"\A(\[[0-9A-Fa-f:.]+\]|[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*|[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}))\Z")
#: Secrets shorter than this are not searched for in free text (a 1-2 character "password" would
#: blank out ordinary words); connection strings are still redacted by structure.
MIN_SECRET_CHARS = 3

#: Every secret value a settings object of this process has seen; :func:`redact_text` removes
#: them from messages by default (the CLI applies it to every log record and error it prints).
_KNOWN_SECRETS: set[str] = set()
_KNOWN_LOCK = threading.Lock()

#: What a name may be made of, by kind. ``\Z`` (not ``$``, which also matches before a final
#: newline) so that nothing follows the last allowed character.
IdentifierKind = Literal["sql", "lowercase_sql", "key"]
_IDENTIFIER_RULES: dict[str, tuple[re.Pattern[str], str]] = {
    "sql": (re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*\Z"), "an SQL identifier [A-Za-z_][A-Za-z0-9_]*"),
    "lowercase_sql": (re.compile(r"\A[a-z_][a-z0-9_]*\Z"), "a lower-case SQL identifier [a-z_][a-z0-9_]*"),
    "key": (re.compile(r"\A[A-Za-z0-9_.:\-]+\Z"), "characters of [A-Za-z0-9_.:-]"),
}


def is_secret_key(name: str) -> bool:
    """True if a client property or connection parameter called ``name`` can hold a secret."""
    return name in KAFKA_SECRET_PROPERTIES or _SECRET_KEYS.search(name) is not None


def _split_url(value: str) -> tuple[str, str | None, str] | None:
    """``(scheme, userinfo, rest)`` of a URL, taking everything before the LAST ``@`` as userinfo.

    That over-approximates the userinfo when a password holds an unencoded ``@``, ``/``, ``?`` or
    ``#`` (where URL parsers disagree), so a redaction built on it never shows part of a password.
    """
    scheme, sep, rest = value.partition("://")
    if not sep or not scheme or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        return None
    if "@" not in rest:
        return scheme, None, rest
    userinfo, _, after = rest.rpartition("@")
    return scheme, userinfo, after


def _library_params(value: str) -> dict[str, Any]:
    """The parameters of a DSN or URL as psycopg (libpq) or redis-py parse them; empty if they cannot."""
    try:
        if value.startswith(("redis://", "rediss://", "unix://")):
            from redis.connection import parse_url

            return dict(parse_url(value))
        from psycopg.conninfo import conninfo_to_dict

        return dict(conninfo_to_dict(value))
    except Exception:  # unparsable: the structural redaction still applies
        return {}


def secrets_of(value: str) -> set[str]:
    """The secret values a connection string carries (password, and any secret-named parameter).

    Both the written and the percent-decoded form of a URL password are returned, as parsed by
    the libraries that will use the string (psycopg's ``conninfo_to_dict``, redis-py's ``parse_url``)
    and by the last-``@`` rule of :func:`redact`, so every reading of an ambiguous URL is covered.
    """
    found: set[str] = set()
    parts = _split_url(value)
    if parts is not None:
        _, userinfo, rest = parts
        if userinfo is not None and ":" in userinfo:
            password = userinfo.split(":", 1)[1]
            found.update({password, unquote(password)})
        for key, val in re.findall(r"[?&]([^=&#]*)=([^&#]*)", rest):
            if _SECRET_PARAMS.search(key):
                found.update({val, unquote(val)})
    for key, val in _library_params(value).items():
        if _SECRET_PARAMS.search(str(key)) and val:
            found.add(str(val))
    return {s for s in found if s}


def secrets_of_config(config: Mapping[str, Any]) -> set[str]:
    """The string values of a client config's secret-bearing properties."""
    return {str(v) for k, v in config.items() if is_secret_key(str(k)) and isinstance(v, str | bytes) and v}


def remember_secrets(values: Iterable[str | bytes]) -> None:
    """Add secret values that :func:`redact_text` removes from every later message (by default)."""
    with _KNOWN_LOCK:
        for v in values:
            text = v.decode(errors="replace") if isinstance(v, bytes) else v
            for form in {text, text.strip(), quote(text, safe=""), quote(text, safe=":")}:
                if len(form) >= MIN_SECRET_CHARS:
                    _KNOWN_SECRETS.add(form)


def known_secrets() -> frozenset[str]:
    """The secret values remembered so far (see :func:`remember_secrets`)."""
    with _KNOWN_LOCK:
        return frozenset(_KNOWN_SECRETS)


def redact_text(text: str, secrets: Iterable[str] | None = None) -> str:
    """Return ``text`` with every secret value replaced by ``***``: the last line of defence.

    ``secrets`` defaults to every value remembered from settings objects of this process. Longer
    secrets are replaced first, so a secret that contains another is removed whole. Use it on any
    library exception text before it is logged or raised further.
    """
    values = known_secrets() if secrets is None else {s for s in secrets if len(s) >= MIN_SECRET_CHARS}
    for secret in sorted(values, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, "***")
    return text


def install_log_redaction() -> None:
    """Make every log record of this process pass through :func:`redact_text` (idempotent).

    Installed as the log record factory, so it holds for handlers added later too: the message
    (with its arguments applied) and the formatted traceback are redacted when the record is made.
    """
    previous = logging.getLogRecordFactory()
    if getattr(previous, "kcons_redacting", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to logging's own error report
            return record
        record.msg, record.args = redact_text(message), None
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact_text(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return record

    factory.kcons_redacting = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def redact(value: str) -> str:
    """Return a connection string (URL or libpq key=value DSN) with every secret replaced by ``***``.

    Never raises: a string that cannot be read at all comes back as ``***``.
    """
    try:
        return redact_text(_redact_structure(value), secrets_of(value))
    except Exception:  # a redaction must never be the thing that fails
        return "***"


def _redact_structure(value: str) -> str:
    parts = _split_url(value)
    if parts is not None:
        scheme, userinfo, rest = parts
        if userinfo is not None and ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        rest = re.sub(
            r"([?&][^=&#]*(?:password|secret|token|passphrase|credential)[^=&#]*=)[^&#]*", r"\1***", rest, flags=re.I
        )
        return f"{scheme}://{userinfo}@{rest}" if userinfo is not None else f"{scheme}://{rest}"
    # libpq key=value form: a value is a bare word or a quoted string with backslash escapes.
    return re.sub(
        r"(?i)(\b[a-z_]*(?:password|secret|token|passphrase)[a-z_]*\s*=\s*)('(?:[^'\\]|\\.)*(?:'|\Z)|\S+)",
        r"\1***",
        value,
    )


def redact_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of a client config dict with secret values replaced by ``***``."""
    return {k: ("***" if is_secret_key(str(k)) else v) for k, v in config.items()}


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


def check_port(setting: str, value: object, *, allow_zero: bool = True) -> int:
    """Return ``value`` if it is a TCP port (0 = any free port when ``allow_zero``), else raise ConfigError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(setting, f"expected a port number, got {value!r}")
    return check_range(setting, value, 0 if allow_zero else 1, 65535)


def check_host(setting: str, value: object) -> str:
    """Return ``value`` if it is a host name or an IPv4/IPv6 address to bind or connect to, else raise ConfigError.

    Only the form is checked (no DNS lookup); binding to an address this host does not have still
    fails when the server starts, and the CLI reports that failure naming the same setting.
    """
    if not isinstance(value, str) or _HOSTNAME.match(value) is None:
        raise ConfigError(setting, f"expected a host name or IP address, got {value!r}")
    return value.strip("[]")


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
    """Raise ConfigError naming ``name`` when ``value`` is not a finite number within [minimum, maximum].

    NaN compares false with everything, so it is refused explicitly (as are infinities): a NaN TTL
    or timeout would pass every bound check and fail later, far from its cause.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(name, f"expected a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(name, f"expected a finite number, got {value}")
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


def check_rocketmq_endpoints(setting: str, value: str) -> str:
    """Check a RocketMQ 5 proxy address list: ``host:port[;host:port...]`` (the client's own separator)."""
    endpoints = [e.strip() for e in value.replace(",", ";").split(";") if e.strip()]
    if not endpoints:
        raise ConfigError(setting, "expected host:port[;host:port...], got an empty value")
    for endpoint in endpoints:
        m = _HOSTPORT.match(endpoint)
        if m is None or not 0 < int(m.group(2)) < 65536:
            raise ConfigError(setting, f"expected host:port, got {endpoint!r}")
    return ";".join(endpoints)


def _unquoted(message: str) -> str:
    """A library's parse error without the parts it quoted (they can be pieces of a password)."""
    return re.sub(r"(\"[^\"]*\"|'[^']*')", "…", message.strip().splitlines()[0] if message.strip() else "")


def check_url_userinfo(setting: str, value: str) -> None:
    """Refuse a URL whose user or password holds an unencoded ``@ / ? #`` or a malformed ``%`` escape.

    URL parsers split such a URL in different places (libpq takes the first ``@``, Python's the
    last; a ``#`` starts a fragment), so the password's pieces would end up as a host name, port or
    path, where neither redaction nor the server's error messages treat them as secret. The message
    names the setting and never quotes the value.
    """
    parts = _split_url(value)
    if parts is None or parts[1] is None:
        return
    userinfo = parts[1]
    if any(c in userinfo for c in "@/?#") or re.search(r"%(?![0-9A-Fa-f]{2})", userinfo):
        raise ConfigError(
            setting,
            "the user name or password in the URL must be percent-encoded "
            "(@ as %40, / as %2F, ? as %3F, # as %23, % as %25)",
        )


def check_amqp_url(setting: str, url: str) -> str:
    """Check an ``amqp://`` or ``amqps://`` URL (host, port) and remember its password for redaction."""
    text = url.strip()
    if not text:
        raise ConfigError(setting, "is empty")
    check_url_userinfo(setting, text)
    remember_secrets(secrets_of(text))
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(setting, f"expected amqp://user:password@host:port/vhost, got {redact(text)!r}") from None
    if parts.scheme not in {"amqp", "amqps"} or not parts.hostname:
        raise ConfigError(setting, f"expected amqp://user:password@host:port/vhost, got {redact(text)!r}")
    if port is not None:
        check_port(setting, port, allow_zero=False)
    return text


def check_postgres_dsn(setting: str, dsn: str) -> str:
    """Check a libpq URL or key=value DSN with psycopg's own parser and remember its secrets.

    psycopg's parse errors quote the offending token, which may be a password: only the kind of
    error is kept in the ConfigError.
    """
    text = dsn.strip()
    if not text:
        raise ConfigError(setting, "is empty")
    if "://" in text:
        check_url_userinfo(setting, text)
        if urlsplit(text).scheme not in {"postgresql", "postgres"}:
            raise ConfigError(setting, f"expected a postgresql:// URL, got {redact(text)!r}")
    elif "=" not in text:
        raise ConfigError(setting, "expected a postgresql:// URL or key=value DSN")
    remember_secrets(secrets_of(text))
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError:  # psycopg is optional; the structural checks above still hold
        return dsn
    try:
        params = conninfo_to_dict(text)
    except Exception as exc:  # psycopg.ProgrammingError
        raise ConfigError(setting, f"is not a valid libpq DSN ({_unquoted(str(exc))})") from None
    port = str(params.get("port", ""))
    if port and not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in port.split(",")):
        raise ConfigError(setting, f"expected a port number in 1-65535, got {port!r}")
    return dsn


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
        remember_secrets(secrets_of_config(self.properties))

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
        check_url_userinfo("KCONS_REDIS_URL", self.url)
        if urlsplit(self.url).scheme not in {"redis", "rediss", "unix"}:
            raise ConfigError(
                "KCONS_REDIS_URL", f"expected a redis://, rediss:// or unix:// URL, got {redact(self.url)!r}"
            )
        remember_secrets(secrets_of(self.url))
        try:  # the parser redis-py will use; its messages can quote the URL, so only the kind of error is kept
            from redis.connection import parse_url

            parse_url(self.url)
        except ImportError:  # pragma: no cover - redis is a dependency
            pass
        except ValueError as exc:
            raise ConfigError("KCONS_REDIS_URL", f"is not a valid Redis URL ({_unquoted(str(exc))})") from None
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
    """Where PostgreSQL is (a libpq URL or key=value DSN).

    ``pool_min``/``pool_max`` bound a pool the caller builds from these settings; kcons' own
    PostgreSQL users (the outbox relay: one connection for rows, one for its advisory lock) hold a
    fixed number of connections and do not read them.
    """

    dsn: str
    pool_min: int = 1
    pool_max: int = 10

    def __post_init__(self) -> None:
        check_postgres_dsn("KCONS_POSTGRES_DSN", self.dsn)
        check_range("pool_min", self.pool_min, 0, 1000)
        check_range("pool_max", self.pool_max, max(1, self.pool_min), 1000)

    def __repr__(self) -> str:
        return f"PostgresSettings(dsn={redact(self.dsn)!r}, pool_min={self.pool_min}, pool_max={self.pool_max})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> PostgresSettings:
        """Build from ``KCONS_POSTGRES_DSN``."""
        env = os.environ if environ is None else environ
        dsn = env_str("KCONS_POSTGRES_DSN", None, env)
        if dsn is None:
            raise ConfigError("KCONS_POSTGRES_DSN", "is not set (expected postgresql://user@host:port/db)")
        return cls(dsn=dsn)


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
