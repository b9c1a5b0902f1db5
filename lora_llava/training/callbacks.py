"""What a run reports while it trains: metrics.jsonl, the padding share, a stop on a non-finite loss.

Usage::

    stats = PaddingStats()
    collator = CountingCollator(pad_id, stats)                 # counts real and padding tokens
    log = MetricsLog(run.metrics, keep_until=resumed_step)     # started afresh, or continued after a resume
    callbacks = [MetricsCallback(log, stats), StopOnNonFinite()]
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_llava.data.encode import Collator


@dataclass
class PaddingStats:
    tokens: int = 0
    pad: int = 0

    @property
    def fraction(self) -> float:
        return self.pad / self.tokens if self.tokens else 0.0


class CountingCollator(Collator):
    """The Collator, counting every token and every padding token it emits into ``stats``."""

    def __init__(self, pad_id: int, stats: PaddingStats) -> None:
        super().__init__(pad_id)
        self.stats = stats

    def __call__(self, items: list[dict]) -> dict:
        batch = super().__call__(items)
        self.stats.tokens += batch["attention_mask"].numel()
        self.stats.pad += int((batch["attention_mask"] == 0).sum())
        return batch


class MetricsLog:
    """metrics.jsonl: started afresh, or (resuming) kept up to the checkpoint's step and continued."""

    def __init__(self, path: Path, keep_until: int | None = None) -> None:
        self.path = path
        kept = []
        if keep_until is not None and path.is_file():
            rows = [ln for ln in path.read_text().splitlines() if ln.strip()]
            # the rows up to the checkpoint, without an earlier end-of-run summary row
            kept = [ln for ln in rows if json.loads(ln)["step"] <= keep_until and "train_loss" not in json.loads(ln)]
        path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


class MetricsCallback(TrainerCallback):
    """Each logging step's numbers, with the padding share so far, as one line of metrics.jsonl."""

    def __init__(self, log: MetricsLog, stats: PaddingStats) -> None:
        self.log = log
        self.stats = stats
        self.mean_loss: Callable[[], float] | None = None  # the whole run's mean, for the end-of-run row

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            if "train_loss" in row and self.mean_loss is not None:
                row["train_loss"] = self.mean_loss()
            if self.stats.tokens:
                row["padding_fraction"] = round(self.stats.fraction, 4)
            self.log.write(row)


class StopOnNonFinite(TrainerCallback):
    """Stop training once a logged loss is NaN or infinite."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.log_history and not math.isfinite(state.log_history[-1].get("loss", 0.0)):
            control.should_training_stop = True
