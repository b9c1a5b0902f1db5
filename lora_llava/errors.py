"""Errors a user caused and can fix.

Usage::

    raise UserError("recipe run.yaml: file not found", hint="check the path")

The CLI prints ``error: <str(err)>`` and exits with status 2, without a traceback. A run stopped by
SIGTERM/SIGINT raises ``TrainingStopped`` (exit status ``EXIT_STOPPED``, 75).
"""

from __future__ import annotations

from pathlib import Path

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped by a signal with a checkpoint saved; resume to continue


class UserError(Exception):
    """Usage: ``raise UserError(message, hint=...)``; ``str(err)`` is the complete message for the user."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message}\nhint: {hint}" if hint else message)


class TrainingStopped(Exception):
    """The run stopped on a signal after saving ``checkpoint`` (None: nothing was saved)."""

    exit_code = EXIT_STOPPED

    def __init__(self, signal_name: str, step: int, max_steps: int, run_dir: Path, checkpoint: Path | None) -> None:
        self.signal_name = signal_name
        self.step = step
        self.max_steps = max_steps
        self.run_dir = run_dir
        self.checkpoint = checkpoint
        where = f"checkpoint saved: {checkpoint}" if checkpoint is not None else "nothing was saved"
        super().__init__(f"stopped by {signal_name} at step {step} of {max_steps}; {where}")
