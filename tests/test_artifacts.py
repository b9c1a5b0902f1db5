"""What a run writes opens as trained: system prompt, chat template, image padding under stock transformers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from lora_llava.artifacts import resolve_backbone
from lora_llava.cli.main import main
from lora_llava.data.chat import (
    VICUNA_SYSTEM,
    format_for,
)


def test_trained_adapter_renders_and_records_the_system_prompt(trained_run):
    from transformers import AutoProcessor

    adapter = trained_run / "adapter"
    meta = json.loads((adapter / "lora_llava.json").read_text())
    assert (meta["chat_format"], meta["system_prompt"]) == ("vicuna_v1", VICUNA_SYSTEM)
    stock = AutoProcessor.from_pretrained(adapter)
    text = stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False, add_generation_prompt=True)
    assert text == VICUNA_SYSTEM + " USER: Hi? ASSISTANT:"


def test_system_prompt_switch_reaches_training_eval_and_the_template(make_recipe, tmp_path):
    from transformers import AutoProcessor

    from lora_llava.infer import load_model
    from lora_llava.training.prepare import prepare_run
    from lora_llava.workflows import train

    recipe = make_recipe(chat={"system_prompt": ""}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "lora_llava.json").read_text())["system_prompt"] == ""
    stock = AutoProcessor.from_pretrained(adapter)
    assert stock.apply_chat_template([{"role": "user", "content": "Hi?"}], tokenize=False) == "USER: Hi? "
    sample = prepare_run(recipe, log=lambda *_: None).report.train[0]
    loaded = load_model(str(tmp_path / "run"))
    ids, _ = loaded.encoder.tokens(sample, [(64, 64)])
    assert loaded.processor.tokenizer.decode(ids, skip_special_tokens=True).startswith("USER: ")


def test_stock_autoprocessor_pads_like_training(make_recipe, shapes, tmp_path):
    """LLaVA-1.5's pad handling survives into the adapter and the merged model: stock transformers'
    AutoProcessor pads with the same color, and the pixel values equal those trained on."""
    from transformers import AutoProcessor

    from lora_llava.data.encode import Encoder
    from lora_llava.data.formats import Sample
    from lora_llava.merging import merge
    from lora_llava.model.loading import load_processor
    from lora_llava.workflows import train

    recipe = make_recipe(images={"pad_to_square": True}, train={"max_steps": 1})
    train(recipe, log=lambda *_: None)
    merge(str(tmp_path / "run"), str(tmp_path / "merged"), log=lambda *_: None)
    wide = tmp_path / "wide.png"
    Image.new("RGB", (97, 40), (10, 200, 30)).save(wide)
    base = load_processor(resolve_backbone("tiny").local_path())
    trained = Encoder(base, format_for("vicuna_v1", base.tokenizer), pad_to_square=True)
    expected = trained.encode(Sample("mem", 0, "w", [("user", "<image>\nQ"), ("assistant", "A")], [wide]))
    img = trained.load(wide)
    assert img.getpixel((48, 1)) == (122, 116, 104)  # int(255 * CLIP mean), as upstream's expand2square
    for folder in (tmp_path / "run" / "adapter", tmp_path / "merged"):
        stock = AutoProcessor.from_pretrained(folder)
        assert stock.image_processor.do_pad
        got = stock.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
        assert torch.equal(got, expected["pixel_values"])
    unpadded = base.image_processor(images=[Image.open(wide)], return_tensors="pt")["pixel_values"]
    assert not torch.equal(unpadded, expected["pixel_values"])


# -- what a user types: one resolver for every verb ---------------------------------------------------


@pytest.fixture
def legacy(tmp_path, monkeypatch):
    """A copy of tests/fixtures/legacy_v1: a run directory named ``exp1`` (no "/", "." or "runs/") in the
    format lora_llava wrote before its artifact module existed, with the answers it gave then."""
    root = tmp_path / "legacy"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "legacy_v1"


def test_an_old_run_directory_opens_and_answers_as_it_did(legacy, capsys):
    from lora_llava.artifacts import open_artifact
    from lora_llava.config.schema import DataSource
    from lora_llava.data.formats import read_source
    from lora_llava.infer import generate, load_model
    from lora_llava.layout import AdapterMeta

    art = open_artifact("exp1")
    assert (art.kind, art.path, art.adapter_dir) == ("run", Path("exp1"), Path("exp1/adapter"))
    assert isinstance(art.meta, AdapterMeta) and art.meta.backbone == "tiny" and art.meta.steps == 30
    assert open_artifact("exp1/adapter").kind == "adapter"
    assert open_artifact("exp1/merged").kind == "merged"
    assert open_artifact("exp1/checkpoints/checkpoint-30").kind == "checkpoint"
    expected = json.loads((legacy / "exp1" / "expected_answers.json").read_text())
    samples, bad = read_source(DataSource(path="data/eval.json", image_folder="data/images"))
    assert not bad
    assert generate(load_model("exp1"), samples, 4, 8) == expected["adapter"]
    assert generate(load_model("exp1/merged"), samples, 4, 8) == expected["merged"]
    # every verb goes through the same resolver: eval (the run's own eval data) and merge
    code = main(["eval", "exp1", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["n"] == 8
    assert [r["prediction"] for r in result["predictions"]] == expected["adapter"]
    assert main(["merge", "exp1", "again"]) == 0
    assert open_artifact("again").kind == "merged"


def test_a_path_that_exists_is_always_a_path(tmp_path, monkeypatch):
    from lora_llava.artifacts import open_artifact
    from lora_llava.errors import UserError

    monkeypatch.chdir(tmp_path)
    assert open_artifact("tiny").kind == "backbone"  # no such directory: the registered name
    Path("tiny").mkdir()
    with pytest.raises(UserError, match="'tiny' is not a run directory, an adapter/, a checkpoint, a merged model"):
        open_artifact("tiny")  # a directory of that name now: looked at, never looked up
    assert open_artifact("someone/llava-x").kind == "backbone"  # a Hub id (not a directory here)
    with pytest.raises(UserError, match="no directory 'runs/x': it does not exist"):
        open_artifact("runs/x")
    with pytest.raises(UserError, match="'nothing' is neither a directory here nor a registered backbone"):
        open_artifact("nothing")
    Path("f.txt").write_text("x")
    with pytest.raises(UserError, match="'f.txt' is a file; expected a run directory"):
        open_artifact("f.txt")


def test_unfinished_runs_say_what_to_do(tmp_path, monkeypatch):
    from lora_llava.artifacts import open_artifact
    from lora_llava.errors import UserError

    monkeypatch.chdir(tmp_path)
    Path("r/checkpoints/checkpoint-4").mkdir(parents=True)
    Path("r/recipe.yaml").write_text("backbone: tiny\n")
    with pytest.raises(UserError, match="'r' has no adapter: training did not finish") as e:
        open_artifact("r")
    assert str(e.value).endswith("hint: train it again: lora-llava train r/recipe.yaml output_dir=r --overwrite")
    Path("r/checkpoints/checkpoint-4/trainer_state.json").write_text("{}")
    with pytest.raises(
        UserError, match=r"has no adapter yet: training did not finish \(latest checkpoint: checkpoint-4\)"
    ) as e:
        open_artifact("r")
    # the run's own saved recipe, and as many processes as it was trained by
    assert str(e.value).endswith(
        "hint: finish it with: lora-llava train r/recipe.yaml output_dir=r train.resume=true; "
        "or use the checkpoint as it is: r/checkpoints/checkpoint-4"
    )
    Path("r/run.json").write_text('{"run_id": "abc", "world_size": 4}')
    with pytest.raises(UserError) as e:
        open_artifact("r")
    assert (
        str(e.value)
        .split("hint: ")[1]
        .startswith(
            "finish it with: torchrun --nproc_per_node 4 -m lora_llava train r/recipe.yaml output_dir=r train.resume=true"
        )
    )


def test_each_kind_writes_and_reads_one_metadata_shape(tmp_path):
    from lora_llava.errors import UserError
    from lora_llava.layout import AdapterMeta, AlignedMeta, AssembledMeta, MergedMeta, read_meta, write_meta

    metas = [
        AdapterMeta(backbone="tiny", source="builtin:tiny", family="llava", chat_format="vicuna_v1", steps=3),
        MergedMeta(merged_from="a", backbone="tiny", source="s", family="llava", chat_format="vicuna_v1"),
        AlignedMeta(merged_from="a", backbone="t", source="s", family="llava", chat_format="chatml"),
        AssembledMeta(assembled={"projector": "linear"}, chat_format="chatml"),
    ]
    for i, meta in enumerate(metas):
        (tmp_path / str(i)).mkdir()
        write_meta(tmp_path / str(i), meta)
        assert read_meta(tmp_path / str(i)) == meta
    # metadata written before a field existed reads with that field's meaning then
    old = {
        "format": "lora_llava-adapter/1",
        "backbone": "tiny",
        "source": "s",
        "family": "llava",
        "chat_format": "vicuna_v1",
    }
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "lora_llava.json").write_text(json.dumps(old))
    meta = read_meta(tmp_path / "old")
    assert (meta.system_prompt, meta.backbone_chat_format, meta.stage) == ("", "vicuna_v1", "instruct")
    (tmp_path / "old" / "lora_llava.json").write_text(json.dumps({**old, "format": "lora_llava-adapter/9"}))
    with pytest.raises(UserError, match="unknown format 'lora_llava-adapter/9'"):
        read_meta(tmp_path / "old")
    assert read_meta(tmp_path) is None


def test_every_checkpoint_is_an_adapter_for_eval_predict_chat_and_merge(make_recipe, shapes, tmp_path, capsys):
    import json
    import subprocess
    import sys

    from helpers import assert_user_error, run_cli

    from lora_llava.artifacts import open_artifact
    from lora_llava.layout import AdapterMeta
    from lora_llava.workflows import train

    recipe = make_recipe(output_dir=str(tmp_path / "r"), train={"max_steps": 4, "save_steps": 2})
    train(recipe, log=lambda *_: None)
    ckpt = tmp_path / "r" / "checkpoints" / "checkpoint-2"
    art = open_artifact(ckpt)
    assert art.kind == "adapter" and isinstance(art.meta, AdapterMeta) and art.meta.steps == 2
    assert art.run_dir == tmp_path / "r"  # eval without --data reads the run's own eval data

    code, out, err = run_cli(capsys, "eval", ckpt, "--json")
    assert code == 0, err
    assert json.loads(out)["n"] == 16
    code, out, err = run_cli(
        capsys, "predict", ckpt, "--data", shapes / "eval.json", "--image-folder", shapes / "images",
        "--out", tmp_path / "p.jsonl",
    )  # fmt: skip
    assert code == 0, err
    from lora_llava.predict import read_predictions

    assert len(read_predictions(tmp_path / "p.jsonl")) == 16  # the answers (after the header naming their settings)
    code, out, err = run_cli(capsys, "merge", ckpt, tmp_path / "merged-2", "--dtype", "float32")
    assert code == 0, err
    assert open_artifact(tmp_path / "merged-2").kind == "merged"
    chat = subprocess.run(
        [sys.executable, "-m", "lora_llava.cli.main", "chat", str(ckpt), "--image", str(next((shapes / "images").iterdir())),
         "--max-new-tokens", "3"],
        input="what color is it?\n", capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.strip()

    # a checkpoint whose files do not match its manifest is refused, naming the file
    (ckpt / "projector.safetensors").write_bytes(b"torn")
    code, out, err = run_cli(capsys, "eval", ckpt)
    assert_user_error(code, out, err, "is damaged: projector.safetensors has 4 bytes")


def _installed(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def test_every_artifact_and_run_names_the_versions_it_was_made_with(make_recipe, tmp_path, assembled):
    from lora_llava.merging import merge
    from lora_llava.workflows import train

    recipe = make_recipe(output_dir=str(tmp_path / "r"), train={"max_steps": 2, "save_steps": 2})
    train(recipe, log=lambda *_: None)
    run = tmp_path / "r"
    merge(run, tmp_path / "merged", log=lambda *_: None)
    folders = [run / "adapter", run / "checkpoints" / "checkpoint-2", tmp_path / "merged", assembled["mlp"]]
    for folder in folders:
        versions = json.loads((folder / "lora_llava.json").read_text())["versions"]
        for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate"):
            assert versions[name] == _installed(name), (folder, name)
        assert versions["lora_llava"] and versions["device"].startswith("cpu") and "cuda" in versions
    assert json.loads((run / "adapter" / "lora_llava.json").read_text())["versions"]["bitsandbytes_backend"] == "CPU"
    run_versions = json.loads((run / "run.json").read_text())["versions"]
    assert run_versions["transformers"] == _installed("transformers") and run_versions["peft"] == _installed("peft")


def test_an_artifact_from_other_versions_says_so_in_one_warning(trained_run, tmp_path, capsys):
    from lora_llava.artifacts import open_artifact
    from lora_llava.layout import write_manifest

    adapter = tmp_path / "adapter"
    shutil.copytree(trained_run / "adapter", adapter)
    meta = json.loads((adapter / "lora_llava.json").read_text())
    meta["versions"] = {**meta["versions"], "transformers": "4.57.1", "peft": "0.17.0"}
    (adapter / "lora_llava.json").write_text(json.dumps(meta))
    write_manifest(adapter)  # as that version wrote it
    open_artifact(adapter)
    open_artifact(adapter)  # once per artifact and process
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"warning: {adapter} was saved with other versions")
    assert f"transformers 4.57.1 -> {_installed('transformers')}" in err and "peft 0.17.0 -> " in err

    same = tmp_path / "same"
    shutil.copytree(trained_run / "adapter", same)
    meta["versions"] = {**meta["versions"], "transformers": _installed("transformers") + ".post9", "peft": ""}
    (same / "lora_llava.json").write_text(json.dumps(meta))
    write_manifest(same)
    open_artifact(same)  # a patch release, or no record: nothing to say
    assert capsys.readouterr().err == ""


def test_lineage_reads_what_a_run_and_its_merged_model_recorded(trained_run, tmp_path):
    """One reader: the base, the training numbers, eval before/after and the merge verification, None where
    nothing recorded them."""
    from lora_llava.artifacts import MERGE_REPORT_FILE, open_artifact
    from lora_llava.layout import MergedMeta, RunDir, read_meta, write_meta

    run = RunDir(tmp_path / "run")
    shutil.copytree(trained_run, run.path)
    lin = open_artifact(run.path).lineage()
    adapter = read_meta(run.adapter)
    assert (lin.kind, lin.folder, lin.run_dir, lin.recipe) == (
        "run",
        run.adapter,
        run.path,
        run.adapter / "recipe.yaml",
    )
    assert (lin.backbone, lin.chat_format, lin.stage, lin.system_prompt) == (
        "tiny",
        "vicuna_v1",
        "instruct",
        VICUNA_SYSTEM,
    )
    assert (lin.steps, lin.train_samples, lin.train_loss) == (40, adapter.train_samples, adapter.train_loss)
    assert lin.hardware == adapter.hardware and lin.hardware.startswith("CPU") and lin.seconds == adapter.seconds
    assert lin.source == adapter.source
    assert lin.data_report == run.data_report.read_text().strip() and "data.max_length" in lin.data_report
    assert lin.accuracy is None and lin.accuracy_before is None and lin.eval_samples is None and lin.merge is None

    run.summary.write_text(json.dumps({"eval_samples": 16, "accuracy": {"base": 0.25, "adapter": 0.875}}))
    run.merged.mkdir()
    write_meta(run.merged, MergedMeta(
        merged_from=str(run.adapter), backbone="tiny", source=adapter.source, family="llava", chat_format="vicuna_v1",
        dtype="float32", verified=False,
    ))  # fmt: skip
    parity = {"samples": 4, "answers_equal": 3, "answers_total": 4, "max_abs_logit_diff": 0.5, "dtype": "float32",
              "quantized_answers_equal": None, "accuracy": {"merged": 0.75}, "passed": False}  # fmt: skip
    report = {"out_dir": str(run.merged), "dtype": "float32", "base": "original", "parity": parity}
    (run.merged / MERGE_REPORT_FILE).write_text(json.dumps(report))
    for ref in (run.path, run.merged, run.adapter):  # the run, its merged model, its adapter: one lineage
        lin = open_artifact(ref).lineage()
        assert lin.run_dir == run.path and lin.steps == 40 and lin.backbone == "tiny"
        assert (lin.accuracy_before, lin.accuracy_after, lin.eval_samples) == (0.25, 0.875, 16)
        m = lin.merge
        assert m is not None and m.folder == run.merged
        assert (m.answers_equal, m.answers_total, m.agreement, m.max_abs_logit_diff) == (3, 4, 0.75, 0.5)
        assert (m.dtype, m.base, m.run_dtype, m.verified, m.passed) == ("float32", "original", "float32", False, False)
    assert open_artifact(run.merged).lineage().recipe == run.recipe  # a merged model has no copy of its own

    lin = open_artifact("tiny").lineage()  # a backbone: nothing recorded
    assert (lin.folder, lin.run_dir, lin.backbone, lin.steps, lin.accuracy, lin.merge) == (None,) * 6


def test_an_adapter_or_merged_model_that_does_not_match_its_manifest_is_refused(trained_run, tmp_path, monkeypatch):
    import lora_llava.artifacts as artifacts
    from lora_llava.artifacts import open_artifact
    from lora_llava.errors import UserError
    from lora_llava.merging import merge

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert (run / "adapter" / "manifest.json").is_file()
    open_artifact(run)  # whole: opens (and remembers that it verified)
    hashed = []
    real = artifacts.manifest_problem
    monkeypatch.setattr(artifacts, "manifest_problem", lambda *a, **k: hashed.append(1) or real(*a, **k))
    open_artifact(run)
    assert hashed == []  # unchanged since it verified: not hashed again
    weights = run / "adapter" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # one flipped bit, same size
    weights.write_bytes(bytes(data))
    with pytest.raises(UserError, match="adapter_model.safetensors does not match its SHA-256 in manifest.json"):
        open_artifact(run)
    assert hashed == [1]
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    (run / "adapter" / "manifest.json").unlink()  # deleting the manifest does not switch the check off
    with pytest.raises(UserError, match="is incomplete or altered: its manifest.json is gone"):
        open_artifact(run / "adapter")
    merged = tmp_path / "merged"
    shutil.copytree(trained_run, tmp_path / "run2")
    merge(str(tmp_path / "run2"), str(merged), log=lambda *_: None)
    open_artifact(merged)
    (merged / "extra.safetensors").write_bytes(b"x")
    with pytest.raises(UserError, match="extra.safetensors not in its manifest.json"):
        open_artifact(merged)


def test_an_edit_that_restores_the_files_time_and_size_is_still_caught(trained_run, tmp_path):
    import os

    from lora_llava.artifacts import open_artifact
    from lora_llava.errors import UserError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    open_artifact(run)  # verified, remembered
    config = run / "adapter" / "adapter_config.json"
    st = config.stat()
    text = config.read_text()
    config.write_text(text.replace('"lora_alpha": 16', '"lora_alpha": 99'))  # the same size
    assert config.stat().st_size == st.st_size
    os.utime(config, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old modification time
    with pytest.raises(UserError, match="adapter_config.json does not match its SHA-256"):
        open_artifact(run)
