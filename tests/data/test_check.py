"""Checking a recipe's data: every bad sample listed, skipped samples in rejected.jsonl, over-length samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import GOOD_TURNS, conv, read_one

from lora_llava.config import load_recipe
from lora_llava.config.schema import DataSource
from lora_llava.data.chat import chat_format
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import read_source
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
    assert msg.startswith("3 of 9 train samples are bad (33.3%), over data.max_bad_fraction=0.2:")
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


def test_control_strings_in_text_are_bad_samples(tmp_path, folder, encoder):
    """A special token or a role marker typed into a turn would be tokenized as control, not text."""
    cases = {
        "eos-in-answer": conv("human: <image>\nWhere?", "gpt: The answer is </s> Up"),
        "bos-in-question": conv("human: <image>\n<s> Where?", "gpt: Up"),
        "pad": conv("human: <image>\nWhere?", "gpt: Up<pad>"),
        "role-marker": conv("human: <image>\nWhere? ASSISTANT: Up", "gpt: Down"),
        "marker-in-2nd-answer": conv("human: <image>\nQ", "gpt: A", "human: Q2", "gpt: USER: again"),
        "system": conv("system: Reply with </s>.", "human: <image>\nQ", "gpt: A"),
    }
    records = [{"id": k, "image": "ok.png", "conversations": v} for k, v in cases.items()]
    records.append({"id": "fine", "image": "ok.png", "conversations": conv("human: <image>\nUser: where?", "gpt: Up")})
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records))
    report = prepare_data(recipe_for(tmp_path, path, folder), encoder, enforce=False)
    reasons = {b.id: b.reason for b in report.bad}
    assert reasons == {
        "eos-in-answer": "answer 1 holds '</s>', the end-of-sequence token (the model would learn to stop there); "
        "remove it from the text",
        "bos-in-question": "question 1 holds '<s>', the beginning-of-sequence token; remove it from the text",
        "pad": "answer 1 holds '<pad>', the padding token; remove it from the text",
        "role-marker": "question 1 holds 'ASSISTANT:', a role marker of the vicuna_v1 chat format (it would fake a "
        "turn boundary); remove it from the text",
        "marker-in-2nd-answer": "answer 2 holds 'USER:', a role marker of the vicuna_v1 chat format (it would fake a "
        "turn boundary); remove it from the text",
        "system": "system holds '</s>', the end-of-sequence token (the model would learn to stop there); remove it "
        "from the text",
    }
    assert [s.id for s in report.train] == ["fine"]


def test_max_bad_fraction_judges_each_split_on_its_own(tmp_path, folder, encoder):
    good = [{"id": f"g{i}", "image": "ok.png", "conversations": GOOD_TURNS} for i in range(8)]
    bad = [{"id": f"b{i}", "image": "nope.png", "conversations": GOOD_TURNS} for i in range(3)]
    (tmp_path / "train.json").write_text(json.dumps(good + bad))  # 3 of 11 train: 27%
    evals = [{"id": f"e{i}", "image": "ok.png", "conversations": GOOD_TURNS} for i in range(40)]
    (tmp_path / "eval.json").write_text(json.dumps(evals))  # 3 of 51 overall would be 6%
    recipe = recipe_for(tmp_path, tmp_path / "train.json", folder, on_bad_sample="skip", max_bad_fraction=0.2)
    recipe.data.eval = [DataSource(path=str(tmp_path / "eval.json"), image_folder=str(folder))]
    with pytest.raises(UserError, match=r"^3 of 11 train samples are bad \(27.3%\), over data.max_bad_fraction=0.2"):
        prepare_data(recipe, encoder, tmp_path / "run")


def test_a_long_bad_sample_list_is_capped_and_written_whole(tmp_path, folder, encoder):
    records = [{"id": f"b{i}", "image": "nope.png", "conversations": GOOD_TURNS} for i in range(120)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    with pytest.raises(UserError) as e:
        prepare_data(recipe_for(tmp_path, tmp_path / "train.json", folder), encoder, tmp_path / "run")
    msg = str(e.value)
    assert msg.startswith("120 bad sample(s) of 120:")
    assert len([ln for ln in msg.splitlines() if "(id b" in ln]) == 50
    assert f"... and 70 more; all 120 in {tmp_path / 'run' / 'bad_samples.jsonl'}" in msg
    rows = (tmp_path / "run" / "bad_samples.jsonl").read_text().splitlines()
    assert [json.loads(r)["id"] for r in rows] == [f"b{i}" for i in range(120)]


def test_a_json_list_named_jsonl_says_rename_it(tmp_path, folder):
    (tmp_path / "d.jsonl").write_text(
        json.dumps([{"id": i, "conversations": GOOD_TURNS} for i in range(3000)], indent=1)
    )
    with pytest.raises(UserError) as e:
        read_source(DataSource(path=str(tmp_path / "d.jsonl"), image_folder=str(folder)))
    assert str(e.value) == (
        f"data file '{tmp_path / 'd.jsonl'}' is a JSON list (it starts with '['), not JSON lines\nhint: rename it to d.json"
    )
    (tmp_path / "d.json").write_text("\n".join(json.dumps({"id": i, "conversations": GOOD_TURNS}) for i in range(3)))
    with pytest.raises(UserError, match="hint: it holds one record a line: rename it to .jsonl"):
        read_source(DataSource(path=str(tmp_path / "d.json"), image_folder=str(folder)))
