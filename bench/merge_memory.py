"""Peak memory of `lora-llava merge` on a large random-init LLaVA: layer-by-layer fold vs a whole-model float32 fold.

Usage::

    python bench/merge_memory.py --hidden 2048 --layers 16 --intermediate 5632     # ~0.95B-parameter LM
    python bench/merge_memory.py --hidden 3072 --layers 26 --intermediate 8192     # ~3B

Builds a LLaVA (the tiny CLIP tower + a random-init LLaMA of the given shape, bf16 on disk), an adapter for
it (LoRA r=16 on every LM linear with non-zero weights, a changed projector), then merges it twice, each in
a fresh process whose peak resident memory (ru_maxrss) is read:

- ``layerwise``: lora_llava's merge (each LoRA layer dequantized to float32, its delta added, cast to bf16);
- ``whole``: the whole 4-bit model dequantized to float32, PEFT's merge_and_unload, then the cast (what a
  merge through ``model.dequantize(torch.float32)`` costs).

Prints the model's size in bf16 and float32 and both peaks. Not a test: it takes minutes and gigabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WHOLE = r"""
import sys, torch
from peft import PeftModel
from lora_llava.artifacts import open_artifact
from lora_llava.artifacts import resolve_backbone
from lora_llava.config.load import load_recipe
from lora_llava.model.loading import load_base
from lora_llava.model.trained_parts import restore_trained_parts
run, out = sys.argv[1:3]
art = open_artifact(run)
recipe = load_recipe(art.adapter_dir / "recipe.yaml")
spec = resolve_backbone(art.meta.backbone)
model, _ = load_base(spec, recipe.quantization, quantized=True)
model = model.dequantize(dtype=torch.float32) or model
restore_trained_parts(model, spec, art.adapter_dir)
model = PeftModel.from_pretrained(model.float(), art.adapter_dir).merge_and_unload().to(torch.bfloat16)
model.save_pretrained(out)
"""

LAYERWISE = r"""
import sys
from lora_llava.merging import merge
merge(sys.argv[1], sys.argv[2], verify_samples=[], log=lambda *a: None)
"""


def build(root: Path, hidden: int, layers: int, intermediate: int) -> Path:
    """The base LLaVA (bf16) and a run directory holding an adapter for it; returns the run directory."""
    import torch
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from lora_llava.artifacts import resolve_backbone
    from lora_llava.backbones.tiny import _vision_config, ensure_tiny
    from lora_llava.config import load_recipe
    from lora_llava.data.chat import format_for
    from lora_llava.layout import RunDir
    from lora_llava.model.loading import load_base, load_processor
    from lora_llava.model.saving import write_adapter
    from lora_llava.model.trainability import attach_adapters

    tiny = ensure_tiny("tiny")
    processor = load_processor(tiny)
    text = LlamaConfig(
        vocab_size=32000, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=max(hidden // 128, 1), num_key_value_heads=max(hidden // 128, 1),
    )  # fmt: skip
    config = LlavaConfig(
        vision_config=_vision_config(), text_config=text, image_token_id=4, projector_hidden_act="gelu"
    )
    torch.manual_seed(0)
    with torch.device("cpu"):
        torch.set_default_dtype(torch.bfloat16)
        model = LlavaForConditionalGeneration(config)
        torch.set_default_dtype(torch.float32)
    base = root / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    del model
    run = RunDir(root / "run")
    run.create()
    recipe = load_recipe({
        "backbone": str(base), "output_dir": str(run.path), "data": {"train": [{"path": "unused.json"}]},
        "quantization": {"compute_dtype": "bfloat16"}, "lora": {"r": 16}, "train": {"gradient_checkpointing": False},
    })  # fmt: skip
    spec = resolve_backbone(str(base))
    model, _ = load_base(spec, recipe.quantization)
    model = attach_adapters(model, spec, recipe)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "multi_modal_projector" in n:
                p.add_(torch.randn_like(p) * 0.01)
    fmt = format_for(spec.chat_format, processor.tokenizer)
    write_adapter(run.adapter, model, processor, spec, recipe, fmt, {"steps": 0})
    (root / "params.json").write_text(json.dumps({"params": params}))
    return run.path


# the child samples its anonymous memory (RSS minus file-backed pages: the checkpoint the loader maps
# stays resident as page cache, which the kernel can drop) and reports both peaks at exit
SAMPLER = """
import threading, time, psutil
_peak = [0]
def _sample():
    p = psutil.Process()
    while True:
        mi = p.memory_info(); _peak[0] = max(_peak[0], mi.rss - mi.shared); time.sleep(0.05)
threading.Thread(target=_sample, daemon=True).start()
"""
REPORT = "\nimport resource\nprint('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, _peak[0] // 1024)\n"


def peak(code: str, *args: str) -> tuple[float, float, float] | str:
    """(peak RSS GB, peak anonymous GB, seconds) of ``python -c code args`` in a fresh process, or why it failed."""
    t0 = time.time()
    run = subprocess.run([sys.executable, "-c", SAMPLER + code + REPORT, *args], capture_output=True, text=True)
    if run.returncode != 0:
        killed = run.returncode in (-9, 137)
        return f"failed (exit {run.returncode}{': killed, out of memory' if killed else ''})"
    rss_kb, anon_kb = next(map(int, ln.split()[1:]) for ln in run.stdout.splitlines() if ln.startswith("PEAK_KB"))
    return rss_kb / 1024**2, anon_kb / 1024**2, time.time() - t0


def _line(name: str, result: tuple[float, float, float] | str) -> str:
    if isinstance(result, str):
        return f"{name}: {result}"
    gb, anon, seconds = result
    return f"{name}: peak RSS {gb:.1f} GB, anonymous {anon:.1f} GB, {seconds:.0f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--build-only", metavar="DIR", help=argparse.SUPPRESS)  # the build, in its own process
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.build_only:
        build(Path(args.build_only), args.hidden, args.layers, args.intermediate)
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        root = Path(tmp)
        shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--intermediate", str(args.intermediate)]
        subprocess.run([sys.executable, __file__, "--build-only", str(root), *shape], check=True)
        params = json.loads((root / "params.json").read_text())["params"]
        run = root / "run"
        layerwise = peak(LAYERWISE, str(run), str(root / "merged-layerwise"))
        whole = peak(WHOLE, str(run), str(root / "merged-whole"))
    size = f"{params * 2 / 1024**3:.1f} GB in bf16, {params * 4 / 1024**3:.1f} GB in float32"
    print(f"model: {params / 1e9:.2f}B parameters: {size}")
    print(_line("layerwise merge (lora_llava), load check included", layerwise))
    print(_line("whole-model float32 merge", whole))
    print(f"machine: {os.cpu_count()} CPUs; python {sys.version.split()[0]}; command: {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
