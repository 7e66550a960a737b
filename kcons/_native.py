"""The package's optional C extensions, each loaded once: the module, or None.

pip builds them when a C compiler is present (see pyproject.toml). ``KCONS_PURE_PYTHON=1`` (a boolean)
in the environment, a missing build, or a stale one (its ``API`` constant is not the one the Python
side is written for) all give None, and the Python implementation, which stays the reference,
is used: :mod:`kcons.kafka.futures` for ``kcons.kafka._speedups`` (the delivery future, tracker
and produce path), :mod:`kcons.ids` for ``kcons._idgen`` (the event-id generator).
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from kcons.config import env_bool

log = logging.getLogger(__name__)

__all__ = ["load"]


def load(name: str, api: int) -> Any:
    """The extension module ``name`` if it is built, current (``API == api``) and allowed; else None."""
    if env_bool("KCONS_PURE_PYTHON", False):  # a value that is not a boolean raises ConfigError naming it
        return None
    try:
        module = importlib.import_module(name)
    except ImportError:
        return None
    except Exception:  # a build whose initialisation fails: the Python code still works
        log.warning("%s failed to load; using the Python code", name, exc_info=True)
        return None
    if getattr(module, "API", None) != api:
        # An editable install keeps an extension built from an older source until it is rebuilt.
        log.warning("%s is a stale build; using the Python code (rebuild: pip install -e .)", name)
        return None
    return module
