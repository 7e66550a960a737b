"""What every ``kcons`` command shares about settings: secrets kept out of output, settings checked up front.

The command group remembers the secret values of the ``KCONS_*`` connection settings before any
sub-command runs, so that every log record, error message and traceback it prints is passed
through :func:`kcons.config.redact_text`; settings objects built later add theirs. The metrics
endpoint is started through :func:`start_metrics`, which turns a bind failure into a ConfigError
naming the setting instead of a traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from kcons.config import (
    check_host,
    check_port,
    install_log_redaction,
    remember_secrets,
    secrets_of,
    secrets_of_config,
)
from kcons.errors import ConfigError
from kcons.metrics import HealthCheck, MetricsServer

__all__ = ["PortSetting", "remember_env_secrets", "remember_file_secret", "start_metrics"]

#: Settings whose whole value, or the secrets inside it, must never be printed.
_CONNECTION_SETTINGS = ("KCONS_POSTGRES_DSN", "KCONS_REDIS_URL", "KCONS_AMQP_URL")


class PortSetting(click.ParamType[int]):
    """A click type for a TCP port whose bad value is a ConfigError naming the ``KCONS_*`` setting."""

    name = "port"

    def __init__(self, setting: str) -> None:
        self.setting = setting

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        """Return the port as an int within 0-65535, else raise ConfigError naming the flag or the variable."""
        setting = self.setting
        if ctx is not None and param is not None and param.name is not None and param.opts:
            source = ctx.get_parameter_source(param.name)
            if source is not click.core.ParameterSource.ENVIRONMENT:
                setting = param.opts[0]
        if isinstance(value, int) and not isinstance(value, bool):
            return check_port(setting, value)
        try:
            number = int(str(value).strip())
        except ValueError:
            raise ConfigError(setting, f"expected a port number, got {value!r}") from None
        return check_port(setting, number)


def remember_env_secrets(environ: Mapping[str, str] | None = None) -> None:
    """Remember the secrets of the ``KCONS_*`` settings (even malformed ones) and redact all log output."""
    env = os.environ if environ is None else environ
    install_log_redaction()
    found: set[str] = set()
    for name in _CONNECTION_SETTINGS:
        value = env.get(name)
        if value:
            found |= secrets_of(value)
    raw_config = env.get("KCONS_KAFKA_CONFIG")
    if raw_config:
        try:
            config = json.loads(raw_config)
        except ValueError:
            config = None
        if isinstance(config, dict):
            found |= secrets_of_config(config)
    secret = env.get("KCONS_RAFT_SECRET")
    if secret:
        found.add(secret.strip())
    remember_secrets(found)


def remember_file_secret(path: str | None) -> None:
    """Remember the content of a secret file (e.g. ``--secret-file``) so that it is never printed."""
    if not path:
        return
    with contextlib.suppress(OSError):  # the command reports the unreadable file itself
        remember_secrets([Path(path).read_bytes().strip()])


def start_metrics(
    port: int,
    host: str,
    *,
    port_setting: str,
    host_setting: str,
    health_checks: Iterable[tuple[str, HealthCheck]] = (),
    start: bool = True,
) -> MetricsServer:
    """Bind (and unless ``start`` is false, serve) /metrics and /healthz.

    A bad port, or an address this host cannot bind, raises ConfigError naming the setting.
    """
    check_port(port_setting, port)
    check_host(host_setting, host)
    try:
        server = MetricsServer(port, host, health_checks=health_checks)
    except OverflowError:
        raise ConfigError(port_setting, f"expected a port in 0-65535, got {port}") from None
    except OSError as exc:
        setting = port_setting if getattr(exc, "errno", None) in {98, 13} else host_setting
        raise ConfigError(setting, f"cannot listen on {host}:{port} ({exc.strerror or type(exc).__name__})") from None
    logging.getLogger(__name__).debug("metrics endpoint bound on %s:%d", host, server.port)
    return server.start() if start else server
