"""The README documents every metric kcons defines and every KCONS_* variable it reads."""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import kcons
from kcons.metrics import metric_names

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _import_all() -> None:
    for mod in pkgutil.walk_packages(kcons.__path__, "kcons."):
        if not mod.name.startswith("kcons.testing"):
            importlib.import_module(mod.name)


def test_every_metric_is_in_the_readme_metrics_table() -> None:
    _import_all()
    names = metric_names()
    assert len(names) > 20
    missing = [n for n in names if f"`{n}`" not in README]
    assert missing == []


def test_every_kcons_variable_read_by_the_code_is_in_the_configuration_reference() -> None:
    used: set[str] = set()
    for path in (ROOT / "kcons").rglob("*.py"):
        used.update(re.findall(r"KCONS_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert len(used) > 10
    used.discard("KCONS_HEADERS")  # a Python constant in kcons.envelope, not a setting
    missing = sorted(v for v in used if v not in README)
    assert missing == []
