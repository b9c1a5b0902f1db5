"""The model card of a pushed adapter or merged model: the run's record, with Hub metadata.

Usage::

    text = render_card(CardFacts(kind="adapter", repo_id="me/x", ...))   # README.md for the repo
    scrub("/home/me/data/train.json")                                    # '<local>/train.json'

The card names the base model (``base_model`` + ``base_model_relation``), the library that loads it,
the recipe (local paths scrubbed), the data the run trained on (the check report), training numbers
(steps, final loss, time, hardware), eval before and after when the run measured them, the merge
verification, and usage snippets. It is rendered with Jinja2 and parses with ``huggingface_hub``'s
``ModelCard`` (tested).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

# local paths a card or a pushed file must not carry, each replaced by <local>/<its last part>: file:// URLs,
# Windows paths (C:\x, C:/x, \\server\share), home paths (~/x, ~user/x), absolute POSIX paths, and relative
# paths (./x, ../x, a/b/c with two or more slashes, a/b.json with a data file's extension); never a URL's path,
# a Hub id (owner/name), a date (2026/12/04) or an already scrubbed <local>/x
_END = r"[^\s'\"(),;<>|*?\[\]]+"
_LOCAL_PATHS = [
    re.compile(r"file://" + _END),
    re.compile(r"(?<![\w/\\])(?:[A-Za-z]:[\\/]|\\\\)" + _END),
    re.compile(r"(?<![\w:/.~>-])~[\w.-]*/" + _END),
    re.compile(r"(?<![\w:/.~>\\-])/(?!/)" + r"[^\s'\"(),:;<>|*?\[\]]+"),
    re.compile(r"(?<![\w:/.~>\\-])\.{1,2}/" + _END),
    re.compile(r"(?<![\w:/.~>\\-])(?=[^\s/]*[A-Za-z._])[\w.-]+(?:/[\w.-]+){2,}/?"),
    re.compile(r"(?<![\w:/.~>\\-])[\w.-]+/[\w.-]+\.(?:json|jsonl|yaml|yml|parquet|csv|tsv|txt|png|jpe?g|webp|arrow)\b"),
]


def _last_part(path: str) -> str:
    parts = [p for p in re.split(r"[\\/]+", path.rstrip("/\\")) if p]
    return "<local>/" + (parts[-1] if parts else "")


# licenses of registered bases, as their model cards state them (others: not claimed)
KNOWN_LICENSES = {
    "llava-hf/llava-1.5-7b-hf": "llama2",
    "llava-hf/llava-1.5-13b-hf": "llama2",
    "llava-hf/llava-v1.6-vicuna-7b-hf": "llama2",
    "llava-hf/llava-v1.6-vicuna-13b-hf": "llama2",
    "llava-hf/llava-v1.6-mistral-7b-hf": "apache-2.0",
}


def scrub(value: Any) -> Any:
    """``value`` with every local path (``_LOCAL_PATHS``) replaced by ``<local>/<its last part>`` (recursively);
    scrubbing twice changes nothing more."""
    if isinstance(value, str):
        for pattern in _LOCAL_PATHS:
            value = pattern.sub(lambda m: _last_part(m.group(0)), value)
        return value
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


@dataclass
class CardFacts:
    """Everything a card states; strings are already scrubbed of local paths."""

    kind: str  # adapter | merged
    repo_id: str
    backbone: str  # the base as lora_llava names it
    base_model: str | None  # a Hub id, when the base is one
    chat_format: str
    system_prompt: str
    recipe_yaml: str = ""
    data_report: str = ""
    steps: int | None = None
    train_loss: float | None = None
    seconds: float | None = None
    hardware: str = ""
    train_samples: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # base / adapter / merged, when measured
    eval_samples: int | None = None
    parity: dict[str, Any] = field(default_factory=dict)  # merge verification
    other_repo: str | None = None  # the adapter's merged repo, or the merged model's adapter repo
    image_newline: bool = False  # LLaVA-NeXT: a parameter PEFT cannot carry
    pad_to_square: bool = False
    model_class: str = "LlavaForConditionalGeneration"
    tags: list[str] = field(default_factory=list)


_TEMPLATE = """\
{{ metadata }}
# {{ f.repo_id.split('/')[-1] }}

{% if f.kind == 'adapter' -%}
A LoRA adapter for **{{ f.base_model or f.backbone }}**, trained with lora_llava: the language model's
LoRA weights and the fully trained projector{% if f.image_newline %} (and LLaVA-NeXT's image newline){% endif %}.
{%- else -%}
**{{ f.base_model or f.backbone }}** fine-tuned with lora_llava, its adapter folded into the weights: a plain transformers checkpoint ({{ f.model_class }}).
{%- endif %}
{% if f.other_repo %}
{% if f.kind == 'adapter' %}The merged model: [{{ f.other_repo }}](https://huggingface.co/{{ f.other_repo }}).{% else %}The adapter it was merged from: [{{ f.other_repo }}](https://huggingface.co/{{ f.other_repo }}).{% endif %}
{% endif %}
## Prompt format

Chat format `{{ f.chat_format }}`{% if f.system_prompt %}, with the system prompt "{{ f.system_prompt }}"{% else %}, no system prompt{% endif %}:
the saved chat template renders it, so `processor.apply_chat_template` prompts the model as it was trained.
{%- if f.pad_to_square %} Images are padded to a square with the processor's mean color; the saved image
processor does this (`do_pad`).{% endif %}

## Usage

```python
import torch
from PIL import Image
from transformers import AutoProcessor, {{ f.model_class }}
{%- if f.kind == 'adapter' %}
from peft import PeftModel

base = {{ f.model_class }}.from_pretrained("{{ f.base_model or '<the base model>' }}", dtype=torch.bfloat16)
model = PeftModel.from_pretrained(base, "{{ f.repo_id }}")  # LoRA + the trained projector
{%- if f.image_newline %}
# LLaVA-NeXT's image newline is a bare parameter PEFT does not carry; restore it from projector.safetensors:
from huggingface_hub import hf_hub_download
from safetensors.torch import load_file
newline = load_file(hf_hub_download("{{ f.repo_id }}", "projector.safetensors"))["image_newline"]
model.base_model.model.model.image_newline.data = newline.to(model.base_model.model.model.image_newline.dtype)
{%- endif %}
{%- else %}

model = {{ f.model_class }}.from_pretrained("{{ f.repo_id }}", dtype=torch.bfloat16)
{%- endif %}
processor = AutoProcessor.from_pretrained("{{ f.repo_id }}")
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(text=prompt, images=Image.open("image.jpg"), return_tensors="pt")
out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
print(processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
{%- if f.kind == 'adapter' %}

The adapter was trained on the base in 4-bit NF4 (QLoRA); loading the base that way
(`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", llm_int8_skip_modules=["model.vision_tower",
"model.multi_modal_projector", "lm_head"])`) reproduces its answers exactly.
{%- endif %}

## Training
{% if f.steps is not none %}
| | |
|---|---|
| steps | {{ f.steps }} |
| final mean training loss | {{ '%.4f' % f.train_loss if f.train_loss is not none else 'n/a' }} |
| training samples | {{ f.train_samples if f.train_samples is not none else 'n/a' }} |
| time | {{ '%.0f s' % f.seconds if f.seconds is not none else 'n/a' }} |
| hardware | {{ f.hardware or 'n/a' }} |
{% else %}
Not recorded with this model.
{% endif %}
{%- if f.accuracy %}
## Evaluation

Exact-match accuracy of greedy answers on {{ f.eval_samples }} held-out samples:

| model | accuracy |
|---|---|
{%- for name, value in f.accuracy.items() %}
| {{ name }} | {{ '%.3f' % value }} |
{%- endfor %}
{% endif %}
{%- if f.parity %}
## Merge verification

The merged model, run as stored ({{ f.parity.get('dtype') or 'n/a' }}), against the adapter on the same inputs:

| check | result |
|---|---|
| greedy answers equal | {{ f.parity.get('answers_equal') }}/{{ f.parity.get('answers_total') }} |
| next-token logits, max abs difference | {{ '%.3g' % f.parity['max_abs_logit_diff'] if f.parity.get('max_abs_logit_diff') is not none else 'n/a' }} |
{%- if f.parity.get('quantized_answers_equal') is not none %}
| re-quantized to 4-bit: answers equal to the adapter's | {{ f.parity.get('quantized_answers_equal') }}/{{ f.parity.get('answers_total') }} |
{%- endif %}
{%- if f.parity.get('accuracy') %}
| exact match on the verification samples (merged / 4-bit merged) | {{ f.parity['accuracy'].get('merged') }} / {{ f.parity['accuracy'].get('quantized') }} |
{%- endif %}
{% endif %}
{%- if f.data_report %}
## Data

The training data as `lora-llava check` reported it:

```
{{ f.data_report }}
```
{% endif %}
{%- if f.recipe_yaml %}
## Recipe

```yaml
{{ f.recipe_yaml }}
```
{% endif %}"""


def render_card(f: CardFacts) -> str:
    """README.md text: YAML metadata, then the run's record."""
    import jinja2

    meta: dict[str, Any] = {}
    if f.base_model:
        meta["base_model"] = f.base_model
        meta["base_model_relation"] = "adapter" if f.kind == "adapter" else "merge"
    meta["library_name"] = "peft" if f.kind == "adapter" else "transformers"
    meta["pipeline_tag"] = "image-text-to-text"
    license_ = KNOWN_LICENSES.get(f.base_model or "")
    if license_:
        meta["license"] = license_
    meta["tags"] = ["lora_llava", "llava", *(["lora", "qlora"] if f.kind == "adapter" else ["merged"]), *f.tags]
    metadata = "---\n" + yaml.safe_dump(meta, sort_keys=False).strip() + "\n---"
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(_TEMPLATE).render(f=f, metadata=metadata).strip() + "\n"
