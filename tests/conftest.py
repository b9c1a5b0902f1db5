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
    from lora_llava import thirdparty

    sink, thirdparty._SINK = thirdparty._SINK, None  # a library call, as the tests of its layout expect, even
    try:  # when an earlier test ran a CLI verb in this process (which routes third-party lines into the run)
        train(recipe, log=lambda *_: None)
    finally:
        thirdparty._SINK = sink
    return run


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """Tiny models run fastest on one thread, and stay fast when the CPUs are shared."""
    import torch

    torch.set_num_threads(1)
    yield


# -- fixtures shared across test modules ---------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> Path:
    """tmp_path/images with ok.png, plus an image outside the folder."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(images / "ok.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "outside.png")
    return images


@pytest.fixture(scope="module")
def aspect_data(tmp_path_factory):
    """One single-image sample per aspect ratio (wide, tall, square, tiny, large)."""
    root = tmp_path_factory.mktemp("aspects")
    sizes = [(64, 64), (100, 40), (30, 90), (200, 210), (17, 300), (96, 33)]
    import json

    from helpers import draw_shape

    from lora_llava.config.schema import DataSource
    from lora_llava.data.formats import read_source

    recs = []
    for i, (w, h) in enumerate(sizes):
        draw_shape(root / f"{i}.png", w, h)
        recs.append(
            {
                "id": f"{w}x{h}",
                "image": f"{i}.png",
                "conversations": [
                    {"from": "human", "value": "<image>\nWhat color is the shape?"},
                    {"from": "gpt", "value": "Red"},
                ],
            }
        )
    (root / "d.json").write_text(json.dumps(recs))
    samples, bad = read_source(DataSource(path=str(root / "d.json"), image_folder=str(root)))
    assert not bad
    return samples


@pytest.fixture(scope="module")
def assembled(tmp_path_factory):
    from lora_llava.backbones.assemble import assemble
    from lora_llava.config.schema import AssembleConfig

    out = tmp_path_factory.mktemp("asm")
    return {
        "mlp": assemble(
            AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2"), out / "mlp", log=print
        ),
        "linear": assemble(
            AssembleConfig(vision_encoder="tiny-clip", language_model="tiny-qwen2", projector="linear"),
            out / "linear",
            log=print,
        ),
    }


@pytest.fixture(scope="module")
def spec(tiny_path):
    from lora_llava.artifacts import resolve_backbone

    return resolve_backbone("tiny")


@pytest.fixture
def recipe(make_recipe):
    return make_recipe()


@pytest.fixture
def qlora(spec, recipe):
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters

    model, _ = load_base(spec, recipe.quantization)
    return attach_adapters(model, spec, recipe)


@pytest.fixture(scope="module")
def eval_samples(shapes):
    from lora_llava.config import DataSource
    from lora_llava.data.formats import read_source

    samples, bad = read_source(DataSource(path=str(shapes / "eval.json"), image_folder=str(shapes / "images")))
    assert not bad and len(samples) == 16
    return samples
