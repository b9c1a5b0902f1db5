"""Shared fixtures: the tiny backbone built once per session, a synthetic dataset, a recipe factory
and one short trained run reused by the artifact, merge, eval and CLI tests. Everything is offline."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest

warnings.filterwarnings("ignore", message=".*kernels.*")


@pytest.fixture(scope="session", autouse=True)
def _offline_cache(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["WANDB_MODE"] = "disabled"
    os.environ.setdefault("LORA_LLAVA_CACHE", str(tmp_path_factory.mktemp("lora_llava_cache")))
    yield


@pytest.fixture(scope="session")
def tiny_path(_offline_cache) -> Path:
    from lora_llava.backbones.tiny import ensure_tiny

    return ensure_tiny()


@pytest.fixture(scope="session")
def tiny_processor(tiny_path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_path)


@pytest.fixture(scope="session")
def shapes(tmp_path_factory) -> Path:
    from lora_llava.data.synthetic import write_shapes_dataset

    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), n_train=96, n_eval=16, seed=0)


def tiny_recipe(shapes: Path, output_dir: Path, **sections):
    """A Recipe on tiny + the shapes data; ``sections`` update the defaults key by key (or replace values)."""
    from lora_llava.config import load_recipe

    raw = {
        "backbone": "tiny",
        "output_dir": str(output_dir),
        "data": {
            "train": [{"path": str(shapes / "train.json"), "image_folder": str(shapes / "images")}],
            "eval": [{"path": str(shapes / "eval.json"), "image_folder": str(shapes / "images")}],
            "max_length": 256,
        },
        "quantization": {"compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {
            "max_steps": 2,
            "batch_size": 4,
            "grad_accum": 1,
            "learning_rate": 3e-3,
            "gradient_checkpointing": False,
            "logging_steps": 1,
            "warmup_ratio": 0.0,
        },
        "eval": {"batch_size": 16, "max_new_tokens": 4},
    }
    overrides = sections.pop("overrides", ())
    for k, v in sections.items():
        raw.setdefault(k, {})
        raw[k] = {**raw[k], **v} if isinstance(v, dict) else v
    return load_recipe(raw, list(overrides))


@pytest.fixture
def make_recipe(shapes, tmp_path):
    """make_recipe(**section_overrides) -> Recipe on tiny + shapes, writing into tmp_path/run."""

    def make(overrides: list[str] = (), **sections):
        return tiny_recipe(shapes, sections.pop("output_dir", tmp_path / "run"), overrides=overrides, **sections)

    return make


@pytest.fixture(scope="session")
def trained_run(shapes, tmp_path_factory, tiny_path) -> Path:
    """One short QLoRA run on tiny (shared, read-only for tests)."""
    from lora_llava.workflows import train

    run = tmp_path_factory.mktemp("trained") / "run"
    recipe = tiny_recipe(
        shapes,
        run,
        projector={"learning_rate": 3e-3},
        train={"max_steps": 40, "batch_size": 8, "logging_steps": 10, "warmup_ratio": 0.03},
    )
    train(recipe, log=lambda *_: None)
    return run


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and stay fast when the CPUs are shared."""
    import torch

    torch.set_num_threads(1)
    yield
