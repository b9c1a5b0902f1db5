"""Generation shared by eval, merge verification and the quickstart.

Usage::

    loaded = load_model("runs/quickstart")          # a run dir, adapter dir, merged dir or backbone name
    answers = generate(loaded, samples, max_new_tokens=16, batch_size=8)
    result = evaluate(loaded, samples)              # {"accuracy", "n", "correct", "predictions": [...]}

Answers are greedy. Exact match compares answers with case, surrounding whitespace, quotes and
trailing punctuation normalized.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_llava.backbones.registry import BackboneSpec, resolve_backbone
from lora_llava.config.schema import QuantizationConfig
from lora_llava.data.chat import format_for
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import Sample
from lora_llava.errors import UserError
from lora_llava.model.load import ADAPTER_META, load_adapter_model, load_base


@dataclass
class Loaded:
    model: torch.nn.Module
    processor: object
    encoder: Encoder
    kind: str  # adapter | merged | backbone
    ref: str


def adapter_dir_of(ref: str | Path) -> Path | None:
    """The adapter directory of a run directory (or the adapter directory itself), else None."""
    p = Path(ref)
    for cand in (p / "adapter", p):
        meta = cand / ADAPTER_META
        if meta.is_file() and json.loads(meta.read_text()).get("format", "").startswith("lora_llava-adapter"):
            return cand
    return None


def _encoder(processor, fmt_name: str, pad_to_square: bool = False, system: str | None = None) -> Encoder:
    return Encoder(processor, format_for(fmt_name, processor.tokenizer, system), pad_to_square=pad_to_square)


def load_model(
    ref: str, dtype: torch.dtype | None = None, pad_to_square: bool | None = None, max_tiles: int | None = None
) -> Loaded:
    """Load a run/adapter dir (as trained), a merged/plain checkpoint dir, or a backbone name."""
    if ("/" in ref or Path(ref).is_absolute()) and not Path(ref).exists() and ref.startswith(("/", ".", "runs/")):
        raise UserError(
            f"no model at {ref!r}: the directory does not exist",
            hint="pass a run directory, its adapter/, a merged directory, or a backbone name",
        )
    adapter = adapter_dir_of(ref)
    if adapter is not None:
        model, processor, meta = load_adapter_model(adapter, dtype=dtype)
        return Loaded(
            model,
            processor,
            _encoder(processor, meta["chat_format"], meta.get("pad_to_square", False), meta.get("system_prompt", "")),
            "adapter",
            str(adapter),
        )
    path = Path(ref)
    if path.is_dir() and (path / "config.json").is_file():
        meta_path = path / ADAPTER_META
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
        spec = resolve_backbone(str(path))
        model, processor = load_base(
            spec, QuantizationConfig(load_in_4bit=False), quantized=False, dtype=dtype or _stored_dtype(path)
        )
        model.eval()
        return Loaded(
            model,
            processor,
            _encoder(
                processor,
                meta.get("chat_format", spec.chat_format),
                meta.get("pad_to_square", False),
                meta.get("system_prompt") if meta else None,
            ),
            "merged",
            ref,
        )
    spec: BackboneSpec = resolve_backbone(ref)
    q = QuantizationConfig(load_in_4bit=False, compute_dtype="float32" if not torch.cuda.is_available() else "bfloat16")
    model, processor = load_base(spec, q, quantized=False, dtype=dtype, max_tiles=max_tiles)
    model.eval()
    return Loaded(model, processor, _encoder(processor, spec.chat_format, bool(pad_to_square)), "backbone", ref)


def _stored_dtype(path: Path) -> torch.dtype:
    cfg = json.loads((path / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or cfg.get("text_config", {}).get("dtype") or "float32"
    return getattr(torch, name) if torch.cuda.is_available() else torch.float32


def _model_device(model) -> torch.device:
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


def normalize(answer: str) -> str:
    a = answer.strip().lower()
    a = re.sub(r"[\s\.\!\?\,\;\:\"'`]+$", "", a)
    return re.sub(r"^[\s\"'`]+", "", a)


def evaluate(loaded: Loaded, samples: list[Sample], max_new_tokens: int = 16, batch_size: int = 8) -> dict:
    preds = generate(loaded, samples, max_new_tokens, batch_size)
    rows = []
    for s, p in zip(samples, preds):
        ref = s.messages[-1][1]
        rows.append({"id": s.id, "prediction": p, "reference": ref, "correct": normalize(p) == normalize(ref)})
    correct = sum(r["correct"] for r in rows)
    return {"accuracy": correct / max(len(rows), 1), "n": len(rows), "correct": correct, "predictions": rows}


def format_predictions(result: dict, k: int = 6) -> str:
    lines = [f"{'id':<14} {'reference':<20} {'prediction':<30} ok"]
    for r in result["predictions"][:k]:
        lines.append(
            f"{str(r['id'])[:14]:<14} {r['reference'][:20]:<20} {r['prediction'][:30]!r:<30} {'✓' if r['correct'] else '✗'}"
        )
    return "\n".join(lines)
