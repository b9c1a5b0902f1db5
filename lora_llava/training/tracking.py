"""Experiment tracking (``train.report_to: wandb``): one wandb run per lora_llava run, configured with the
resolved recipe, secrets redacted.

Usage::

    with wandb_run(recipe, run, run_id):      # wandb.init before the Trainer's own callback looks for a run
        trainer.train()

The wandb run's id is the lora_llava run's id, so a resumed run continues the same wandb run. Its files go
to ``<output_dir>/wandb`` (``WANDB_DIR`` wins when set). Its config is the recipe as resolved, with every
value under a key that names a secret (token, key, secret, password) and every value equal to a secret
environment variable (``*TOKEN*``, ``*KEY*``, ``*SECRET*``, ``*PASSWORD*``) replaced by ``<redacted>``.
wandb is told to leave out the host's metadata (command line, environment, git), where a secret passed on
the command line would otherwise be stored.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lora_llava.config.load import recipe_to_dict
from lora_llava.config.schema import Recipe
from lora_llava.distributed import world
from lora_llava.layout import RunDir

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"token|secret|passw|api_?key|(^|_)key$", re.IGNORECASE)


def secret_values() -> set[str]:
    """Values of this process's environment variables whose names say they are secrets."""
    return {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 6}


def redact(value: Any, secrets: set[str] | None = None, key: str = "") -> Any:
    """``value`` (nested dicts and lists) with secrets replaced by ``<redacted>``."""
    secrets = secret_values() if secrets is None else secrets
    if isinstance(value, dict):
        return {k: redact(v, secrets, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v, secrets, key) for v in value]
    if isinstance(value, str) and value and (_SECRET_NAME.search(key) or any(s in value for s in secrets)):
        return REDACTED
    return value


@contextmanager
def wandb_run(recipe: Recipe, run: RunDir, run_id: str) -> Iterator[Any]:
    """A wandb run for the duration of training when the recipe reports to wandb (else nothing); with several
    processes, of the first one only."""
    if recipe.train.report_to != "wandb" or not world().main:
        yield None
        return
    import wandb

    settings = wandb.Settings(x_disable_meta=True, disable_git=True, save_code=False, x_disable_stats=True)
    started = wandb.init(
        project=recipe.train.wandb_project or os.environ.get("WANDB_PROJECT") or "lora_llava",
        dir=os.environ.get("WANDB_DIR") or str(run.path),
        id=run_id,
        resume="allow",
        name=run.path.name,
        config={"recipe": redact(recipe_to_dict(recipe))},
        settings=settings,
    )
    try:
        yield started
    finally:
        wandb.finish()
