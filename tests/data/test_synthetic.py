"""The offline synthetic dataset is deterministic and balanced."""

from __future__ import annotations

import json

from lora_llava.config.schema import DataSource
from lora_llava.data.formats import read_source


def test_synthetic_dataset_is_deterministic_and_balanced(tmp_path):
    from lora_llava.data.synthetic import COLORS, write_shapes_dataset

    a = write_shapes_dataset(tmp_path / "a", n_train=12, n_eval=16, seed=3)
    b = write_shapes_dataset(tmp_path / "b", n_train=12, n_eval=16, seed=3)
    c = write_shapes_dataset(tmp_path / "c", n_train=12, n_eval=16, seed=4)
    assert (a / "train.json").read_bytes() == (b / "train.json").read_bytes()
    assert (a / "eval.json").read_bytes() == (b / "eval.json").read_bytes()
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    referenced = {s["image"] for f in ("train.json", "eval.json") for s in json.loads((a / f).read_text())}
    assert len(referenced) == 28
    names = sorted(p.name for p in (a / "images").iterdir())
    assert referenced <= set(names) and names == sorted(p.name for p in (b / "images").iterdir())
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)
    evals = json.loads((a / "eval.json").read_text())
    answers = [s["conversations"][-1]["value"] for s in evals]
    assert sorted(answers) == sorted([c.capitalize() for c in COLORS] * 4)
    # every sample reads cleanly
    samples, bad = read_source(DataSource(path=str(a / "train.json"), image_folder=str(a / "images")))
    assert bad == [] and len(samples) == 12
