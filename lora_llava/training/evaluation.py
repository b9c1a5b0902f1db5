"""Eval while training: eval loss and exact-match accuracy every ``train.eval_steps`` steps and at the end.

Usage::

    cb = EvalDuringTraining(trainer, samples, encoder, processor, recipe, run, log)
    trainer.add_callback(cb)        # eval/step-N.jsonl, an eval row in metrics.jsonl, the checkpoint's eval.json

The samples are the run's eval data (data.eval sources and the data.eval_split carve), at most
``eval.max_samples`` of them, answered greedily with the same normalization as ``lora-llava eval``.
Evaluating leaves training exactly as it was: the model goes back to train mode and every random
number generator to its state, so a run with eval trains the same weights as one without.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from transformers import TrainerCallback

from lora_llava.annotations import Log, Model, Processor
from lora_llava.compat import no_cpu_weight_repacking
from lora_llava.config.schema import Recipe
from lora_llava.data.batching import Collator
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.infer import Loaded, evaluate
from lora_llava.layout import RunDir
from lora_llava.training.loss import supervised_loss


@contextmanager
def untouched_training_state(model: Model) -> Iterator[None]:
    """Eval mode and no gradients inside (4-bit weights left in their training layout); train mode and every
    RNG (python, numpy, torch, CUDA) restored after."""
    import numpy as np

    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), no_cpu_weight_repacking(model):
            yield
    finally:
        model.train(was_training)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def eval_loss(model: Model, samples: list[Sample], encoder: Encoder, pad_id: int, batch_size: int) -> float:
    """Mean loss per supervised token over ``samples`` (the training loss, on the eval data)."""
    from lora_llava.data.batching import EncodedDataset

    data = EncodedDataset(samples, encoder)
    collate = Collator(pad_id)
    device = next(p.device for p in model.parameters())
    total, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        batch = collate([data[j] for j in range(i, min(i + batch_size, len(data)))])
        batch = {k: v.to(device) for k, v in batch.items()}
        n = int((batch["labels"][:, 1:] != -100).sum())
        if n:  # the training loss's computation: logits only at the supervised positions
            total += float(supervised_loss(model, batch)) * n
            count += n
    return total / max(count, 1)


def question_of(sample: Sample) -> str:
    """The last user turn before the scored answer, without image placeholders."""
    users = [text for role, text in sample.messages[:-1] if role == "user"]
    return users[-1].replace("<image>", "").strip() if users else ""


class EvalDuringTraining(TrainerCallback):
    """Runs eval at every ``train.eval_steps``-th step and the last one; see the module docstring."""

    def __init__(
        self,
        trainer: Any,
        samples: list[Sample],
        encoder: Encoder,
        processor: Processor,
        recipe: Recipe,
        run: RunDir,
        log: Log = print,
    ) -> None:
        cap = recipe.eval.max_samples
        self.trainer = trainer
        self.samples = samples[:cap] if cap else samples
        self.encoder = encoder
        self.processor = processor
        self.recipe = recipe
        self.run = run
        self.log = log
        self.done: set[int] = set()
        self.results: dict[int, dict] = {}  # step -> the eval summary (the checkpoint of that step records it)

    def result_at(self, step: int) -> dict | None:
        """The eval summary at ``step``, when this run evaluated there."""
        return self.results.get(step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        every = self.recipe.train.eval_steps
        step = state.global_step
        if every and step not in self.done and (step % every == 0 or step >= state.max_steps):
            self.evaluate(step)

    def evaluate(self, step: int) -> dict:
        model = self.trainer.model
        with untouched_training_state(model):
            loss = eval_loss(
                model, self.samples, self.encoder, self.processor.tokenizer.pad_token_id, self.recipe.eval.batch_size
            )
            loaded = Loaded(model, self.processor, self.encoder, "training", str(self.run.path))
            result = evaluate(loaded, self.samples, self.recipe.eval.max_new_tokens, self.recipe.eval.batch_size)
        if result.note and not self.done:  # said once, at the first evaluation
            self.log(result.note)
        self.done.add(step)
        rows = [
            {
                "id": s.id,
                "source": s.source,
                "question": question_of(s),
                "prediction": p["prediction"],
                "reference": p["reference"],
                "correct": p["correct"],
            }
            for s, p in zip(self.samples, result.predictions)
        ]
        self.run.eval_dir.mkdir(exist_ok=True)
        tmp = self.run.eval_dir / f".step-{step}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        tmp.replace(self.run.eval_dir / f"step-{step}.jsonl")
        summary = {
            "step": step,
            "eval_loss": loss,
            "accuracy": result.accuracy,
            "correct": result.correct,
            "n": result.n,
        }
        self.results[step] = summary
        # Trainer.log clears control.should_log: keep it, or this step's training row would not be logged
        control = self.trainer.control
        should_log = control.should_log
        self.trainer.log({"eval_loss": loss, "eval_accuracy": result.accuracy})
        control.should_log = should_log
        self.log(f"eval at step {step}: loss {loss:.4f}, accuracy {result.accuracy:.3f} ({result.correct}/{result.n})")
        self._wandb_table(step, rows)
        return summary

    def _wandb_table(self, step: int, rows: list[dict]) -> None:
        if self.recipe.train.report_to != "wandb":
            return
        import wandb

        if wandb.run is None:
            return
        from lora_llava.data.images import load_image

        table = wandb.Table(columns=["id", "image", "question", "prediction", "reference", "correct"])
        for s, r in zip(self.samples, rows):
            image = wandb.Image(load_image(s.images[0])) if s.images else None
            table.add_data(r["id"], image, r["question"], r["prediction"], r["reference"], r["correct"])
        wandb.log({"eval/predictions": table}, commit=False)
