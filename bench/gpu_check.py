"""GPU check: QLoRA and 16-bit LoRA training throughput, peak memory and MFU on a random-init LLaVA-1.5-7B.

Usage::

    python bench/gpu_check.py --out results/                 # on a CUDA machine: about 5 minutes
    python bench/gpu_check.py --dry-run --out /tmp/gpu-check  # anywhere: a tiny config on the CPU, seconds

A random-init model with the exact llava-1.5-7b configuration (lora_llava.plan.BUILTIN_CONFIGS: CLIP
ViT-L/14-336, the GELU MLP projector, Vicuna-7B's LLaMA shape, vocabulary 32064) is saved in bf16 to a
scratch folder and loaded the way ``lora-llava train`` loads it (``load_base``: NF4 language model, 16-bit
vision tower, projector and LM head; ``attach_adapters``: LoRA r=128 on every LM linear, projector in float32,
gradient checkpointing as the recipe says), with lora_llava's optimizer (``GuardedAdamW`` over
``optimizer_groups``). Three cases of the llava-1.5-7b/qlora recipe, each on a fresh model:

- ``qlora-b1``: QLoRA, micro-batch 1 x 2048 tokens;
- ``qlora-b4``: QLoRA, micro-batch 4 x 2048 tokens (the recipe's batch);
- ``lora16-b4``: 16-bit LoRA (``quantization.load_in_4bit=false``), micro-batch 4 x 2048 tokens.

Each sample is one image (576 image tokens) and 1472 text tokens, the last 512 of them supervised. Per case:
tokens/s over the timed steps (after warm-up), peak allocated and reserved CUDA memory, the memory planner's
estimate for the same recipe (``plan_memory``; its error against the measured peak), and the model-FLOPs
utilisation against a bf16 matmul peak measured on the same card (8192^3 matmuls). Model FLOPs per step
(stated in the output): the language model's matmuls 2·N per token forward and 2·N backward (input
gradients only: the base is frozen; LoRA adds 6 per LoRA weight per token), attention 4·L·H·T² forward and
8·L·H·T² backward per sample (non-causal count), the vision tower 2·N_vision per patch forward only, the
projector 6·N_proj per patch; gradient checkpointing's recomputation is not counted (it is not model work).

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. Needs torch, transformers (5.17 or newer), peft,
accelerate and bitsandbytes; no network. ``--dry-run`` runs the same code on a tiny config on the CPU
(tests/bench/test_gpu_check.py runs it, so the script cannot rot).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CASES = (("qlora-b1", True, 1), ("qlora-b4", True, 4), ("lora16-b4", False, 4))


def model_config(dry_run: bool) -> Any:
    """The exact llava-1.5-7b configuration, or for a dry run a tiny one of the same shape."""
    from lora_llava.plan import BUILTIN_CONFIGS, _config_of, _llava_config

    known = BUILTIN_CONFIGS["llava-hf/llava-1.5-7b-hf"]
    text, vision = dict(known["text"]), dict(known["vision"])
    if dry_run:
        text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, vocab_size=640)  # fmt: skip
        vision.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      image_size=32, patch_size=8)  # fmt: skip
    config = _llava_config("llava", _config_of(text), _config_of(vision), -2, "default")
    config.image_token_id = 4 if dry_run else 32000
    return config


def build_checkpoint(folder: Path, config: Any, dtype: torch.dtype, device: str, processor: Any = None) -> Path:
    """A random-init checkpoint of ``config`` in ``dtype``, with ``processor`` (default: the tiny backbone's, for
    loading) given the Vicuna chat template."""
    from transformers import LlavaForConditionalGeneration

    from lora_llava.backbones.tiny import ensure_tiny
    from lora_llava.data.chat import chat_format
    from lora_llava.model.loading import load_processor

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    processor = processor or load_processor(ensure_tiny("tiny"))
    processor.chat_template = chat_format("vicuna_v1").jinja
    processor.save_pretrained(folder)
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def recipe_for(path: Path, quantized: bool, batch: int, seq: int, dtype: str) -> Any:
    from lora_llava.config.load import load_recipe
    from lora_llava.recipes import recipe_path

    return load_recipe(recipe_path("llava-1.5-7b/qlora"), [
        f"backbone={path}", f"output_dir={path.parent / 'run'}", f"data.max_length={seq}",
        f"quantization.load_in_4bit={'true' if quantized else 'false'}", f"quantization.compute_dtype={dtype}",
        f"train.batch_size={batch}", "lora.dropout=0.05",
    ])  # fmt: skip


def make_batch(config: Any, batch: int, seq: int, device: str, dtype: torch.dtype) -> dict:
    v = config.vision_config
    n_img = (v.image_size // v.patch_size) ** 2
    ids = torch.randint(10, config.text_config.vocab_size, (batch, seq), device=device)
    ids[:, 1 : 1 + n_img] = config.image_token_id
    labels = torch.full_like(ids, -100)
    supervised = min(512, seq // 4)
    labels[:, -supervised:] = ids[:, -supervised:]
    pixels = torch.randn(batch, 3, v.image_size, v.image_size, device=device, dtype=dtype)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "pixel_values": pixels}


def model_flops(model: Any, config: Any, batch: int, seq: int) -> tuple[float, str]:
    """Model FLOPs of one training step and the formula's terms."""
    from lora_llava.model.trainability import get_module

    def count(module: torch.nn.Module, lora: bool | None = None) -> int:
        total = 0
        for n, p in module.named_parameters():
            if lora is not None and ("lora_" in n) != lora:
                continue
            total += p.numel() * (2 if type(p).__name__ == "Params4bit" else 1)
        return total

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = base.model.language_model
    embed = lm.embed_tokens.weight.numel()
    n_lm = count(lm, lora=False) - embed + base.lm_head.weight.numel()
    n_lora = count(lm, lora=True)
    n_vis = count(get_module(model, "model.vision_tower"))
    n_proj = count(get_module(model, "model.multi_modal_projector"))
    t = config.text_config
    v = config.vision_config
    patches = (v.image_size // v.patch_size) ** 2
    tokens = batch * seq
    attention = 12 * t.num_hidden_layers * t.hidden_size * seq * seq * batch
    flops = 4 * n_lm * tokens + 6 * n_lora * tokens + attention + 2 * n_vis * (patches + 1) * batch
    flops += 6 * n_proj * patches * batch
    terms = (f"4*{n_lm / 1e9:.3f}B LM params*{tokens} tokens + 6*{n_lora / 1e6:.1f}M LoRA*{tokens} + attention "
             f"12*L*H*T^2*B={attention / 1e12:.2f}T + vision 2*{n_vis / 1e6:.0f}M*{patches + 1}*{batch} + projector "
             f"6*{n_proj / 1e6:.1f}M*{patches}*{batch}")  # fmt: skip
    return float(flops), terms


def matmul_peak(device: str, dtype: torch.dtype, size: int, repeats: int) -> float:
    """Measured dense matmul FLOP/s (best of ``repeats`` timings of 10 matmuls)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 10 * 2 * size**3 / best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Phases:
    """CUDA memory through one training step: allocated before it, and per phase (forward, backward, optimizer
    step) the peak allocated and reserved during the phase and what is still allocated at its end."""

    def __init__(self) -> None:
        torch.cuda.synchronize()
        self.before = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())  # the earlier steps' peaks
        self.result: dict[str, dict[str, int]] = {"before": {"allocated": torch.cuda.memory_allocated()}}
        torch.cuda.reset_peak_memory_stats()

    def __call__(self, phase: str) -> None:
        torch.cuda.synchronize()
        self.result[phase] = {
            "peak": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved(),
            "allocated": torch.cuda.memory_allocated(),
        }  # fmt: skip
        torch.cuda.reset_peak_memory_stats()

    def peaks(self) -> tuple[int, int]:
        """(peak allocated, peak reserved) over every step."""
        phases = [p for p in self.result.values() if "peak" in p]
        return (
            max([self.before[0]] + [p["peak"] for p in phases]),
            max([self.before[1]] + [p["reserved"] for p in phases]),
        )


def run_case(path: Path, config: Any, name: str, quantized: bool, batch: int, args: argparse.Namespace) -> dict:
    from transformers import set_seed

    from lora_llava.artifacts import resolve_backbone
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters
    from lora_llava.plan import plan_memory
    from lora_llava.training.loss import supervised_loss
    from lora_llava.training.optim import GuardedAdamW, optimizer_groups

    device = args.device
    recipe = recipe_for(path, quantized, batch, args.seq, args.dtype)
    spec = resolve_backbone(str(path))
    gc.collect()  # the previous case's model (PEFT wrappers hold reference cycles) is gone before this one loads
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    set_seed(0)
    t_load = time.perf_counter()
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    model.train()
    load_s = time.perf_counter() - t_load
    opt = GuardedAdamW(optimizer_groups(model, spec, recipe), lr=2e-4)
    dtype = getattr(torch, args.dtype)
    inputs = make_batch(config, batch, args.seq, device, dtype)
    times: list[float] = []
    losses: list[float] = []
    mark = None
    for i in range(args.warmup + args.steps + 1):  # the last step (untimed, CUDA only) measures memory by phase
        if i == args.warmup + args.steps:
            if device != "cuda":
                break
            mark = Phases()
        sync(device)
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=device == "cuda"):
            # the loss training computes: logits only at the supervised positions (train.supervised_logits)
            loss = supervised_loss(model, inputs) if recipe.train.supervised_logits else model(**inputs).loss
        if mark:
            mark("forward")
        loss.backward()
        if mark:
            mark("backward")
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if mark:
            mark("optimizer step")
            break
        losses.append(float(loss.detach()))
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = sorted(times)[len(times) // 2]
    flops, terms = model_flops(model, config, batch, args.seq)
    out: dict[str, Any] = {
        "case": name, "quantized": quantized, "batch": batch, "seq": args.seq, "load_s": round(load_s, 1),
        "step_s": step, "tokens_per_s": batch * args.seq / step, "flops_per_step": flops, "flop_terms": terms,
        "achieved_flops": flops / step, "losses": losses,
    }  # fmt: skip
    if device == "cuda":
        assert mark is not None
        out["peak_allocated"], out["peak_reserved"] = mark.peaks()
        out["phases"] = mark.result
    per_sample = float((inputs["labels"][:, 1:] != -100).sum()) / batch
    plan = plan_memory(recipe, device=device, seq_len=args.seq, supervised=per_sample)
    out["plan_categories"] = dict(plan.categories)
    out["plan_peak_at"] = plan.peak_at
    out["plan_tensors"] = plan.tensors
    out["plan_total"] = plan.total
    if "peak_allocated" in out:
        out["plan_error"] = (plan.tensors - out["peak_allocated"]) / out["peak_allocated"]
    del model, opt, inputs
    return out


def markdown(result: dict) -> str:
    gib = 1024**3
    lines = [
        f"# GPU check ({'dry run, CPU' if result['dry_run'] else result['device_name']})",
        "",
        f"{result['versions']}; bf16 matmul peak measured: {result['matmul_peak'] / 1e12:.1f} TFLOP/s "
        f"({result['matmul_size']}^3, {result['matmul_dtype']})",
        "",
        "| case | batch x tokens | s/step | tokens/s | peak allocated | peak reserved | plan (tensors) | plan error | MFU |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in result["cases"]:
        alloc = f"{c['peak_allocated'] / gib:.2f} GiB" if "peak_allocated" in c else "-"
        res = f"{c['peak_reserved'] / gib:.2f} GiB" if "peak_reserved" in c else "-"
        err = f"{c['plan_error']:+.1%}" if "plan_error" in c else "-"
        mfu = c["achieved_flops"] / result["matmul_peak"]
        lines.append(
            f"| {c['case']} | {c['batch']} x {c['seq']} | {c['step_s']:.3f} | {c['tokens_per_s']:.0f} | {alloc} | {res} "
            f"| {c['plan_tensors'] / gib:.2f} GiB | {err} | {mfu:.1%} |"
        )
    phased = [c for c in result["cases"] if c.get("phases")]
    if phased:
        lines += ["", "Memory through one step (allocated; peak within the phase / still allocated at its end):", "",
                  "| case | before | forward | backward | optimizer step | plan: peak at | plan categories |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for c in phased:
            ph = c["phases"]
            cells = [f"{ph['before']['allocated'] / gib:.2f}"]
            cells += [
                f"{ph[k]['peak'] / gib:.2f} / {ph[k]['allocated'] / gib:.2f}"
                for k in ("forward", "backward", "optimizer step")
            ]
            cats = ", ".join(f"{k} {v / gib:.2f}" for k, v in c["plan_categories"].items())
            lines.append(f"| {c['case']} | " + " | ".join(cells) + f" | {c['plan_peak_at']} | {cats} |")
        lines += ["", "(GiB)"]
    lines += ["", "Model FLOPs per step: " + "; ".join(f"{c['case']}: {c['flop_terms']}" for c in result["cases"])]
    lines += ["", f"command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    import sys

    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json and gpu_check.md")
    ap.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU (seconds)")
    ap.add_argument("--steps", type=int, help="timed steps per case (default 5; dry run 1)")
    ap.add_argument("--warmup", type=int, help="untimed steps per case (default 2; dry run 1)")
    ap.add_argument("--cases", nargs="+", default=[c[0] for c in CASES], choices=[c[0] for c in CASES])
    args = ap.parse_args(argv)
    args.device = "cpu" if args.dry_run else "cuda"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check")
    args.steps = args.steps or (1 if args.dry_run else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 2)
    args.seq = 64 if args.dry_run else 2048
    args.dtype = "float32" if args.dry_run else "bfloat16"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lora_llava.model.loading import quiet_transformers

    quiet_transformers()
    config = model_config(args.dry_run)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import peft
    import transformers

    versions = f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"
    try:
        import bitsandbytes

        versions += f", bitsandbytes {bitsandbytes.__version__}"
    except ImportError:
        pass
    mm_dtype = torch.float32 if args.dry_run else torch.bfloat16
    size = 256 if args.dry_run else 8192
    result: dict = {
        "dry_run": args.dry_run,
        "device_name": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({platform.machine()})",
        "versions": versions,
        "matmul_peak": matmul_peak(args.device, mm_dtype, size, 3 if args.dry_run else 5),
        "matmul_size": size,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "command": "python bench/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        path = build_checkpoint(Path(tmp) / "llava-1.5-7b-random", config, getattr(torch, args.dtype), args.device)
        for name, quantized, batch in CASES:
            if name in args.cases:
                result["cases"].append(run_case(path, config, name, quantized, batch, args))
                (out / "gpu_check.json").write_text(json.dumps(result, indent=1))  # partial results survive a timeout
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    (out / "gpu_check.md").write_text(markdown(result))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
