"""The lengths a plan is made at: the data's longest sample after image expansion when its processor is here
to read it, else ``data.max_length``.

Usage::

    seq, images, how, sup = sequence_plan(recipe, source)  # source: plan.configs.ConfigSource
    # seq: longest sample in tokens; images: most images in a sample; how: the words the table prints;
    # sup: supervised tokens per sample of the micro-batch of longest samples (None when the data was not read)
"""

from __future__ import annotations

from typing import Any

from lora_llava.annotations import Log
from lora_llava.config.schema import Recipe
from lora_llava.errors import UserError
from lora_llava.plan.configs import ConfigSource


def sequence_plan(recipe: Recipe, source: ConfigSource, log: Log | None = None) -> tuple[int, int, str, float | None]:
    """(longest sample in tokens, most images in a sample, how it was found, the supervised tokens per
    sample of the micro-batch of longest samples, on average): the data's exact lengths after image expansion when it can be read
    here, else data.max_length with one image (supervised tokens then unknown: None)."""
    why = ""
    if not source.origin.has_processor:
        why = "the backbone's processor is not available here"
    else:
        from lora_llava.training.prepare import prepare_run

        try:
            prepared = prepare_run(recipe, None, log=log or (lambda *a: None), enforce=False, pixels=False)
        except UserError as e:
            why = str(e).splitlines()[0]
        else:
            samples = prepared.report.train
            if samples:
                report = prepared.report
                longest = max(report.length_of(s) for s in samples)
                images = max(len(s.images) for s in samples)
                top = sorted(samples, key=report.length_of, reverse=True)[: recipe.train.batch_size]
                sup = sum(_supervised_tokens(prepared.encoder, s) for s in top) / len(top)
                return longest, images, f"the longest of {len(samples)} training samples", sup
            why = "no usable training sample"
    return recipe.data.max_length, 1, f"data.max_length; data not read: {why}", None


def _supervised_tokens(encoder: Any, sample: Any) -> int:
    """How many of ``sample``'s tokens carry loss (image sizes read from the files)."""
    sizes = [encoder.load(p).size for p in sample.images]
    _, labels = encoder.tokens(sample, sizes)
    return sum(1 for x in labels[1:] if x != -100)
