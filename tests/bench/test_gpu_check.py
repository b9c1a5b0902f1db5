"""bench/gpu_check.py's CPU dry run: the GPU script's whole path (random-init checkpoint, lora_llava's loader,
QLoRA and 16-bit LoRA steps, FLOP count, the planner's estimate, JSON + markdown) on a tiny config, so the
script cannot rot while no GPU is at hand."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dry_run_writes_every_case(tmp_path, capsys):
    gpu_check = _gpu_check()
    result = gpu_check.main(["--dry-run", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    md = (tmp_path / "gpu_check.md").read_text()
    assert saved["dry_run"] and [c["case"] for c in saved["cases"]] == ["qlora-b1", "qlora-b4", "lora16-b4"]
    assert saved["matmul_peak"] > 0
    for case in saved["cases"]:
        assert case["tokens_per_s"] > 0 and case["step_s"] > 0 and case["flops_per_step"] > 0
        assert all(math.isfinite(x) for x in case["losses"])
        assert case["plan_tensors"] > 0 and "LM params" in case["flop_terms"]
    by = {c["case"]: c for c in saved["cases"]}
    # four times the tokens: about four times the model FLOPs; the 16-bit base holds more weight bytes
    assert 3.5 < by["qlora-b4"]["flops_per_step"] / by["qlora-b1"]["flops_per_step"] <= 4.0
    assert by["lora16-b4"]["plan_tensors"] > by["qlora-b4"]["plan_tensors"]
    assert "| qlora-b4 | 4 x 64 |" in md and "MFU" in md and "dry run, CPU" in md
    assert result["cases"] == saved["cases"]


def test_the_real_config_is_llava_15_7b():
    config = _gpu_check().model_config(dry_run=False)
    t, v = config.text_config, config.vision_config
    assert (t.hidden_size, t.intermediate_size, t.num_hidden_layers, t.vocab_size) == (4096, 11008, 32, 32064)
    assert (v.hidden_size, v.num_hidden_layers, v.image_size, v.patch_size) == (1024, 24, 336, 14)


def test_gpu_train_dry_run_trains_plans_and_merges(tmp_path):
    """bench/gpu_train.py's CPU dry run: the CLI path it runs on a GPU (train, plan, merge) on a tiny config."""
    spec = importlib.util.spec_from_file_location("gpu_train", REPO / "bench" / "gpu_train.py")
    gpu_train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_train)
    out = tmp_path / "out"
    result = gpu_train.main(["--dry-run", "--out", str(out), "--steps", "2", "--work", str(tmp_path / "work")])
    assert [result[k]["rc"] for k in ("train", "plan", "merge")] == [0, 0, 0]
    saved = json.loads((out / "gpu_train.json").read_text())
    assert saved["metrics"][0]["step"] == 1 and "tokens_per_s" in saved["metrics"][0]
    assert "gpu_memory_gib" not in saved["metrics"][0]  # the CPU has no GPU peak to report
    assert any("memory plan:" in line for line in saved["plan"]["tail"])
    assert (tmp_path / "work" / "merged" / "config.json").exists()
