"""Faults injected on purpose, so the tests can check what a run does when things go wrong.

Usage::

    LORA_LLAVA_FAULTS="nan_loss@3,nan_loss@4" lora-llava train quickstart     # the loss of steps 3 and 4 is NaN
    LORA_LLAVA_FAULTS="slow_save@4" lora-llava train ...    # the save of step 4 pauses 60 s between two files
    LORA_LLAVA_FAULTS="slow_step@3" lora-llava train ...    # from step 3 on, each step takes 0.25 s longer

``nan_loss@N`` makes every micro-batch loss of optimizer step N a NaN (its gradients follow);
``slow_save@N`` prints ``fault: saving step N`` to stderr after the first file of checkpoint-N is
written, then sleeps, so a test can kill the process in the middle of a save; ``slow_step@N`` sleeps
0.25 s in the middle of every micro-batch (between forward and backward) from step N on, so a signal
sent by a test lands inside a step. Unset (the normal case), the trainer gets no fault plan and none of this runs.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

ENV = "LORA_LLAVA_FAULTS"
KINDS = ("nan_loss", "slow_save", "slow_step")


def _faults() -> set[tuple[str, int]]:
    out = set()
    for item in filter(None, (x.strip() for x in os.environ.get(ENV, "").split(","))):
        kind, _, step = item.partition("@")
        if kind not in KINDS or not step.isdigit():
            raise ValueError(f"{ENV}: {item!r} is not one of {', '.join(k + '@STEP' for k in KINDS)}")
        out.add((kind, int(step)))
    return out


class FaultPlan:
    """The faults of ``LORA_LLAVA_FAULTS``, handed to the trainer only when the variable is set (``from_env``)."""

    def __init__(self, faults: set[tuple[str, int]]) -> None:
        self.faults = faults

    @classmethod
    def from_env(cls) -> FaultPlan | None:
        return cls(_faults()) if os.environ.get(ENV) else None

    def on_loss(self, step: int, loss: Any) -> Any:
        """A micro-batch loss of optimizer step ``step`` (1-based): slowed (``slow_step``), or NaN (``nan_loss``)."""
        if any(kind == "slow_step" and step >= n for kind, n in self.faults):
            time.sleep(0.25)
        return loss * float("nan") if ("nan_loss", step) in self.faults else loss

    def in_save(self, step: int) -> None:
        """Between a checkpoint's weights and its other files (``slow_save``): announce, then wait to be killed."""
        if ("slow_save", step) in self.faults:
            print(f"fault: saving step {step}", file=sys.stderr, flush=True)
            time.sleep(60)
