"""``lora-llava data generate`` end to end: against the loopback server (faults, malformed answers,
resume, the key) and offline with the tiny local LM; the output passes ``check`` and a recipe trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import assert_user_error, run_cli

from lora_llava.data.prompts import BRIEF_DESCRIPTION_PROMPTS
from lora_llava.datagen.config import load_datagen_config
from lora_llava.datagen.generators import OpenAIGenerator
from lora_llava.datagen.prompts import PROMPT_VERSION
from lora_llava.datagen.run import generate_data

CANARY = "sk-canary-9c8b7a6f5e4d3c2b"


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def malformed(server):
    """Canned answers, except a malformed conversation and reasoning for the blue image, an empty detail for the yellow."""
    return lambda body: _malformed(body, server.canned, server.kind_of)


def _malformed(body, canned, kind_of) -> str:
    last = body["messages"][-1]["content"]
    if "blue" in last and kind_of(body) == "conversation":
        return "Question: What color is it?\nAnswer: According to the caption, it is blue."
    if "blue" in last and kind_of(body) == "complex_reasoning":
        return "Answer: There is no question here."
    if "yellow circle" in last and kind_of(body) == "detail":
        return ""
    return canned(body)


def every_file(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in root.rglob("*") if p.is_file())


def test_generate_check_and_train_against_an_openai_compatible_server(
    openai_config, server, coco, tmp_path, capsys, monkeypatch, tiny_path
):
    monkeypatch.setenv("DATAGEN_KEY", CANARY)
    server.answer = malformed(server)
    server.script = [(500, {}, "overloaded"), (429, {"Retry-After": "0"}, "rate limited")]
    cfg = write(tmp_path / "gen.yaml", openai_config(api_key_env="DATAGEN_KEY"))
    code, out, err = run_cli(capsys, "data", "generate", cfg)
    assert code == 0, err
    assert all(r["authorization"] == f"Bearer {CANARY}" for r in server.requests)
    assert len(server.requests) == 18 + 2  # 6 images x 3 kinds, plus the two retried faults
    assert "requests: 2 retried, 1 rate-limited (HTTP 429)" in out
    table = {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.split()[:1] in (["conversation"], ["detail"], ["complex_reasoning"])}  # fmt: skip
    assert table["conversation"][1:5] == ["6", "1", "5", "0"] and "mentions_annotations 1" in out
    assert table["complex_reasoning"][1:5] == ["6", "1", "5", "0"] and "turn_structure 1" in out
    assert table["detail"][1:5] == ["6", "1", "5", "0"] and "empty 1" in out
    assert "answer lengths (words per answer):" in out and "context" in out and "| sample" in out
    assert "output: " in out and "(15 samples from 6 images)" in out

    data = json.loads((tmp_path / "out" / "gen.json").read_text())
    assert len(data) == 15 and len({d["id"] for d in data}) == 15
    for d in data:
        first = d["conversations"][0]
        assert first["from"] == "human" and first["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in d["conversations"]) == 1
        assert d["provenance"] == {
            "kind": d["id"].split("-", 1)[1],
            "generator": "openai:canned",
            "prompt_version": PROMPT_VERSION,
            "annotation_id": d["id"].split("-")[0],
        }
    assert (tmp_path / "out" / "gen.report.txt").read_text().startswith("kind ")
    assert CANARY not in out + err + every_file(tmp_path)  # not printed, not in the output, journal or report

    recipe = {
        "backbone": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [{"path": str(tmp_path / "out" / "gen.json"), "image_folder": str(coco.parent / "images")}],
                 "max_length": 256},
        "quantization": {"compute_dtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "gradient_checkpointing": False,
                  "logging_steps": 1, "warmup_ratio": 0.0},
    }  # fmt: skip
    recipe_path = write(tmp_path / "recipe.yaml", recipe)
    code, out, err = run_cli(capsys, "check", recipe_path)
    assert code == 0 and out.rstrip().endswith("ok"), out + err
    assert "train        15     0" in out
    code, out, err = run_cli(capsys, "train", recipe_path)
    assert code == 0, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_skips_what_is_done_and_asks_failed_requests_again(openai_config, server, tmp_path, capsys):
    cfg = write(tmp_path / "gen.yaml", openai_config())
    code, out, _ = run_cli(capsys, "data", "generate", cfg, "--limit", "2", "--no-progress")
    assert code == 0 and len(server.requests) == 6 and "(6 samples from 2 images)" in out
    server.script = [(400, {}, "bad request")]  # not retried: journaled as failed, asked again next time
    code, out, _ = run_cli(capsys, "data", "generate", cfg, "--no-progress")
    assert code == 0 and len(server.requests) == 6 + 12
    assert "resuming: 6 of 18 generations are already in" in out
    assert "(17 samples from 6 images); 1 failed request(s) are asked again by a re-run" in out
    asked_before = len(server.requests)
    code, out, _ = run_cli(capsys, "data", "generate", cfg, "--no-progress")
    assert code == 0 and len(server.requests) == asked_before + 1 and "(18 samples from 6 images)" in out
    code, out, _ = run_cli(capsys, "data", "generate", cfg, "--no-progress")
    assert len(server.requests) == asked_before + 1 and "resuming: 18 of 18" in out  # nothing left to ask
    samples = json.loads((tmp_path / "out" / "gen.json").read_text())
    assert [s["id"] for s in samples[:3]] == ["0-conversation", "0-detail", "0-complex_reasoning"]  # image order


def test_requests_run_concurrently_within_the_bound(openai_config, server):
    server.delay = 0.05
    result = generate_data(load_datagen_config(openai_config(concurrency=3)), progress=False, log=lambda s: None)
    assert result.samples == 18 and 1 < server.max_in_flight <= 3


class Crash(KeyboardInterrupt):
    pass


def test_a_crash_loses_nothing_journaled_and_a_cut_line_is_asked_again(openai_config, server, tmp_path):
    config = load_datagen_config(openai_config(concurrency=1))
    gen = OpenAIGenerator(config.generator)
    calls = {"n": 0}
    real = gen.complete

    def dying(messages, key):
        calls["n"] += 1
        if calls["n"] >= 5:  # the process dies at the 5th request: nothing after it answers
            raise Crash()
        return real(messages, key)

    gen.complete = dying  # type: ignore[method-assign]
    try:
        generate_data(config, progress=False, log=lambda s: None, generator=gen)
    except Crash:
        pass
    journal = tmp_path / "out" / "gen.journal.jsonl"
    lines = journal.read_text().splitlines()
    header, lines = lines[0], lines[1:]
    assert json.loads(header) == {"lora_llava_datagen_journal": 1, "output": "gen.json"}  # what wrote it, first
    assert len(lines) == 4 and not (tmp_path / "out" / "gen.json").exists()
    journal.write_text(header + "\n" + "\n".join(lines[:3]) + "\n" + lines[3][:25])  # a kill in the 4th line
    server.requests.clear()
    result = generate_data(config, progress=False, log=lambda s: None)
    assert result.resumed == 3 and len(server.requests) == 15 and result.samples == 18
    assert all(json.loads(ln) for ln in journal.read_text().splitlines())


def test_a_journal_of_another_generator_is_not_mixed_in(openai_config, server, tmp_path, capsys):
    cfg = write(tmp_path / "gen.yaml", openai_config())
    assert run_cli(capsys, "data", "generate", cfg, "--limit", "1", "--no-progress")[0] == 0
    res = run_cli(capsys, "data", "generate", cfg, "generator.model=other", "--no-progress")
    assert_user_error(
        *res, f"holds 3 generation(s) by openai:canned with prompt version {PROMPT_VERSION}", "another --output"
    )
    other = tmp_path / "other.json"
    assert run_cli(capsys, "data", "generate", cfg, "generator.model=other", "--output", other, "--limit", "1")[0] == 0
    assert other.is_file() and (tmp_path / "other.journal.jsonl").is_file()


def test_offline_with_the_tiny_local_lm_and_stage1_pairs(coco, tmp_path, capsys, tiny_path):
    raw = {
        "annotations": {"path": str(coco), "image_folder": str(coco.parent / "images")},
        "output": str(tmp_path / "local.json"),
        "kinds": ["conversation", "brief"],
        "generator": {"model": "tiny-qwen2", "max_new_tokens": 8, "few_shot": 0, "temperature": 0},
    }
    code, out, err = run_cli(capsys, "data", "generate", write(tmp_path / "local.yaml", raw), "--limit", "2")
    assert code == 0, err
    assert "generate: 100%" in err and "tok_in=" in err  # the progress bar, with its ETA and token counts
    rows = [ln.split() for ln in out.splitlines() if ln.startswith(("conversation", "brief"))]
    assert rows[0][:2] == ["conversation", "2"] and rows[1][:5] == ["brief", "2", "0", "2", "0"]
    journal = [json.loads(ln) for ln in (tmp_path / "local.journal.jsonl").read_text().splitlines()[1:]]
    asked = [e for e in journal if e["kind"] == "conversation"]
    assert len(asked) == 2 and all(e["generator"] == "local:tiny-qwen2" and e["completion_tokens"] > 0 for e in asked)
    data = json.loads((tmp_path / "local.json").read_text())
    briefs = [d for d in data if d["provenance"]["kind"] == "brief"]
    assert [d["conversations"][1]["value"] for d in briefs] == ["A red square on gray.", "A green circle on gray."]
    assert all(d["conversations"][0]["value"].split("\n", 1)[1] in BRIEF_DESCRIPTION_PROMPTS for d in briefs)
    recipe = {
        "backbone": "tiny",
        "output_dir": str(tmp_path / "run"),
        "data": {"train": [{"path": str(tmp_path / "local.json"), "image_folder": str(coco.parent / "images")}]},
    }
    code, out, err = run_cli(capsys, "check", write(tmp_path / "recipe.yaml", recipe))
    assert code == 0 and out.rstrip().endswith("ok"), out + err


def test_user_mistakes_are_one_line(coco, tmp_path, capsys):
    raw = {"annotations": {"path": str(tmp_path / "nope.json"), "image_folder": str(tmp_path)},
           "output": str(tmp_path / "o.json"), "kinds": ["brief"]}  # fmt: skip
    cfg = write(tmp_path / "c.yaml", raw)
    assert_user_error(*run_cli(capsys, "data", "generate", cfg), "annotations.path", "file not found")
    assert_user_error(*run_cli(capsys, "data", "generate", cfg, "--output", "x.jsonl"), "must be a .json file")
    assert_user_error(*run_cli(capsys, "data", "generate", cfg, "--limit", "0"), "--limit must be >= 1")
    assert_user_error(*run_cli(capsys, "data", "generate", cfg, "kinds=[brif]"), "did you mean 'brief'?")
    assert_user_error(*run_cli(capsys, "data"), "data needs an action")


def test_a_refused_key_stops_the_run_with_one_line_and_no_key(openai_config, server, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATAGEN_KEY", CANARY)
    server.script = [(401, {}, f'{{"error": "invalid key {CANARY}"}}')]
    cfg = write(tmp_path / "gen.yaml", openai_config(api_key_env="DATAGEN_KEY", concurrency=1))
    code, out, err = run_cli(capsys, "data", "generate", cfg, "--no-progress")
    assert_user_error(code, out, err, "refused the request (HTTP 401) with the key in $DATAGEN_KEY", "invalid key ***")
    assert CANARY not in out + err + every_file(tmp_path)


def test_a_malformed_boxes_cell_is_one_skipped_image_and_the_run_goes_on(make_images, tmp_path, capsys):
    make_images(3)
    (tmp_path / "marks.csv").write_text(
        "image,caption,boxes\n"
        'img0.png,A red square.,"[[""square"", 4, 6, 20, 22]]"\n'
        'img1.png,A green circle.,"[[""circle"", 7, 8, 23]]"\n'  # four values: malformed
        "img2.png,A blue square.,\n"
    )
    raw = {"annotations": {"path": str(tmp_path / "marks.csv"), "image_folder": str(tmp_path / "images")},
           "output": str(tmp_path / "marks.json"), "kinds": ["brief"]}  # fmt: skip
    code, out, err = run_cli(capsys, "data", "generate", write(tmp_path / "marks.yaml", raw), "--no-progress")
    assert code == 0, err
    assert "annotations: 2 usable images in " in out and ", 1 skipped" in out
    assert "  skipped image 'img1.png' (id img1.png): line 3: boxes must be JSON like " in out
    data = json.loads((tmp_path / "marks.json").read_text())
    assert [d["image"] for d in data] == ["img0.png", "img2.png"]


def _config_keys(cls, prefix=""):
    """(dotted key, help text) of every key of a datagen config class, sections first, by walking it."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        yield prefix + f.name, f.metadata["help"]
        inner = [t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)]
        if inner:
            yield from _config_keys(inner[0], f"{prefix}{f.name}.")


def test_generate_help_lists_every_config_key_with_its_help(capsys):
    from lora_llava.cli.main import main
    from lora_llava.datagen.config import DatagenConfig

    with pytest.raises(SystemExit) as done:
        main(["data", "generate", "--help"])
    assert done.value.code == 0
    help_text = capsys.readouterr().out
    lines = help_text.split("config keys (in the YAML, or as key=value overrides):\n", 1)[1].splitlines()
    keys = list(_config_keys(DatagenConfig))
    assert [ln.split()[0] for ln in lines] == [k for k, _ in keys]  # every key, once, in schema order
    for line, (_, help_) in zip(lines, keys):
        words = line.split(None, 1)[1]
        assert words.startswith(" ".join(help_.split()[:4])), line  # its own help text, on one line
    by_key = {ln.split()[0]: ln for ln in lines}
    assert by_key["generator.concurrency"].endswith(
        "openai: requests in flight at once (local: one at a time). [default: 4]"
    )
    assert by_key["annotations.path"].endswith("[required]")
    assert by_key["generator.api_key_env"].endswith("printed or written. [default: null]")
