"""Mixtures: seeded draws, repeats, eval split, prompt styles, over-length policies, histograms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from lora_llava.cli.main import main
from lora_llava.config import load_recipe
from lora_llava.config.schema import DataSource
from lora_llava.data.budget import first_exchanges, fit_sample, histogram, measure
from lora_llava.data.chat import chat_format
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import read_source
from lora_llava.data.mixture import select_indices
from lora_llava.data.prompts import apply_prompt_style
from lora_llava.errors import UserError

N_IMAGE_TOKENS = 16  # tiny: (32 / 8)^2


def conv(*turns: str) -> list[dict]:
    return [{"from": t.split(": ", 1)[0], "value": t.split(": ", 1)[1]} for t in turns]


def qa(i: int, n_exchanges: int = 1, image: str | None = "red.png") -> dict:
    turns = []
    for k in range(n_exchanges):
        turns += [f"human: Question {k} about sample {i}?", f"gpt: Answer {k}."]
    rec = {"id": f"s{i}", "conversations": conv(*turns)}
    if image:
        rec["image"] = image
    return rec


@pytest.fixture
def root(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(tmp_path / "images" / "red.png")
    Image.new("RGB", (48, 40), (30, 60, 220)).save(tmp_path / "images" / "blue.png")
    return tmp_path


@pytest.fixture
def encoder(tiny_processor) -> Encoder:
    return Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token))


def recipe(root: Path, sources: list[dict], **data):
    for s in sources:
        s.setdefault("image_folder", str(root / "images"))
    raw = {"backbone": "tiny", "output_dir": str(root / "run"), "data": {"train": sources, "max_length": 256, **data}}
    return load_recipe(raw)


def write(root: Path, name: str, records: list[dict]) -> str:
    (root / name).write_text(json.dumps(records))
    return str(root / name)


def test_source_draws_are_seeded_and_sized():
    src = DataSource(path="a.json", fraction=0.25)
    a = select_indices(40, src, seed=1)
    assert len(a) == 10 and a == sorted(a) and len(set(a)) == 10
    assert select_indices(40, src, seed=1) == a
    assert select_indices(40, src, seed=2) != a
    assert select_indices(40, DataSource(path="a.json", max_samples=7), seed=1) == select_indices(
        40, DataSource(path="a.json", max_samples=7), seed=1
    )
    assert len(select_indices(40, DataSource(path="a.json", fraction=0.5, max_samples=7), seed=1)) == 7
    assert select_indices(5, DataSource(path="a.json", max_samples=9), seed=1) == [0, 1, 2, 3, 4]
    assert select_indices(40, DataSource(path="a.json"), seed=1) == list(range(40))
    assert len(select_indices(3, DataSource(path="a.json", fraction=0.01), seed=1)) == 1  # never zero


def test_mixture_with_fraction_repeats_and_eval_split_is_reproducible(root, encoder):
    a = write(root, "a.json", [qa(i) for i in range(6)])
    b = write(root, "b.json", [qa(100 + i, image=None) for i in range(8)])
    sources = [{"path": a, "repeats": 2}, {"path": b, "fraction": 0.5}]

    def run(seed: int, split=None):
        rep = prepare_data(recipe(root, [dict(s) for s in sources], seed=seed, eval_split=split), encoder)
        return rep, [s.id for s in rep.train], [s.id for s in rep.eval]

    rep, train, evals = run(7)
    assert evals == [] and len(train) == 6 * 2 + 4
    assert sorted(train[:12]) == sorted([f"s{i}" for i in range(6)] * 2)
    assert len(set(train[12:])) == 4 and all(t.startswith("s1") for t in train[12:])
    assert run(7)[1] == train and run(8)[1] != train  # same seed, same draw
    rows = {r.source: r for r in rep.mixture}
    assert (rows[a].records, rows[a].used, rows[a].repeats, rows[a].samples) == (6, 6, 2, 12)
    assert (rows[b].records, rows[b].used, rows[b].repeats, rows[b].samples) == (8, 4, 1, 4)
    assert rows[a].sample_share == pytest.approx(12 / 16) and rows[b].sample_share == pytest.approx(4 / 16)
    sup = {s.id: rep.supervised[id(s)] for s in rep.train}
    sup_a, sup_b = 2 * sum(sup[f"s{i}"] for i in range(6)), sum(sup[t] for t in train[12:])
    assert rows[a].token_share == pytest.approx(sup_a / (sup_a + sup_b))
    summary = rep.summary()
    assert "mixture (seed 7): 16 training samples" in summary
    assert f"  {a}  llava           6       6       2       12  75.0%" in summary

    rep, train, evals = run(7, split=3)
    assert len(evals) == 3 and rep.eval_split == 3
    assert not set(evals) & set(train)  # a carved sample and its repeats are gone from training
    assert len(train) == 16 - sum(2 if e in {f"s{i}" for i in range(6)} else 1 for e in evals)
    assert run(7, split=3)[2] == evals and run(9, split=3)[2] != evals
    assert "eval split: 3 samples carved from the training mixture (seed 7)" in rep.summary()
    assert len(run(7, split=0.3)[2]) == 3  # 0.3 of the 10 unique training samples
    with pytest.raises(UserError, match="data.eval_split=10 would take all 10 usable training samples"):
        run(7, split=10)


def test_eval_split_and_fraction_bounds_are_recipe_errors(root):
    with pytest.raises(UserError) as err:
        recipe(root, [{"path": "a.json", "fraction": 0.0}], eval_split=1.5)
    msg = str(err.value)
    assert "data.eval_split: a fraction must be between 0 and 1 (exclusive), got 1.5; or give a count" in msg
    assert "data.train.0.fraction: 0 would use no sample" in msg
    with pytest.raises(UserError, match="data.eval_split: a number of samples must be >= 1, got 0"):
        recipe(root, [{"path": "a.json"}], eval_split=0)


def test_short_answer_style_goes_on_every_human_turn_once(root):
    messages = [("system", "Be brief."), ("user", "<image>\nWhat is it?"), ("assistant", "A cat"), ("user", "Color? ")]
    messages.append(("assistant", "Orange"))
    styled = apply_prompt_style(messages, "short_answer")
    assert styled == [
        ("system", "Be brief."),
        ("user", "<image>\nWhat is it?\nAnswer the question using a single word or phrase."),
        ("assistant", "A cat"),
        ("user", "Color?\nAnswer the question using a single word or phrase."),
        ("assistant", "Orange"),
    ]
    assert apply_prompt_style(styled, "short_answer") == styled  # already styled data is not doubled
    assert apply_prompt_style(messages, "plain") is messages
    mc = apply_prompt_style([("user", "A or B?"), ("assistant", "A")], "multiple_choice")
    assert mc[0] == ("user", "A or B?\nAnswer with the option's letter from the given choices directly.")
    path = write(root, "vqa.json", [qa(0, n_exchanges=2)])
    (sample,), _ = read_source(DataSource(path=path, image_folder=str(root / "images"), prompt_style="short_answer"))
    assert [t for r, t in sample.messages if r == "user"] == [
        "<image>\nQuestion 0 about sample 0?\nAnswer the question using a single word or phrase.",
        "Question 1 about sample 0?\nAnswer the question using a single word or phrase.",
    ]


def _read(root: Path, records: list[dict]):
    samples, bad = read_source(DataSource(path=write(root, "d.json", records), image_folder=str(root / "images")))
    assert bad == []
    return samples


def test_truncate_turns_keeps_whole_leading_exchanges_and_their_images(root, encoder):
    rec = {
        "id": "multi",
        "image": ["red.png", "blue.png"],
        "conversations": conv(
            "system: Be brief.",
            "human: <image>\nFirst?",
            "gpt: One.",
            "human: <image>\nSecond picture, what color is it?",
            "gpt: Blue.",
            "human: And the first one again, what color is it?",
            "gpt: Red.",
        ),
    }
    (s,) = _read(root, [rec])
    one, two = first_exchanges(s, 1), first_exchanges(s, 2)
    assert [len(one.images), len(two.images)] == [1, 2]
    (n1, _), (n2, _), (n3, _) = measure(encoder, one), measure(encoder, two), measure(encoder, s)
    assert n1 < n2 < n3

    fit = fit_sample(encoder, s, n2, "truncate_turns")  # room for two exchanges, not three
    assert (fit.action, fit.length, fit.full_length, fit.kept_turns) == ("truncated", n2, n3, 5)
    assert fit.sample.messages == s.messages[:5] and fit.sample.images == s.images
    fit = fit_sample(encoder, s, n2 - 1, "truncate_turns")  # only the first exchange (and its image) fits
    assert fit.sample.messages == s.messages[:3] and fit.sample.images == s.images[:1]
    item = encoder.encode(fit.sample)
    assert len(item["input_ids"]) == n1 == fit.length
    assert int((item["input_ids"] == encoder.image_token_id).sum()) == N_IMAGE_TOKENS  # the kept image, whole
    assert item["pixel_values"].shape[0] == 1
    assert fit.sample.messages[-1][0] == "assistant" and fit.supervised == sum(int(x != -100) for x in item["labels"])
    assert fit_sample(encoder, s, n1 - 1, "truncate_turns").action == "over"  # first exchange alone too long
    assert fit_sample(encoder, s, n1 - 1, "drop").action == "over"
    assert fit_sample(encoder, s, n2, "drop").action == "over"
    assert fit_sample(encoder, s, n3, "drop").action == "ok"


def test_overlength_policies_in_the_report_and_rejected_file(root, encoder):
    long_q = "Question with many many words " * 8
    records = [qa(0), qa(1, n_exchanges=3), {"id": "huge", "conversations": conv(f"human: {long_q}", "gpt: A.")}]
    path = write(root, "d.json", records)
    samples = _read(root, records)
    lengths = [measure(encoder, s)[0] for s in samples]
    limit = lengths[0] + 1  # sample 0 fits, 1 fits after cutting turns, 'huge' never
    assert lengths[1] > limit and lengths[2] > limit
    expected_counts = f"over data.max_length={limit}: 2 sample(s); overlength=bad_sample: 2 bad, drop: 2 dropped"

    rep = prepare_data(
        recipe(root, [{"path": path}], max_length=limit, overlength="truncate_turns"), encoder, root / "r"
    )
    assert [s.id for s in rep.train] == ["s0", "s1"] and rep.bad == []
    assert rep.train[1].messages == samples[1].messages[:2] and rep.length_of(rep.train[1]) <= limit
    assert (rep.stats[0].truncated, rep.stats[0].dropped) == (1, 1)
    assert sorted(rep.full_lengths) == sorted(lengths)
    line = rep.overlength_line()
    assert (
        line
        == f"{expected_counts}, truncate_turns: 1 shortened + 1 dropped (first exchange too long); using truncate_turns"
    )
    rows = [json.loads(x) for x in (root / "r" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["id"], r["index"]) for r in rows] == [("huge", 2)]
    assert rows[0]["reason"] == (
        f"{lengths[2]} tokens after image expansion, over data.max_length={limit}; first exchange alone is too long"
    )

    rep = prepare_data(recipe(root, [{"path": path}], max_length=limit, overlength="drop"), encoder, root / "d")
    assert [s.id for s in rep.train] == ["s0"] and [b.id for b in rep.dropped] == ["s1", "huge"]
    assert rep.overlength_line().endswith(
        "truncate_turns: 1 shortened + 1 dropped (first exchange too long); using drop"
    )
    with pytest.raises(UserError, match=r"^2 bad sample\(s\) of 3:"):  # bad_sample (default) + on_bad_sample=error
        prepare_data(recipe(root, [{"path": path}], max_length=limit), encoder)


def test_histogram_counts_every_length_once():
    text = histogram([1, 5, 8, 9, 16, 17, 40], max_length=16, bins=4, width=6)
    assert text.splitlines() == [
        "  tokens   samples",
        "  1-4            1  ###",
        "  5-8            2  ######",
        "  9-12           1  ###",
        "  13-16          1  ###",
        "  >16            2  ######",
    ]


def test_duplicate_ids_are_warned_in_the_report(root, encoder):
    path = write(root, "d.json", [qa(0), qa(1), {**qa(2), "id": "s0"}])
    rep = prepare_data(recipe(root, [{"path": path}]), encoder)
    assert rep.warnings == [f"{path}: 1 duplicate id(s) (2 samples), e.g. s0"]
    assert f"warning: {path}: 1 duplicate id(s) (2 samples), e.g. s0" in rep.summary().splitlines()


@pytest.fixture
def three_formats(root) -> tuple[Path, dict]:
    """A recipe over llava JSON, messages parquet (images in the rows) and ShareGPT JSONL; and its bad records."""
    from datasets import Dataset

    llava = [qa(i, n_exchanges=1 + i % 2) for i in range(8)]
    rows = {
        "id": [f"m{i}" for i in range(6)],
        "messages": [
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Color {i}?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "Blue"}]}]
            for i in range(6)
        ],
        "images": [[Image.new("RGB", (40, 30), (30, 60, 220))] for _ in range(6)],
    }  # fmt: skip
    chat = [{"id": f"c{i}", "conversations": conv(f"human: Say {i}", f"gpt: {i}")} for i in range(5)]
    bad = {
        "llava": {"id": "bad-l", "image": "missing.png", "conversations": conv("human: Q", "gpt: A")},
        "chat": '{"id": "bad-c", "conversations": [',
    }

    def build(with_bad: bool, chat_cap: int | None = None, **data) -> Path:
        write(root, "llava.json", llava + ([bad["llava"]] if with_bad else []))
        Dataset.from_dict(rows).to_parquet(str(root / "vqa.parquet"))
        lines = [json.dumps(c) for c in chat] + ([bad["chat"]] if with_bad else [])
        (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
        raw = {
            "backbone": "tiny",
            "output_dir": str(root / "run"),
            "data": {
                "train": [
                    {"path": str(root / "llava.json"), "image_folder": str(root / "images")},
                    {"path": str(root / "vqa.parquet"), "prompt_style": "short_answer", "repeats": 2},
                    {"path": str(root / "chat.jsonl"), "format": "sharegpt", "max_samples": chat_cap},
                ],
                "max_length": 256,
                **data,
            },
            "quantization": {"compute_dtype": "float32"},
            "lora": {"r": 4, "alpha": 8},
            "train": {"max_steps": 2, "batch_size": 4, "grad_accum": 1, "logging_steps": 1, "warmup_ratio": 0.0,
                      "gradient_checkpointing": False},
        }  # fmt: skip
        path = root / "recipe.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return root, build


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what writing the data printed
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_on_three_formats_prints_mixture_histogram_and_ok(capsys, three_formats, tiny_path):
    root, build = three_formats
    code, out, err = run_cli(capsys, "check", build(with_bad=False, chat_cap=4))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[-1] == "ok" and "Traceback" not in out + err
    assert "mixture (seed 42): 24 training samples" in lines  # 8 + 6 x 2 + 4
    table = {ln.split()[0]: ln.split()[1:6] for ln in lines if ln.startswith(f"  {root}")}
    assert table == {
        str(root / "llava.json"): ["llava", "8", "8", "1", "8"],
        str(root / "vqa.parquet"): ["messages", "6", "6", "2", "12"],
        str(root / "chat.jsonl"): ["sharegpt", "5", "4", "1", "4"],
    }
    assert "length histogram (18 readable samples, before data.overlength):" in lines
    assert any(ln.startswith("  >256") for ln in lines) and "over data.max_length=256: none" in lines


def test_check_lists_every_bad_sample_of_every_format_and_exits_2(capsys, three_formats, tiny_path):
    root, build = three_formats
    code, out, err = run_cli(capsys, "check", build(with_bad=True))
    assert code == 2 and "Traceback" not in out + err
    assert "mixture (seed 42):" in out and "length histogram" in out  # the report comes first
    assert err.startswith("error: 2 bad sample(s) of 21:\n")
    assert f"  {root / 'llava.json'} sample 8 (id bad-l): image 'missing.png' not found in" in err
    assert f"  {root / 'chat.jsonl'} line 6: broken JSON line (" in err
    assert "hint: fix them, or set data.on_bad_sample=skip" in err


def test_train_with_skip_completes_and_rejects_exactly_the_bad(capsys, three_formats, tiny_path):
    root, build = three_formats
    recipe_path = build(with_bad=True, on_bad_sample="skip", max_bad_fraction=0.2, seed=3)
    code, out, err = run_cli(capsys, "check", recipe_path)
    assert code == 0 and "2 bad sample(s) would be skipped (data.on_bad_sample=skip):" in out
    code, out, err = run_cli(capsys, "train", recipe_path)
    assert code == 0, err
    rows = [json.loads(x) for x in (root / "run" / "rejected.jsonl").read_text().splitlines()]
    assert [(r["source"], r["index"], r["id"], r["line"]) for r in rows] == [
        (str(root / "llava.json"), 8, "bad-l", None),
        (str(root / "chat.jsonl"), 5, None, 6),
    ]
    assert (root / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_split_carves_every_copy_of_a_sample_out_of_training(root, encoder):
    from lora_llava.data.mixture import content_key

    # each sample twice under another id, one more copy in a second source, and some unique ones
    twice = [dict(qa(i), id=f"{tag}{i}") for i in range(20) for tag in ("a", "b")]
    a = write(root, "a.json", twice)
    b = write(root, "b.json", [dict(qa(i), id=f"c{i}") for i in range(5)] + [qa(500 + i) for i in range(5)])
    rep = prepare_data(recipe(root, [{"path": a}, {"path": b}], seed=3, eval_split=8), encoder)
    carved = {content_key(s) for s in rep.eval}
    assert rep.eval_split == 8 and len(carved) == 8  # eight different samples, no copy scored twice
    assert not carved & {content_key(s) for s in rep.train}  # no carved sample left in training, by any id
    copies = {}
    for s in [*twice, *(dict(qa(i), id=f"c{i}") for i in range(5))]:
        copies[s["id"][1:]] = copies.get(s["id"][1:], 0) + 1
    expected = sum(copies.get(s.messages[0][1].split("sample ")[1].rstrip("?"), 1) - 1 for s in rep.eval)
    assert len(rep.train) == 50 - 8 - expected
    assert (
        f"data.eval_split: {expected} training sample(s) are copies (same conversation and images, another id or "
        "source) of carved eval samples; they left training with them"
    ) in rep.warnings
    assert expected > 0


def test_copies_are_the_same_conversation_and_the_same_image_file(root, encoder):
    (root / "other").mkdir()
    Image.new("RGB", (64, 64), (0, 200, 0)).save(root / "other" / "red.png")  # same name, another file
    a = write(root, "a.json", [qa(i) for i in range(6)])
    b = write(root, "b.json", [dict(qa(0), id="x")])  # the same text, red.png of another folder
    sources = [{"path": a}, {"path": b, "image_folder": str(root / "other")}]
    rep = prepare_data(recipe(root, sources, seed=1, eval_split=6), encoder)
    assert rep.eval_split == 6 and len(rep.train) == 1 and not rep.bad  # the two red.png files: two samples
    assert not any(w.startswith("data.eval_split:") for w in rep.warnings)
    b2 = write(root, "b2.json", [dict(qa(0), id="y")])  # the same text and the same file: a copy
    rep = prepare_data(recipe(root, [{"path": a}, {"path": b2}], seed=1, eval_split=5), encoder)
    assert len(rep.train) + len(rep.eval) + (1 if any(s.id in ("s0", "y") for s in rep.eval) else 0) == 7
