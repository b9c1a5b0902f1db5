"""Generation shared by eval, merge verification and the quickstart.

Usage::

    loaded = load_model("runs/quickstart")          # a run dir, adapter dir, merged dir or backbone name
    answers = generate(loaded, samples, max_new_tokens=16, batch_size=8)
    result = evaluate(loaded, samples)              # EvalResult(accuracy, n, correct, predictions)

Answers are greedy. Exact match compares answers with case, surrounding whitespace, quotes and
trailing punctuation normalized; an answer that is only punctuation (``?``, ``...``) is compared whole, and an
empty prediction is never correct for a non-empty reference.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_llava.annotations import Model, Processor
from lora_llava.artifacts import Artifact, adapter_meta_of, open_artifact, resolve_backbone
from lora_llava.config.schema import QuantizationConfig
from lora_llava.data.chat import format_for
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError
from lora_llava.layout import MODEL_CONFIG_FILE, AdapterMeta
from lora_llava.model.loading import load_base, load_processor, torch_dtype
from lora_llava.model.trained_parts import load_adapter_model


@dataclass
class Loaded:
    """A model ready to answer: the weights, the processor, and the encoder that prompts it as trained."""

    model: Model
    processor: Processor
    encoder: Encoder
    kind: str  # adapter | merged | backbone
    ref: str
    artifact: Artifact | None = None


def load_model(
    ref: str | Path,
    dtype: torch.dtype | None = None,
    max_tiles: int | None = None,
    quantize: bool = False,
    like: Loaded | None = None,
) -> Loaded:
    """Load what ``ref`` names (see ``lora_llava.artifacts.open_artifact``): a run or adapter as trained,
    a merged / aligned / assembled / plain checkpoint directory (``quantize``: its language model in 4-bit
    NF4, as it is often served), or a backbone name. With ``like``, it is prompted as that model is (its chat
    format, system prompt and image padding): two models compared on the same inputs."""
    loaded = _load(ref, dtype, max_tiles, quantize)
    if like is not None:
        enc = like.encoder
        loaded.encoder = Encoder(loaded.processor, enc.fmt, enc.max_length, pad_to_square=enc.pad_to_square)
    return loaded


def _load(ref: str | Path, dtype: torch.dtype | None, max_tiles: int | None, quantize: bool) -> Loaded:
    art = open_artifact(ref)
    if art.kind in ("run", "adapter"):
        adapter_dir, meta = art.adapter_dir, adapter_meta_of(art)
        assert adapter_dir is not None
        model, processor, _ = load_adapter_model(adapter_dir, meta, dtype=dtype)
        return Loaded(model, processor, _trained_encoder(processor, meta), "adapter", str(adapter_dir), art)
    if art.kind == "checkpoint":
        raise UserError(
            f"{art.ref!r} is a resumable training checkpoint, not a model",
            hint="evaluate or merge the run directory (its adapter/), or resume training from it",
        )
    if art.is_model_dir:
        path = art.path
        assert path is not None
        spec = resolve_backbone(str(path))
        stored = dtype or _stored_dtype(path)
        q = QuantizationConfig(load_in_4bit=quantize, compute_dtype=str(stored).replace("torch.", ""))  # type: ignore[arg-type]
        model, processor = load_base(spec, q, quantized=quantize, dtype=stored)
        saved = art.meta
        fmt_name = getattr(saved, "chat_format", None) or spec.chat_format
        system = getattr(saved, "system_prompt", None) if saved is not None else None
        pad = bool(getattr(saved, "pad_to_square", False))
        model.eval()
        enc = Encoder(processor, format_for(fmt_name, processor.tokenizer, system), pad_to_square=pad)
        return Loaded(model, processor, enc, "merged", str(path), art)
    spec = resolve_backbone(art.ref)
    q = QuantizationConfig(load_in_4bit=False, compute_dtype="float32" if not torch.cuda.is_available() else "bfloat16")
    model, processor = load_base(spec, q, quantized=False, dtype=dtype, max_tiles=max_tiles)
    model.eval()
    enc = Encoder(processor, format_for(spec.chat_format, processor.tokenizer))
    return Loaded(model, processor, enc, "backbone", art.ref, art)


def _trained_encoder(processor: Processor, meta: AdapterMeta) -> Encoder:
    fmt = format_for(meta.chat_format, processor.tokenizer, meta.system_prompt)
    return Encoder(processor, fmt, pad_to_square=meta.pad_to_square)


def adapter_encoder(art: Artifact) -> Encoder:
    """The encoder that prompts a run or adapter as trained (its processor, chat format, system prompt and
    image padding), as ``load_model`` builds it, without loading the weights."""
    adapter_dir, meta = art.adapter_dir, adapter_meta_of(art)
    assert adapter_dir is not None
    return _trained_encoder(load_processor(adapter_dir), meta)


def _stored_dtype(path: Path) -> torch.dtype:
    """The dtype a checkpoint's weights are stored in: what plain transformers (and a server) runs it in."""
    import json

    cfg = json.loads((path / MODEL_CONFIG_FILE).read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "float32"
    return torch_dtype(name)


def _model_device(model: Model) -> torch.device:
    return next(p.device for p in model.parameters())


def batch_inputs(loaded: Loaded, samples: list[Sample]) -> tuple[dict, list[str]]:
    """Left-padded generation inputs for ``samples`` and their reference answers."""
    texts, refs, images = [], [], []
    for s in samples:
        text, ref, ims = loaded.encoder.prompt(s)
        texts.append(text)
        refs.append(ref)
        images.extend(ims)
    tok = loaded.processor.tokenizer
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=True)
    finally:
        tok.padding_side = side
    inputs = dict(enc)
    if images:
        pix = loaded.processor.image_processor(images=images, return_tensors="pt")
        inputs.update({k: v for k, v in pix.items() if k in ("pixel_values", "image_sizes")})
    dev = _model_device(loaded.model)
    return {k: v.to(dev) for k, v in inputs.items()}, refs


@torch.no_grad()
def generate(loaded: Loaded, samples: list[Sample], max_new_tokens: int = 16, batch_size: int = 8) -> list[str]:
    tok = loaded.processor.tokenizer
    out: list[str] = []
    for i in range(0, len(samples), batch_size):
        inputs, _ = batch_inputs(loaded, samples[i : i + batch_size])
        gen = loaded.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tok.pad_token_id,
            eos_token_id=sorted({tok.eos_token_id, loaded.encoder.stop_id} - {None}),
        )
        new = gen[:, inputs["input_ids"].shape[1] :]
        out.extend(t.strip() for t in tok.batch_decode(new, skip_special_tokens=True))
    return out


@torch.no_grad()
def next_token_gaps(a: Loaded, b: Loaded, samples: list[Sample]) -> list[float]:
    """Per sample, the largest absolute difference between the two models' next-token logits on ``a``'s prompt
    (``b`` prompted the same way: ``load_model(..., like=a)``)."""
    gaps = []
    device = _model_device(b.model)
    for s in samples:
        inputs, _ = batch_inputs(a, [s])
        x = a.model(**inputs).logits[0, -1].float()
        y = b.model(**{k: v.to(device) for k, v in inputs.items()}).logits[0, -1].float()
        gaps.append((x - y.to(x.device)).abs().max().item())
    return gaps


# trailing punctuation and quotes an answer may end with ("Red." is "red"), ASCII and full-width / CJK
_TRAILING = re.compile(r"[\s.!?,;:\"'`。．！？，、；：…‘’“”「」『』]+$")
_LEADING = re.compile(r"^[\s\"'`‘’“”「」『』]+")


def normalize(answer: str) -> str:
    """``answer`` as exact match compares it: lower case, without surrounding whitespace, leading quotes and
    trailing punctuation or quotes. An answer that is only punctuation (``?``, ``...``, ``。``) is kept whole
    (stripped of whitespace), so it never equals another answer, or an empty one, by losing all its characters.
    """
    a = answer.strip().lower()
    core = _LEADING.sub("", _TRAILING.sub("", a))
    return core or a


def exact_match(prediction: str, reference: str) -> bool:
    """Whether ``prediction`` answers ``reference`` exactly, up to case, surrounding whitespace, quotes and
    trailing punctuation; an empty prediction matches only an empty reference."""
    return normalize(prediction) == normalize(reference)


@dataclass
class EvalResult:
    """Exact-match accuracy and every prediction (``id``, ``prediction``, ``reference``, ``correct``)."""

    accuracy: float
    n: int
    correct: int
    predictions: list[dict] = field(default_factory=list)
    note: str | None = None  # how the generation budget met the reference answers (raised, or too short)

    def to_json(self) -> dict:
        out = {"accuracy": self.accuracy, "n": self.n, "correct": self.correct, "predictions": self.predictions}
        return {**out, "note": self.note} if self.note else out


AUTO_BUDGET_LIMIT = 64  # new tokens evaluate() grows its budget to, at most, for short reference answers


def answer_budget(loaded: Loaded, samples: list[Sample]) -> int:
    """New tokens the longest reference answer needs, its stop token included (the answer tokenized alone and
    after a space, as it follows the assistant's prefix: the longer of the two)."""
    return max(_answer_tokens(loaded, samples).values(), default=0) + 1


def _answer_tokens(loaded: Loaded, samples: list[Sample]) -> dict[str, int]:
    tok = loaded.processor.tokenizer
    refs = {s.messages[-1][1] for s in samples}
    return {r: max(len(tok(t, add_special_tokens=False)["input_ids"]) for t in (r, " " + r.lstrip())) for r in refs}


def evaluate(loaded: Loaded, samples: list[Sample], max_new_tokens: int = 16, batch_size: int = 8) -> EvalResult:
    """Exact match of greedy answers against the references. Generation stops at ``max_new_tokens``; when a
    reference answer needs more (its stop token included), the budget grows to fit it, up to
    ``AUTO_BUDGET_LIMIT`` tokens (short answers: a right answer is never cut short); longer references are
    left as they are (free-form answers, which exact match rarely scores). ``note`` says which happened."""
    lengths = _answer_tokens(loaded, samples)
    need = max(lengths.values(), default=0) + 1
    budget = max(max_new_tokens, need) if need <= AUTO_BUDGET_LIMIT else max_new_tokens
    preds = generate(loaded, samples, budget, batch_size)
    rows: list[dict[str, Any]] = []
    for s, p in zip(samples, preds):
        ref = s.messages[-1][1]
        rows.append({"id": s.id, "prediction": p, "reference": ref, "correct": exact_match(p, ref)})
    correct = sum(bool(r["correct"]) for r in rows)
    note = None
    if budget > max_new_tokens:
        note = (
            f"note: the longest reference answer takes {need - 1} tokens and the stop token, more than "
            f"max_new_tokens={max_new_tokens}: answers were generated up to {budget} tokens so that they can match "
            f"(raise eval.max_new_tokens / --max-new-tokens to set it yourself)"
        )
    elif need > budget:
        cut = sum(lengths[s.messages[-1][1]] + 1 > budget for s in samples)
        note = (
            f"note: {cut} of {len(samples)} reference answers are longer than max_new_tokens={max_new_tokens} "
            f"(the longest: {need - 1} tokens and the stop token): their answers are cut there and cannot match "
            f"exactly (raise eval.max_new_tokens / --max-new-tokens to score them)"
        )
    return EvalResult(correct / max(len(rows), 1), len(rows), correct, rows, note)


def format_predictions(result: EvalResult, k: int = 6) -> str:
    lines = [f"{'id':<14} {'reference':<20} {'prediction':<30} ok"]
    for r in result.predictions[:k]:
        lines.append(
            f"{str(r['id'])[:14]:<14} {r['reference'][:20]:<20} {r['prediction'][:30]!r:<30} {'✓' if r['correct'] else '✗'}"
        )
    return "\n".join(lines)
