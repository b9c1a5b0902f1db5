"""What a run reports while it trains: metrics.jsonl, and a progress bar people read.

Usage::

    log = MetricsLog(run.metrics, keep_until=resumed_step)     # started afresh, or continued after a resume
    callbacks = [MetricsCallback(log), ProgressBar(print)]

Each logging row holds the Trainer's numbers (loss, learning rate, grad norm) and lora_llava's:
``tokens_per_s`` (real tokens, padding excluded), ``supervised_tokens_per_s`` (tokens that carry loss),
``padding_fraction`` (so far), ``skipped_steps`` (NaN/inf steps skipped so far) and, on a GPU,
``gpu_memory_gib`` (the peak allocated on this process's GPU so far, as ``torch.cuda.max_memory_allocated``); eval rows hold
``eval_loss`` and ``eval_accuracy``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from lora_llava.annotations import Log


@dataclass
class TokenCounts:
    """Tokens the run has trained on so far, those before a resume included (saved in each checkpoint): every
    position, the padding, the supervised."""

    tokens: int = 0
    pad: int = 0
    supervised: int = 0

    @property
    def fraction(self) -> float:
        return self.pad / self.tokens if self.tokens else 0.0

    @property
    def real(self) -> int:
        return self.tokens - self.pad


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
    """Each logged row's numbers as one line of metrics.jsonl."""

    def __init__(self, log: MetricsLog) -> None:
        self.log = log

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs:
            row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
            self.log.write(row)


def _compact(n: float) -> str:
    return f"{n / 1000:.1f}k" if n >= 10_000 else f"{n:.0f}"


def _now() -> float:
    return time.monotonic()


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class ProgressBar(TrainerCallback):
    """One bar for the run (steps, ETA; loss, learning rate and tokens/s as they are logged) and one short
    line per logging step to ``log``, instead of the Trainer's dictionaries."""

    def __init__(self, log: Log = print) -> None:
        self.log = log
        self.bar: Any = None
        self.started = (_now(), 0)  # when and at which step this process began training

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        from tqdm.auto import tqdm

        self.started = (_now(), state.global_step)
        self.bar = tqdm(
            total=state.max_steps,
            initial=state.global_step,
            desc="train",
            unit="step",
            dynamic_ncols=True,
            disable=None,
        )  # no bar when not a terminal (a log file gets the step lines only)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if not logs or self.bar is None or "learning_rate" not in logs:  # a training row (not eval, not the end)
            return
        post = {"loss": f"{logs['loss']:.4f}" if "loss" in logs else "-"}
        if "learning_rate" in logs:
            post["lr"] = f"{logs['learning_rate']:.2e}"
        if "tokens_per_s" in logs:
            post["tok/s"] = _compact(logs["tokens_per_s"])
            post["sup/s"] = _compact(logs.get("supervised_tokens_per_s", 0.0))
        if "gpu_memory_gib" in logs:
            post["mem"] = f"{logs['gpu_memory_gib']:.1f}G"
        self.bar.set_postfix(post, refresh=False)
        line = f"step {state.global_step}/{state.max_steps}  " + "  ".join(f"{k} {v}" for k, v in post.items())
        if logs.get("grad_norm") is not None:
            line += f"  grad {logs['grad_norm']:.3g}"
        then, first = self.started
        if state.global_step > first:  # from this process's own pace (a resumed run's earlier steps do not count)
            left = (_now() - then) / (state.global_step - first) * (state.max_steps - state.global_step)
            line += f"  eta {_duration(left)}"
        self.say(line)

    def say(self, line: str) -> None:
        """A line above the bar while it runs (printing), else to the log the run was given."""
        if self.bar is not None and self.log is print:
            self.bar.write(line)
        else:
            self.log(line)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
