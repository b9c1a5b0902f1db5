"""GPU check of the whole CLI path at 7B scale: ``lora-llava train`` (the Trainer, its bf16 autocast, the step line
and metrics) and ``lora-llava merge`` (layerwise fold + verification) on a random-init LLaVA-1.5-7B.

Usage::

    python bench/gpu_train.py --out results/                 # on a CUDA machine: a few minutes
    python bench/gpu_train.py --dry-run --out /tmp/gpu-train  # anywhere: a tiny config on the CPU

The checkpoint has the exact llava-1.5-7b shape (lora_llava.plan.BUILTIN_CONFIGS: CLIP ViT-L/14-336, the MLP
projector, Vicuna-7B's LLaMA, vocabulary 32064) with the tiny backbone's tokenizer and a CLIP image processor at
336 px / 14 px patches (576 image tokens per image), so the offline shapes data trains through the real processor.
The run is the shipped ``llava-1.5-7b/qlora`` recipe with that backbone, the shapes data and ``train.max_steps``;
then ``lora-llava plan`` for the same recipe and ``lora-llava merge`` of the run. Writes ``gpu_train.json`` (each
command's exit status and seconds, the metrics rows, the plan, the merge report) and ``gpu_train.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent


def _gpu_check() -> Any:
    spec = importlib.util.spec_from_file_location("gpu_check", HERE / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build(folder: Path, dry_run: bool, device: str) -> Path:
    """The random-init checkpoint with the tiny tokenizer and a processor at the config's image size."""
    from lora_llava.backbones.tiny import ensure_tiny
    from lora_llava.model.loading import load_processor

    check = _gpu_check()
    processor = load_processor(ensure_tiny("tiny"))
    config = check.model_config(dry_run)
    config.image_token_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    v = config.vision_config
    processor.image_processor.size = {"shortest_edge": v.image_size}
    processor.image_processor.crop_size = {"height": v.image_size, "width": v.image_size}
    processor.patch_size = v.patch_size
    dtype = torch.float32 if dry_run else torch.bfloat16
    return check.build_checkpoint(folder, config, dtype, device, processor)


def command(args: list[str], log: Path, timeout: int) -> dict:
    """``python -m lora_llava ARGS``: exit status, seconds, output in ``log`` (its last lines printed)."""
    t0 = time.perf_counter()
    try:
        with log.open("w") as f:
            rc = subprocess.run([sys.executable, "-m", "lora_llava", *args], stdout=f, stderr=subprocess.STDOUT,
                                timeout=timeout).returncode  # fmt: skip
    except subprocess.TimeoutExpired:
        rc = 124
    seconds = round(time.perf_counter() - t0, 1)
    tail = log.read_text(errors="replace").splitlines()[-25:]
    print(f"$ lora-llava {' '.join(args)}\n" + "\n".join(tail) + f"\n(exit {rc}, {seconds} s)\n", flush=True)
    return {"args": args, "rc": rc, "seconds": seconds, "tail": tail}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--dry-run", action="store_true", help="a tiny config on the CPU")
    ap.add_argument("--steps", type=int, default=30, help="train.max_steps (default 30)")
    ap.add_argument("--work", default=os.environ.get("BENCH_DIR", "/tmp/gpu_train"), help="scratch folder")
    ap.add_argument("--no-merge", action="store_true")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    from lora_llava.data.synthetic import write_shapes_dataset

    data = work / "data"
    write_shapes_dataset(data)
    ckpt = build(work / "llava-1.5-7b-random", args.dry_run, device)
    run = work / "run"
    recipe = [
        "llava-1.5-7b/qlora", f"backbone={ckpt}", f"output_dir={run}", "data.max_length=1024",
        f"data.train=[{{path: {data / 'train.json'}, image_folder: {data / 'images'}}}]",
        f"train.max_steps={args.steps}", "train.logging_steps=5", "train.grad_accum=1", "train.save_steps=1000000",
    ]  # fmt: skip
    if args.dry_run:
        recipe += ["quantization.compute_dtype=float32", "train.batch_size=2"]
    result: dict[str, Any] = {
        "dry_run": args.dry_run,
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "CPU",
    }
    result["train"] = command(["train", *recipe, "--overwrite"], out / "train.log", 900)
    metrics = run / "metrics.jsonl"
    result["metrics"] = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    result["plan"] = command(["plan", *recipe], out / "plan.log", 300)
    (out / "gpu_train.json").write_text(json.dumps(result, indent=1))
    if not args.no_merge:
        result["merge"] = command(["merge", str(run), str(work / "merged")], out / "merge.log", 900)
    (out / "gpu_train.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
