"""Training curves of a run, drawn from its metrics.jsonl into curves.png (matplotlib, no display needed).

Usage::

    path = plot_run("runs/quickstart")            # -> runs/quickstart/curves.png
    plot_run("runs/quickstart", out="loss.png")

Panels: training loss with eval loss, eval accuracy (with ``train.eval_steps``), learning rate, and
tokens/s. A panel without data says so instead of staying blank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lora_llava.errors import UserError
from lora_llava.layout import RunDir


def read_metrics(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except ValueError:
                raise UserError(f"{path}:{n}: not a JSON line", hint="the file is damaged") from None
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and "step" in r]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Draw ``run_dir``'s metrics.jsonl into ``out`` (default: ``run_dir/curves.png``); returns the path."""
    run = RunDir(run_dir)
    if not run.metrics.is_file():
        raise UserError(
            f"{run.path} has no metrics.jsonl", hint="pass a run directory (the output_dir of lora-llava train)"
        )
    rows = read_metrics(run.metrics)
    if not any("loss" in r for r in rows):
        raise UserError(f"{run.metrics} holds no training loss yet", hint="plot after the first logging step")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        (axes[0][0], "loss", [("loss", "train loss"), ("eval_loss", "eval loss")], None),
        (axes[0][1], "eval accuracy (exact match)", [("eval_accuracy", "eval accuracy")], (0.0, 1.02)),
        (axes[1][0], "learning rate", [("learning_rate", "learning rate")], None),
        (
            axes[1][1],
            "tokens/s",
            [("tokens_per_s", "real tokens/s"), ("supervised_tokens_per_s", "supervised/s")],
            None,
        ),
    ]
    for ax, title, keys, ylim in panels:
        drawn = False
        for key, label in keys:
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, marker="o" if len(x) < 30 else None, markersize=3, label=label)
                drawn = True
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        if ylim:
            ax.set_ylim(*ylim)
        if drawn:
            ax.legend(loc="best", fontsize=8)
        else:
            hint = "no eval (set train.eval_steps)" if "eval" in title else "no data"
            ax.text(0.5, 0.5, hint, ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(str(run.path))
    target = Path(out) if out is not None else run.curves
    tmp = target.with_name(f".{target.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(target)
    except OSError as e:
        raise UserError(f"cannot write {target}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return target
