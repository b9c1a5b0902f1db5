"""Errors a user caused and can fix.

Usage::

    raise UserError("recipe run.yaml: file not found", hint="check the path")

The CLI prints ``error: <str(err)>`` and exits with status 2, without a traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """Usage: ``raise UserError(message, hint=...)``; ``str(err)`` is the complete message for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message}\nhint: {hint}" if hint else message)
