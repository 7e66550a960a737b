"""Command logging: INFO by default, KCONS_LOG_LEVEL/KCONS_LOG_FORMAT honoured, JSON lines carry context fields."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from click.testing import CliRunner

from kcons.cli import logs, main
from kcons.errors import ConfigError


@pytest.fixture(autouse=True)
def _restore_root_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.delenv("KCONS_LOG_LEVEL", raising=False)
    monkeypatch.delenv("KCONS_LOG_FORMAT", raising=False)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs._context.clear()


def test_commands_log_at_info_unless_the_operator_says_otherwise(monkeypatch: pytest.MonkeyPatch) -> None:
    logs.configure(0)
    assert logging.getLogger().level == logging.INFO
    assert not logs.explicit_level()
    logs.configure(1)
    assert logging.getLogger().level == logging.DEBUG
    monkeypatch.setenv("KCONS_LOG_LEVEL", "warning")
    logs.configure(1)
    assert logging.getLogger().level == logging.WARNING
    assert logs.explicit_level()


def test_interactive_commands_are_quiet_only_when_no_level_was_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    logs.configure(0)
    logs.quiet_by_default()
    assert logging.getLogger().level == logging.WARNING
    assert not logging.getLogger("kcons.librdkafka").isEnabledFor(logging.CRITICAL)
    logging.getLogger("kcons.librdkafka").setLevel(logging.NOTSET)
    monkeypatch.setenv("KCONS_LOG_LEVEL", "INFO")
    logs.configure(0)
    logs.quiet_by_default()
    assert logging.getLogger().level == logging.INFO


@pytest.mark.parametrize(("name", "value"), [("KCONS_LOG_LEVEL", "loud"), ("KCONS_LOG_FORMAT", "xml")])
def test_unknown_log_settings_are_config_errors_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        logs.configure(0)
    result = CliRunner().invoke(main, ["version"], env={name: value})
    assert result.exit_code == 2 and name in result.output


def test_json_lines_carry_time_level_logger_message_context_and_extra_fields() -> None:
    logs.add_context(relay="orders", node=None)
    record = logging.LogRecord("kcons.outbox.relay", logging.INFO, __file__, 1, "leads %s", ("lease",), None)
    record.partition = 3
    logs._ContextFilter().filter(record)
    line = json.loads(logs.JsonFormatter().format(record))
    assert line["level"] == "INFO" and line["logger"] == "kcons.outbox.relay" and line["message"] == "leads lease"
    assert line["relay"] == "orders" and line["partition"] == 3 and "node" not in line
    assert line["time"].endswith("+00:00")
