"""Stopping a run cleanly on SIGTERM or Ctrl-C (spot preemption, a cluster's time limit, a user).

Usage::

    with StopSignals() as stops:                      # installs SIGTERM/SIGINT handlers (main thread only)
        trainer.add_callback(StopCallback(stops))      # the step in flight finishes, a checkpoint is written
        trainer.train()
    if stops.requested: ...                            # "SIGTERM": raise TrainingStopped(...)

The first signal lets the optimizer step in flight finish, then the Trainer writes a checkpoint (whole
or absent, like every checkpoint) and stops; the command exits with status ``EXIT_STOPPED`` (75) and the
command that resumes. A second signal aborts at once (KeyboardInterrupt, status 130): staging folders
are never published, so nothing already saved is damaged.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

from transformers import TrainerCallback

from lora_llava.distributed import any_rank
from lora_llava.errors import EXIT_STOPPED, TrainingStopped

__all__ = ["EXIT_STOPPED", "StopCallback", "StopSignals", "TrainingStopped"]


class StopSignals:
    """SIGTERM and SIGINT handlers for the duration of a ``with`` block: the first requests a stop, the
    second aborts. Outside the main thread (where Python cannot install handlers) it does nothing. With several
    processes only the first one says so (``announce``): a Ctrl-C or a scheduler's SIGTERM reaches all of them."""

    def __init__(self, announce: bool = True) -> None:
        self.requested: str | None = None
        self.announce = announce
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.requested = name
        if not self.announce:
            return
        again = "Ctrl-C" if signum == signal.SIGINT else name
        # os.write: safe inside a signal handler, unlike print
        os.write(
            2, f"\n{name}: finishing this step, then saving a checkpoint ({again} again aborts at once)\n".encode()
        )


class StopCallback(TrainerCallback):
    """At the end of the optimizer step during which a stop was requested: save, then stop."""

    def __init__(self, stops: StopSignals) -> None:
        self.stops = stops

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        stop = self.stops.requested is not None
        if args.world_size > 1:  # one process stopped (a preempted machine): all stop at the same step
            stop = any_rank(stop)
            if stop and self.stops.requested is None:  # another process got the signal (a preempted machine)
                self.stops.requested = "SIGTERM"
                if self.stops.announce:
                    os.write(2, b"\nanother process was stopped (SIGTERM): saving a checkpoint after this step\n")
        if stop:
            control.should_save = True
            control.should_training_stop = True
