"""What a user runs, above training: train (with stage 1's aligned model), and what a model is evaluated on.

Usage::

    result = train(recipe)             # training.run.train, then for stage align the aligned model in <run>/model
    plan = eval_plan("runs/x")         # EvalPlan: the run's own eval data, its recipe's eval settings
    plan = eval_plan("runs/x", "test.json", image_folder="images", max_samples=100)   # or any data a recipe reads
    evaluate(load_model("runs/x"), plan.samples, plan.max_new_tokens, plan.batch_size)
    samples = run_eval_samples(recipe, encoder)     # the run's own eval sources (and eval_split)

The eval policy lives here, once, for ``lora-llava eval``, ``lora-llava predict`` and the quickstart: a run
(or adapter) is evaluated on its own eval data with its recipe's ``eval`` settings unless data or settings
are given; anything else needs data and uses the defaults (``EvalConfig``).
"""

from __future__ import annotations

import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lora_llava.annotations import Log
from lora_llava.artifacts import Artifact, open_artifact
from lora_llava.config.schema import DataConfig, DataSource, EvalConfig, Recipe
from lora_llava.data.budget import char_budget, text_chars
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import BadSample, Sample
from lora_llava.distributed import world
from lora_llava.errors import UserError
from lora_llava.layout import RECIPE_FILE, RunDir

if TYPE_CHECKING:
    from lora_llava.training.prepare import PreparedRun
    from lora_llava.training.run import TrainResult


def train(
    recipe: Recipe,
    log: Log = print,
    prepared: PreparedRun | None = None,
    overwrite: bool = False,
    run_id: str | None = None,
) -> TrainResult:
    """Train ``recipe``; a stage-1 (align) run then writes its aligned model, stage 2's backbone.

    An output_dir holding an earlier run is refused unless ``overwrite`` (see ``RunDir.start``)."""
    from lora_llava.training.run import train as train_adapter

    run = RunDir(recipe.output_dir)
    if recipe.stage == "align" and run.aligned.exists() and not run.aligned.is_dir():
        raise UserError(f"{run.aligned} is a file; stage 1 writes its aligned model there")
    from lora_llava import plan

    result = train_adapter(
        recipe, log=log, prepared=prepared, overwrite=overwrite, run_id=run_id,
        before_load=lambda: plan.preload_warning(recipe),  # on CUDA: the memory plan before weights load
    )  # fmt: skip
    if recipe.stage == "align" and world().main:  # several processes: the first one writes the aligned model
        from lora_llava.merging import merge

        # the LM was frozen: keep its original weights, so stage 2 quantizes exactly what stage 1 saw
        merge(run.path, run.aligned, base_mode="original", replace=True, aligned=True, log=log)
        log(f"stage 1 done: {run.aligned} is the aligned LLaVA; start stage 2 with backbone: {run.path}")
    return result


def run_eval_samples(recipe: Recipe, encoder: Encoder | None) -> list[Sample]:
    """The samples a run evaluates on: its data.eval sources, plus its eval_split (carved from the training
    data exactly as training carved it, so only then is the training data read, and only then is ``encoder``,
    the run's own, needed)."""
    bad: list = []
    if recipe.data.eval_split:
        from lora_llava.data.check import prepare_data

        assert encoder is not None, "a run with data.eval_split needs its encoder to carve its eval data"
        report = prepare_data(recipe, encoder, run_dir=None, enforce=False)
        samples, bad = report.eval, report.bad
    else:
        from lora_llava.data.formats import read_source

        samples = []
        for src in recipe.data.eval:
            good, wrong = read_source(src)
            samples += good
            bad += wrong
    if bad:
        listing = "\n  ".join(b.describe() for b in bad[:20])
        raise UserError(f"{len(bad)} bad sample(s) in the run's eval data:\n  {listing}", hint="or pass --data")
    return samples


# ------------------------------------------------------------------------------------------------ eval plan

RUN_EVAL_DATA = "the run's eval data"
DEFAULT_SETTINGS = "the defaults"


@dataclass
class EvalPlan:
    """What a model is evaluated on and how: the samples, the generation settings, and where each came from."""

    samples: list[Sample]
    where: str  # the data in words: "the run's eval data", or the data file or image folder given
    max_new_tokens: int
    batch_size: int
    settings_from: str  # what settings not given come from: "the run's recipe (<path>)" or "the defaults"
    bad: list[BadSample] = field(default_factory=list)  # unreadable samples left out (bad="skip"/"keep")
    recipe: Recipe | None = None  # the run's recipe, when the model is a run or adapter
    artifact: Artifact | None = None  # the model, resolved (None: a plan of the quickstart's own run)


def eval_plan(
    model: str | Path,
    data: str | Path | None = None,
    *,
    image_folder: str | Path | None = None,
    data_format: str = "auto",
    split: str | None = None,
    columns: str | dict[str, Any] | None = None,
    roles: str | dict[str, Any] | None = None,
    prompt_style: str = "plain",
    images: str | Path | None = None,
    prompt: str | None = None,
    max_samples: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    bad: Literal["error", "skip", "keep"] = "error",
    encoder: Encoder | None = None,
    warn: Log | None = None,
) -> EvalPlan:
    """What ``model`` (a MODEL/RUN argument, see ``open_artifact``) is evaluated on, and with which settings.

    The data: ``data`` (any file or datasets folder a recipe reads, with a recipe data entry's options:
    ``image_folder``, ``data_format``, ``split``, ``columns`` and ``roles`` as mappings or YAML text,
    ``prompt_style``; its first ``max_samples``), or ``images`` (every image of a folder, asked ``prompt``; no
    reference answers), or else the run's own eval data (its data.eval and eval_split; the first
    ``max_samples``), which only a run or adapter records. ``encoder`` is the run's, when it is loaded
    already; a run with data.eval_split needs one and reads its processor otherwise.

    The settings: ``max_new_tokens`` and ``batch_size`` when given, else the run's recipe's ``eval`` section,
    else the defaults.

    Bad samples: ``error`` raises one UserError listing them; ``skip`` leaves them out (listed on ``warn``,
    by default stderr); ``keep`` returns them in ``plan.bad`` for the caller to record (predict writes them
    as error lines) and an empty set of samples is no error.
    """
    from lora_llava.config import load_recipe

    say = warn or _stderr
    art = open_artifact(model)
    adapter = art.adapter_dir
    recipe = load_recipe(adapter / RECIPE_FILE) if adapter is not None else None
    # a merged model answers with the settings of the run it was merged from, as its adapter does
    trained_with = art.lineage().recipe if recipe is None and art.kind in ("merged", "aligned") else None
    trained_recipe = recipe or (load_recipe(trained_with) if trained_with else None) or _DEFAULTS
    settings = trained_recipe.eval
    source = adapter / RECIPE_FILE if adapter is not None else trained_with
    plan = EvalPlan(
        samples=[],
        where=RUN_EVAL_DATA,
        max_new_tokens=max_new_tokens or settings.max_new_tokens,
        batch_size=batch_size or settings.batch_size,
        settings_from=f"the run's recipe ({source})" if source is not None else DEFAULT_SETTINGS,
        recipe=recipe,
        artifact=art,
    )
    if data is None and images is None:
        if recipe is None:
            raise UserError(
                f"--data is needed: {str(model)!r} is {art.description}, which records no eval data",
                hint="pass --data FILE (and --image-folder DIR); a run directory evaluates its own eval data",
            )
        if encoder is None and recipe.data.eval_split:
            from lora_llava.infer import adapter_encoder

            encoder = adapter_encoder(art)
        samples = run_eval_samples(recipe, encoder)
        if not samples:
            raise UserError(
                f"the run's recipe ({art.path}) has no eval data (data.eval, data.eval_split)",
                hint="pass --data FILE (and --image-folder DIR)",
            )
        plan.samples = samples[:max_samples] if max_samples else samples
        return plan
    if images is not None:
        from lora_llava.predict import samples_from_images

        if data is not None:
            raise UserError("give either --data FILE or --images DIR (with --prompt)")
        if not prompt:
            raise UserError("--images needs --prompt: the question asked about each image")
        plan.where = str(images)
        samples, found_bad = samples_from_images(images, prompt)
        samples = samples[:max_samples] if max_samples else samples
    else:
        from lora_llava.data.formats import read_source

        assert data is not None
        plan.where = str(data)
        src = data_source(data, image_folder, data_format, split, columns, roles, prompt_style)
        samples, found_bad = read_source(src, limit=max_samples, warn=lambda w: say(f"warning: {w}"))
    samples, too_long = _within_char_budget(samples, trained_recipe.data.max_length)
    found_bad = [*found_bad, *too_long]
    if found_bad and bad != "keep":
        listing = bad_listing(found_bad)
        hints = ["--skip-bad scores the good ones"]
        if image_folder is None and any("not found in" in b.reason for b in found_bad):
            hints.insert(0, "image paths are relative to --image-folder (default: the current directory)")
        if bad == "error":
            raise UserError(f"{len(found_bad)} bad sample(s) in {plan.where}:\n  {listing}", hint="; ".join(hints))
        say(f"skipping {len(found_bad)} bad sample(s):\n  {listing}")
    if not samples and bad != "keep":
        raise UserError(f"no samples to score in {plan.where}", hint="check --data (and --max-samples)")
    plan.samples, plan.bad = samples, found_bad
    return plan


class _Defaults:
    """The eval and data settings of no recipe: what a backbone (or a model with no recipe) is scored with."""

    eval = EvalConfig()
    data = types.SimpleNamespace(max_length=DataConfig.__dataclass_fields__["max_length"].default)


_DEFAULTS: Any = _Defaults()


def _within_char_budget(samples: list[Sample], max_length: int) -> tuple[list[Sample], list[BadSample]]:
    """``samples`` without those whose text could not fit ``max_length`` tokens with any tokenizer (more
    characters than ``char_budget``): they are bad samples, never tokenized (a 50 MB answer would take minutes
    and gigabytes to tokenize)."""
    limit, kept, bad = char_budget(max_length), [], []
    for s in samples:
        n = text_chars(s)
        if n > limit:
            reason = f"{n} characters of text, more than {max_length} tokens can hold ({limit} characters); not read"
            bad.append(BadSample(s.source, s.index, s.id, reason, s.line))
        else:
            kept.append(s)
    return kept, bad


def recipe_eval_plan(recipe: Recipe, samples: list[Sample], where: str = RUN_EVAL_DATA) -> EvalPlan:
    """A run's eval as its recipe sets it, before the run exists (the quickstart evaluates the base, the
    adapter and the merged model on it): ``samples`` up to eval.max_samples, with the recipe's eval settings."""
    e = recipe.eval
    return EvalPlan(
        samples=samples[: e.max_samples] if e.max_samples else samples,
        where=where,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
        settings_from="the recipe",
        recipe=recipe,
    )


def data_source(
    path: str | Path,
    image_folder: str | Path | None = None,
    data_format: str = "auto",
    split: str | None = None,
    columns: str | dict[str, Any] | None = None,
    roles: str | dict[str, Any] | None = None,
    prompt_style: str = "plain",
    where: str = "eval --data",
) -> DataSource:
    """One data source, validated exactly as a recipe's data.* entry (problems named under ``where``);
    ``columns`` and ``roles`` as mappings or YAML text (``'{conversations: dialog}'``)."""
    import yaml

    from lora_llava.config.load import load_source
    from lora_llava.config.yamlsafe import DuplicateKeyError, strict_load

    raw: dict[str, Any] = {
        "path": str(path),
        "image_folder": str(image_folder) if image_folder is not None else None,
        "format": data_format,
    }
    raw.update({"split": split, "prompt_style": prompt_style})
    for key, value in (("columns", columns), ("roles", roles)):
        if isinstance(value, str):
            try:
                raw[key] = strict_load(value)
            except DuplicateKeyError as e:
                raise UserError(f"--{key} {value!r}: {e.describe()}") from None
            except yaml.YAMLError as e:
                raise UserError(
                    f"--{key} {value!r}: not YAML ({e})", hint="e.g. --columns '{conversations: dialog}'"
                ) from None
        elif value is not None:
            raw[key] = value
    return load_source(raw, where)


def bad_listing(bad: list[BadSample], limit: int = 50) -> str:
    """The first ``limit`` bad samples, one per line (indented after the first), and how many more."""
    return "\n  ".join(b.describe() for b in bad[:limit]) + (
        f"\n  ... and {len(bad) - limit} more" if len(bad) > limit else ""
    )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)
