"""lora-llava eval: scores, JSON output, and every user mistake as one error line."""

from __future__ import annotations

import json

import pytest
from helpers import assert_user_error, run_cli


def test_eval_on_missing_model_dir(capsys, tmp_path, shapes):
    code, out, err = run_cli(
        capsys, "eval", tmp_path / "no-such-run", "--data", shapes / "eval.json",
        "--image-folder", shapes / "images",
    )  # fmt: skip
    assert_user_error(code, out, err, f"no directory '{tmp_path / 'no-such-run'}': it does not exist")


def test_eval_with_bad_data_lists_it(capsys, tmp_path, shapes):
    data = json.loads((shapes / "eval.json").read_text())[:2] + [{"id": "x", "image": "nope.png", "conversations": []}]
    (tmp_path / "eval.json").write_text(json.dumps(data))
    code, out, err = run_cli(
        capsys, "eval", "tiny", "--data", tmp_path / "eval.json", "--image-folder", shapes / "images"
    )
    assert_user_error(code, out, err, "1 bad sample(s) in", "sample 2 (id x): 'conversations' is empty")


def test_eval_json_on_trained_run(capsys, trained_run, shapes):
    code, out, err = run_cli(
        capsys, "eval", trained_run, "--data", shapes / "eval.json", "--image-folder", shapes / "images",
        "--json", "--max-samples", "8", "--max-new-tokens", "3",
    )  # fmt: skip
    assert code == 0, err
    result = json.loads(out)  # the whole of stdout is one JSON object
    assert isinstance(result, dict)
    assert {"accuracy", "n"} <= set(result)
    assert result["n"] == 8
    assert 0.0 <= result["accuracy"] <= 1.0
    assert result["accuracy"] == pytest.approx(result["correct"] / 8)


def test_eval_argument_and_data_mistakes(capsys, tmp_path, trained_run, shapes):
    with pytest.raises(SystemExit) as e:  # argparse's own usage error
        run_cli(capsys, "eval", trained_run, "--data", shapes / "eval.json", "--batch-size", "0")
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--batch-size: must be at least 1, got 0" in err and "Traceback" not in err
    (tmp_path / "empty.json").write_text("[]")
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", tmp_path / "empty.json")
    assert_user_error(code, out, err, "no samples to score in")
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", shapes / "eval.json")  # no --image-folder
    assert_user_error(code, out, err, "image paths are relative to --image-folder")


def test_eval_of_a_run_defaults_to_its_own_eval_data_and_settings(capsys, trained_run):
    code, out, err = run_cli(capsys, "eval", trained_run, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["n"] == 16  # the run's data.eval (the shapes eval set)
    # the run's eval.max_new_tokens (4) bounds the answers: same as asking for it explicitly
    code, out2, err = run_cli(capsys, "eval", trained_run, "--json", "--max-new-tokens", "4", "--batch-size", "16")
    assert code == 0 and json.loads(out2) == result
    code, out, err = run_cli(capsys, "eval", "tiny")
    assert_user_error(code, out, err, "--data is needed: 'tiny' is a backbone, which records no eval data")


def test_eval_reads_what_train_reads(capsys, tmp_path, trained_run, shapes):
    """Custom columns and speakers, a DatasetDict split, a prompt style: the source options of a recipe."""
    from datasets import Dataset, DatasetDict

    records = json.loads((shapes / "eval.json").read_text())[:6]
    odd = [
        {"qid": r["id"], "img_path": r["image"],
         "dialog": [{"speaker": "customer" if t["from"] == "human" else "agent", "text": t["value"]}
                    for t in r["conversations"]]}
        for r in records
    ]  # fmt: skip
    (tmp_path / "support.jsonl").write_text("".join(json.dumps(r) + "\n" for r in odd))
    code, out, err = run_cli(
        capsys, "eval", trained_run, "--data", tmp_path / "support.jsonl", "--image-folder", shapes / "images",
        "--columns", "{id: qid, conversations: dialog, image: img_path, role: speaker, text: text}",
        "--roles", "{user: [customer], assistant: [agent]}", "--prompt-style", "short_answer", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)["predictions"]] == [r["id"] for r in records]

    DatasetDict({"train": Dataset.from_list(records[:2]), "test": Dataset.from_list(records[2:5])}).save_to_disk(
        str(tmp_path / "dd")
    )
    code, out, err = run_cli(
        capsys, "eval", trained_run, "--data", tmp_path / "dd", "--split", "test",
        "--image-folder", shapes / "images", "--json",
    )  # fmt: skip
    assert code == 0, err
    assert json.loads(out)["n"] == 3
    code, out, err = run_cli(capsys, "eval", trained_run, "--data", tmp_path / "dd", "--format", "llavaa")
    assert_user_error(code, out, err, "eval --data: 1 problem(s)", "eval --data.format: must be one of auto, llava")


def test_a_sample_too_long_for_any_tokenizer_is_a_bad_sample_never_tokenized(
    capsys, tmp_path, trained_run, shapes, monkeypatch
):
    from lora_llava.data.encode import Encoder

    records = json.loads((shapes / "eval.json").read_text())[:2]
    records[1]["conversations"][-1]["value"] = "red " * 300_000  # 1.2 million characters of answer
    data = tmp_path / "eval.json"
    data.write_text(json.dumps(records))
    real = Encoder.prompt

    def prompt(self, sample):  # nothing that long reaches the tokenizer
        assert sum(len(t) for _, t in sample.messages) < 100_000
        return real(self, sample)

    monkeypatch.setattr(Encoder, "prompt", prompt)
    code, out, err = run_cli(
        capsys, "eval", trained_run, "--data", data, "--image-folder", shapes / "images", "--skip-bad"
    )
    assert code == 0, err
    assert (
        "sample 1 (id eval-1): 12000" in err
        and "characters of text, more than 256 tokens can hold (4096 characters); not read" in err
    )
