"""The data-generation config: what to read, which generator to ask, what to write.

Usage::

    config = load_datagen_config("coco.yaml", ["generator.concurrency=8"])   # a file or a built-in name
    config.annotations.path, config.generator.model, config.kinds

Strict like a recipe: every key declared with its type, default, bounds and help text; an unknown key
fails with its path and the nearest valid name; every problem is reported at once. The built-in
example configs (one per annotation format) live in ``recipes/datagen/`` and are listed by
``lora-llava data configs``; they are not training recipes, so ``lora-llava recipes`` leaves them out.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from lora_llava.config.load import apply_override, convert_checked
from lora_llava.config.schema import option, required
from lora_llava.config.yamlsafe import load_yaml
from lora_llava.errors import UserError

Kind = Literal["conversation", "detail", "complex_reasoning", "brief"]
KINDS: tuple[str, ...] = get_args(Kind)
LLM_KINDS = ("conversation", "detail", "complex_reasoning")  # brief needs no generator: caption -> answer


@dataclass
class AnnotationsConfig:
    path: str = required(
        "Annotations: a COCO-style JSON (captions and/or instances), a CSV with columns image,caption[,boxes], "
        "or a LLaVA JSON/JSONL whose answers are captions."
    )
    image_folder: str = required(
        "Folder the annotations' image paths are relative to (written images must exist there)."
    )
    format: Literal["auto", "coco", "csv", "llava"] = option(
        "auto", "auto: csv for a .csv file, coco for a JSON object with `images`, llava for a JSON list or JSONL."
    )
    boxes: str | None = option(
        None,
        "coco: a second COCO JSON for the same images, e.g. instances_*.json beside captions_*.json "
        "(captions and boxes are merged by image id).",
    )
    box_format: Literal["xyxy", "xywh"] | None = option(
        None,
        "csv: boxes as [x1, y1, x2, y2] (xyxy, default) or [x, y, width, height] (xywh), in pixels, "
        "or all within 0..1 when already normalized; coco is always xywh pixels.",
    )
    max_boxes: int = option(30, "At most this many boxes per image in the context (the largest are kept).", min=0)
    max_captions: int = option(5, "At most this many captions per image in the context.", min=1)


@dataclass
class GeneratorConfig:
    model: str = required(
        "local: a model directory, a Hugging Face id in the local cache, or the built-in tiny-qwen2; "
        "openai: the model name the endpoint serves."
    )
    type: Literal["local", "openai"] = option(
        "local",
        "local: a Hugging Face causal LM run here through transformers (offline); "
        "openai: any OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, hosted APIs).",
    )
    base_url: str | None = option(None, "openai: the endpoint's base URL, e.g. http://127.0.0.1:8000/v1 (required).")
    api_key_env: str | None = option(
        None,
        "openai: the name of the environment variable holding the API key (e.g. OPENAI_API_KEY); the key "
        "itself is never read from a config, printed or written. Unset: no Authorization header.",
    )
    allow_plain_http: bool = option(
        False,
        "openai: allow sending the API key over plain http:// to another machine (a server on a network you "
        "trust); without it such a base_url is refused. Loopback (127.0.0.1, ::1, localhost) never needs it, "
        "https:// is always allowed.",
    )
    temperature: float = option(0.7, "Sampling temperature; 0 is greedy.", min=0.0, max=2.0)
    max_new_tokens: int = option(768, "Longest generation; a generation cut off there is rejected (truncated).", min=1)
    few_shot: int = option(2, "In-context examples per request (of the hand-written ones for each kind).", min=0, max=2)
    concurrency: int = option(4, "openai: requests in flight at once (local: one at a time).", min=1, max=256)
    max_retries: int = option(5, "openai: retries of a request after an error, a timeout or a 429.", min=0, max=50)
    backoff_s: float = option(1.0, "openai: first wait before a retry, doubled each time (with jitter).", min=0.0)
    max_backoff_s: float = option(
        60.0, "openai: longest wait between retries (a longer Retry-After is capped).", min=0.0
    )
    timeout_s: float = option(
        120.0,
        "openai: seconds one attempt may take in all (connecting, waiting, reading the answer); then it is retried.",
        min=0.1,
        max=3600.0,
    )
    seed: int = option(0, "Seed of sampling and of the question variants drawn per image.")


@dataclass
class DatagenConfig:
    annotations: AnnotationsConfig = required("Where the captions and boxes are.")
    output: str = required(
        "The LLaVA-Instruct JSON to write; beside it OUTPUT's stem + .journal.jsonl (every generation, for "
        "resuming) and .report.txt (the quality report)."
    )
    generator: GeneratorConfig | None = option(None, "The LLM that writes the data (not needed for kinds: [brief]).")
    kinds: list[Kind] = option(
        lambda: list(LLM_KINDS),
        "What to generate per image: conversation, detail (detailed description), complex_reasoning, and "
        "brief (stage-1 pairs: a brief-description prompt -> the caption, no LLM).",
        min_items=1,
    )


def load_datagen_config(source: str | os.PathLike | dict, overrides: Sequence[str] = ()) -> DatagenConfig:
    """A YAML file, a built-in config name or a dict (+ ``a.b=value`` overrides) -> a validated DatagenConfig.

    Raises UserError listing every problem found.
    """
    if isinstance(source, dict):
        name, data = "<dict>", copy.deepcopy(source)
    else:
        path = config_path(os.fspath(source))
        name, data = str(path), _read_yaml(path)
    for override in overrides:
        apply_override(data, override)
    problems: list[str] = []
    gen = data.get("generator")
    if isinstance(gen, dict) and "api_key" in gen:  # before the converter's "did you mean api_key_env?"
        problems.append(
            "generator.api_key: an API key is never read from a config; put it in an environment variable "
            "and name that variable in generator.api_key_env"
        )
        gen = {k: v for k, v in gen.items() if k != "api_key"}
        data["generator"] = gen
    config: DatagenConfig = convert_checked(DatagenConfig, data, _cross_check, f"datagen config {name}", problems)
    return config


def _cross_check(c: DatagenConfig) -> list[str]:
    out = []
    if len(set(c.kinds)) != len(c.kinds):
        out.append("kinds: a kind is listed twice")
    needs_llm = any(k in LLM_KINDS for k in c.kinds)
    g = c.generator
    if needs_llm and g is None:
        out.append(f"generator: required for kinds {[k for k in c.kinds if k in LLM_KINDS]} (model, type, ...)")
    if g is not None:
        if g.type == "openai" and not g.base_url:
            out.append("generator.base_url: required for type openai, e.g. http://127.0.0.1:8000/v1")
        if g.type == "openai" and g.base_url and not g.base_url.startswith(("http://", "https://")):
            out.append(f"generator.base_url: must start with http:// or https://, got {g.base_url!r}")
        if g.type == "local" and (g.base_url or g.api_key_env):
            key = "generator.base_url" if g.base_url else "generator.api_key_env"
            out.append(f"{key}: only used with type openai (type is local)")
    if c.annotations.box_format is not None and c.annotations.format == "coco":
        out.append("annotations.box_format: COCO boxes are always [x, y, width, height] in pixels; remove it")
    if not c.output.endswith(".json"):
        out.append(f"output: must be a .json file (LLaVA-Instruct JSON), got {c.output!r}")
    return out


# ------------------------------------------------------------------------------ built-in example configs


def configs_root() -> Path:
    """``recipes/datagen`` of the installed package: one example config per annotation format."""
    from lora_llava.recipes import DATAGEN_FOLDER, recipes_root

    return recipes_root() / DATAGEN_FOLDER


def list_configs() -> list[tuple[str, str]]:
    """(name, first comment line) of every built-in example config."""
    from lora_llava.recipes import first_comment

    return [(p.stem, first_comment(p)) for p in sorted(configs_root().glob("*.yaml"))]


def config_path(ref: str) -> Path:
    """A YAML path as given, or the built-in example config of that name."""
    from lora_llava.recipes import builtin_yaml

    return builtin_yaml(
        ref,
        configs_root() / f"{ref}.yaml",
        [n for n, _ in list_configs()],
        missing=f"datagen config {ref!r}: file not found",
        unknown=f"no datagen config {ref!r}: not a file and not a built-in config",
        command="lora-llava data configs",
    )


def _read_yaml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"datagen config {path}: cannot read: {e}") from None
    data = load_yaml(text, f"datagen config {path}")  # a syntax error, or a key given twice in one mapping
    if not isinstance(data, dict):
        raise UserError(f"datagen config {path}: the top level must be a mapping of keys such as 'annotations:'")
    return data
