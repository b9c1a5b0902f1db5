"""Checking a recipe's data: every bad sample listed, skipped samples in rejected.jsonl, over-length samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import GOOD_TURNS, conv, read_one

from lora_llava.config import load_recipe
from lora_llava.data.chat import chat_format
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.errors import UserError


def recipe_for(tmp_path: Path, train: Path, folder: Path, **data):
    return load_recipe(
        {
            "backbone": "tiny",
            "output_dir": str(tmp_path / "run"),
            "data": {"train": [{"path": str(train), "image_folder": str(folder)}], "max_length": 256, **data},
        }
    )


@pytest.fixture
def encoder(tiny_processor):
    return Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token, system=""))


GOOD = [{"id": f"good-{i}", "image": "ok.png", "conversations": GOOD_TURNS} for i in range(6)]


BAD = [
    {"id": "bad-missing", "image": "nope.png", "conversations": GOOD_TURNS},
    {"id": "bad-order", "image": "ok.png", "conversations": conv("gpt: Red", "human: What?")},
    {"id": "bad-empty", "image": "ok.png", "conversations": conv("human: What?", "gpt: ")},
]


BAD_REASONS = {
    "bad-missing": "image 'nope.png' not found in",
    "bad-order": "wrong role order at turn 0",
    "bad-empty": "an answer is empty",
}


def write_mixed(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD[:3] + BAD + GOOD[3:]))
    return path


def test_prepare_data_error_lists_every_bad_sample(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="error")
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("3 bad sample(s) of 9:\n")
    for sid, reason in BAD_REASONS.items():
        line = next(ln for ln in msg.splitlines() if f"(id {sid})" in ln)
        assert reason in line
    assert "good-" not in msg
    assert "data.on_bad_sample=skip" in msg
    assert not (tmp_path / "run" / "rejected.jsonl").exists()


def test_prepare_data_skip_writes_rejected(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="skip", max_bad_fraction=0.5)
    report = prepare_data(recipe, encoder, tmp_path / "run")
    assert [s.id for s in report.train] == [f"good-{i}" for i in range(6)]
    assert report.eval == []
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["bad-missing", "bad-order", "bad-empty"]
    assert [r["index"] for r in rows] == [3, 4, 5]
    for r in rows:
        assert BAD_REASONS[r["id"]] in r["reason"]
        assert r["source"] == str(tmp_path / "train.json")
    st = report.stats[0]
    assert (st.split, st.samples, st.bad) == ("train", 6, 3)
    assert set(report.lengths.values()) == {33}  # 16 image tokens + 17 text tokens, as `check` reports for shapes
    assert st.tokens == 6 * 33
    summary = report.summary()
    assert "lengths (tokens, after image expansion): min 33, median 33, max 33; data.max_length 256" in summary


def test_prepare_data_too_many_bad_raises(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="skip", max_bad_fraction=0.2)
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("3 of 9 samples are bad (33.3%), over data.max_bad_fraction=0.2:")
    assert all(f"(id {sid})" in msg for sid in BAD_REASONS)
    assert len((tmp_path / "run" / "rejected.jsonl").read_text().splitlines()) == 3


def test_prepare_data_reports_over_length_sample_with_token_count(tmp_path, folder, encoder):
    long_q = "What color is the shape in the image? " * 6
    data = GOOD[:2] + [{"id": "long", "image": "ok.png", "conversations": conv(f"human: {long_q.strip()}", "gpt: Red")}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    recipe = recipe_for(tmp_path, path, folder, max_length=40)
    (long_sample,), _ = read_one(folder, data[2])
    n = encoder.length(long_sample)
    assert n == 81
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder)
    assert f"sample 2 (id long): {n} tokens after image expansion, over data.max_length=40" in str(err.value)
    assert str(err.value).startswith("1 bad sample(s) of 3:")


def test_prepare_data_without_usable_training_samples(tmp_path, folder, encoder):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(BAD[:1]))
    recipe = recipe_for(tmp_path, path, folder, on_bad_sample="skip", max_bad_fraction=1.0)
    with pytest.raises(UserError, match="no usable training samples"):
        prepare_data(recipe, encoder, tmp_path / "run")
