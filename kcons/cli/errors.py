"""How a command reports failures: exit 2 for a bad command line or setting, 1 for an operational failure.

Both print one ``Error: ...`` line and no traceback.
"""

from __future__ import annotations

import click

from kcons.errors import ConfigError

__all__ = ["click_error"]


def click_error(exc: Exception) -> click.ClickException:
    """The click exception for ``exc``: a UsageError (exit 2) for a ConfigError or a ValueError
    about the command line, a ClickException (exit 1) for everything else."""
    if isinstance(exc, ConfigError | ValueError):
        return click.UsageError(str(exc))
    return click.ClickException(str(exc))
