"""Without network, Hub backbones fail in seconds with a clear message, and a local cache hit still works."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from lora_llava import hub


def test_hub_reachable_honours_offline_and_gives_up_fast(monkeypatch):
    from huggingface_hub import constants

    hub.hub_reachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.hub_reachable() is False and hub.offline_reason() == "HF_HUB_OFFLINE is set"
    hub.hub_reachable.cache_clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    t0 = time.time()
    assert hub.hub_reachable() is False
    assert time.time() - t0 < hub.CONNECT_TIMEOUT + 1
    hub.hub_reachable.cache_clear()


@pytest.fixture
def fake_hub_cache(tmp_path, tiny_path):
    """A Hugging Face cache holding the tiny backbone as the Hub repo someone/tiny-llava."""
    snapshot = tmp_path / "hub" / "models--someone--tiny-llava" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_path, snapshot)
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs").mkdir()
    (tmp_path / "hub" / "models--someone--tiny-llava" / "refs" / "main").write_text("0" * 40)
    return tmp_path / "hub"


def _check(tmp_path, cache, backbone: str, **env):
    environ = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    environ.update(HF_HUB_CACHE=str(cache), HF_ENDPOINT="http://127.0.0.1:9", **env)
    from lora_llava.data.synthetic import write_shapes_dataset

    data = write_shapes_dataset(tmp_path / "data", n_train=8, n_eval=4)
    args = [
        sys.executable, "-m", "lora_llava.cli.main", "check", "quickstart", f"backbone={backbone}",
        f"data.train.0.path={data / 'train.json'}", f"data.train.0.image_folder={data / 'images'}",
        f"data.eval.0.path={data / 'eval.json'}", f"data.eval.0.image_folder={data / 'images'}",
        f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    t0 = time.time()
    run = subprocess.run(args, env=environ, capture_output=True, text=True, timeout=120)
    return run, time.time() - t0


def test_a_cached_hub_backbone_works_without_network(tmp_path, fake_hub_cache):
    run, _ = _check(tmp_path, fake_hub_cache, "someone/tiny-llava")
    assert run.returncode == 0, run.stderr
    assert "\nbackbone: someone/tiny-llava (someone/tiny-llava), chat format vicuna_v1" in run.stdout
    assert run.stdout.rstrip().endswith("ok")


def test_an_uncached_hub_backbone_fails_in_seconds_with_one_error_line(tmp_path, fake_hub_cache):
    run, seconds = _check(tmp_path, fake_hub_cache, "llava-hf/llava-1.5-7b-hf")
    assert run.returncode == 2
    assert run.stderr.startswith(
        "error: 'llava-hf/llava-1.5-7b-hf': its processor is not in the local Hugging Face cache"
    ), run.stderr
    assert "the Hub cannot be reached (127.0.0.1 did not answer within 3 s)" in run.stderr
    assert "Traceback" not in run.stderr and "Retrying" not in run.stderr
    assert seconds < 60  # imports included; the Hub's own retries took minutes


# -- push ------------------------------------------------------------------------------------------------

CANARY = "hf_CANARY0123456789abcdefSECRET"


class FakeHub:
    """A stand-in for huggingface_hub.HfApi at its boundary: records what a push sends."""

    repos: dict = {}
    calls: list = []

    def __init__(self, token=None):
        FakeHub.calls.append(("init", token == CANARY))

    def create_repo(self, repo_id, private=None, exist_ok=False, **kw):
        FakeHub.calls.append(("create_repo", repo_id, private))
        FakeHub.repos.setdefault(repo_id, {"private": private, "files": {}})
        return f"https://huggingface.co/{repo_id}"

    def repo_info(self, repo_id, **kw):
        from types import SimpleNamespace

        return SimpleNamespace(private=FakeHub.repos[repo_id]["private"])

    def create_branch(self, repo_id, branch, exist_ok=False, **kw):
        FakeHub.calls.append(("create_branch", repo_id, branch))

    def create_commit(self, repo_id, operations, commit_message, revision=None, **kw):
        from pathlib import Path

        files = FakeHub.repos[repo_id]["files"]
        for op in operations:
            data = op.path_or_fileobj
            files[op.path_in_repo] = data if isinstance(data, bytes) else Path(data).read_bytes()
        FakeHub.calls.append(("create_commit", repo_id, revision, sorted(files)))


@pytest.fixture
def fake_hub(monkeypatch):
    import huggingface_hub

    from lora_llava import hub

    FakeHub.repos, FakeHub.calls = {}, []
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)  # the fake Hub answers
    monkeypatch.setenv("HF_TOKEN", CANARY)
    return FakeHub


ADAPTER_PUSH = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja", "lora_llava.json",
    "metrics.jsonl", "processor_config.json", "projector.safetensors", "recipe.yaml", "tokenizer.json",
    "tokenizer_config.json",
}  # fmt: skip


def test_push_dry_run_is_private_and_lists_only_allowed_files(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    from lora_llava.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "checkpoints" / "checkpoint-9").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-9" / "optimizer.pt").write_bytes(b"x")
    monkeypatch.setenv("HF_TOKEN", CANARY)
    assert main(["push", str(run), "someone/x", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("repo: someone/x (private), revision: main, adapter\n")
    listed = {ln.split()[-1] for ln in out.splitlines() if ln.startswith("  ")}
    assert listed == ADAPTER_PUSH  # not the checkpoints' optimizer state, not the manifest
    assert out.rstrip().endswith("nothing uploaded (--dry-run)")
    assert CANARY not in out + err
    (run / "adapter" / "optimizer.pt").write_bytes(b"x")  # a file added to the adapter after it was written
    assert main(["push", str(run), "someone/x", "--dry-run"]) == 2
    assert "optimizer.pt not in its manifest.json (added after it was written)" in capsys.readouterr().err
    assert not [p for p in run.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]


def test_push_sends_the_plan_and_a_card_the_hub_parses(trained_run, tmp_path, capsys, fake_hub):
    import shutil

    from huggingface_hub import ModelCard

    from lora_llava.cli.main import main
    from lora_llava.merging import merge

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    merge(str(run), str(run / "merged"), log=lambda *_: None)
    assert main(["push", str(run), "someone/x-adapter", "--revision", "v1"]) == 0
    assert main(["push", str(run), "someone/x", "--merged", "--public"]) == 0
    out, err = capsys.readouterr()
    assert "pushed: https://huggingface.co/someone/x-adapter/tree/v1" in out
    assert "pushed: https://huggingface.co/someone/x\n" in out
    assert ("create_repo", "someone/x-adapter", True) in fake_hub.calls  # private unless --public
    assert ("create_repo", "someone/x", False) in fake_hub.calls
    assert ("create_branch", "someone/x-adapter", "v1") in fake_hub.calls
    adapter = dict(fake_hub.repos["someone/x-adapter"]["files"])
    merged = fake_hub.repos["someone/x"]["files"]
    assert set(adapter) == ADAPTER_PUSH
    assert set(merged) == {"README.md", "chat_template.jinja", "config.json", "generation_config.json",
                           "lora_llava.json", "merge_report.json", "model.safetensors", "processor_config.json",
                           "recipe.yaml", "tokenizer.json", "tokenizer_config.json"}  # fmt: skip
    for files in (adapter, merged):  # no token, no absolute local path anywhere in what was sent
        for name, data in files.items():
            assert CANARY.encode() not in data, name
            assert str(tmp_path).encode() not in data, name
    import json
    import os

    peft_config = json.loads(adapter["adapter_config.json"])  # the built-in base lives in lora_llava's cache here
    assert peft_config["base_model_name_or_path"] == "<local>/tiny-v3"
    assert os.environ["LORA_LLAVA_CACHE"].encode() not in adapter["adapter_config.json"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"].startswith("/")
    card = ModelCard(adapter["README.md"].decode())
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "image-text-to-text"
    assert "## Data" in card.text and "data.max_length" in card.text  # the check report: the data mixture
    assert "| steps | 40 |" in card.text and "## Merge verification" in card.text
    merged_card = ModelCard(merged["README.md"].decode())
    assert merged_card.data.library_name == "transformers"
    assert "[someone/x-adapter](https://huggingface.co/someone/x-adapter)" in merged_card.text  # linked
    relinked = ModelCard(fake_hub.repos["someone/x-adapter"]["files"]["README.md"].decode())
    assert "[someone/x](https://huggingface.co/someone/x)" in relinked.text  # and back
    assert CANARY not in out + err
    assert not [p for p in run.rglob("*") if p.is_file() and CANARY.encode() in p.read_bytes()]


def test_push_mistakes_are_one_error_line(trained_run, tmp_path, capsys, fake_hub, monkeypatch):
    import shutil

    from lora_llava.cli.main import main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    assert main(["push", str(run), "someone/x", "--merged"]) == 2
    assert "has no merged model to push" in capsys.readouterr().err
    fake_hub.repos["someone/open"] = {"private": False, "files": {}}
    assert main(["push", str(run), "someone/open"]) == 2
    assert "someone/open exists and is public; this push was asked to be private" in capsys.readouterr().err
    assert main(["push", str(run), "not-a-repo-id"]) == 2
    assert "is not owner/name" in capsys.readouterr().err
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "no-login"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-login" / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-login" / "stored_tokens"))
    assert main(["push", str(run), "someone/y"]) == 2
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and "hf auth login" in err and "HF_TOKEN" in err


def test_a_push_that_cannot_reach_the_hub_is_one_error_line(trained_run, tmp_path, capsys, fake_hub, monkeypatch):
    import httpx2

    from lora_llava import hub
    from lora_llava.cli.main import main

    def refused(self, repo_id, **kw):
        raise httpx2.ConnectError("[Errno 111] Connection refused")

    monkeypatch.setattr(FakeHub, "create_repo", refused)  # the network goes away between the check and the push
    assert main(["push", str(trained_run), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Hub to push someone/x: ConnectError: [Errno 111] Connection refused")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 2
    monkeypatch.setattr(hub, "hub_reachable", lambda: False)  # offline from the start: refused before any request
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["push", str(trained_run), "someone/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot reach the Hub to push someone/x (") and "--dry-run" in err


def test_push_uploads_no_link_and_nothing_but_what_the_names_say(trained_run, tmp_path, capsys, fake_hub):
    import json
    import shutil

    from lora_llava.cli.main import main
    from lora_llava.merging import merge

    secret = tmp_path / "secret"
    secret.write_text("hf_token_value\nssh-rsa AAAA")
    for name in ("vocab.json", "tokenizer.model", "vision_tower.safetensors"):  # links named like allowed files
        run = tmp_path / f"run-{name}"
        shutil.copytree(trained_run, run)
        (run / "adapter" / name).symlink_to(secret)
        for dry in (["--dry-run"], []):
            assert main(["push", str(run), "someone/x", *dry]) == 2
            err = capsys.readouterr().err
            assert f"{name} -> {secret}" in err and ("never through a link" in err or "(a link)" in err), err
    assert fake_hub.repos == {}
    from helpers import unseal

    run = tmp_path / "run-fake"
    shutil.copytree(trained_run, run)
    unseal(run / "adapter")  # an adapter of an earlier version (no manifest): push checks the files itself
    (run / "adapter" / "projector.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    assert main(["push", str(run), "someone/x", "--dry-run"]) == 2
    assert "projector.safetensors is not a safetensors file" in capsys.readouterr().err
    # merged shards come from the index: a stray file named like a shard is not uploaded
    run = tmp_path / "run-shards"
    shutil.copytree(trained_run, run)
    merge(str(run), str(run / "merged"), log=lambda *_: None)
    model = run / "merged" / "model.safetensors"
    (run / "merged" / "model-00001-of-00001.safetensors").write_bytes(model.read_bytes())
    (run / "merged" / "model-00009-of-00009.safetensors").write_bytes(model.read_bytes())  # stray
    model.unlink()
    unseal(run / "merged")
    weights = json.loads((run / "merged" / "merge_report.json").read_text()) and ["x"]
    index = {"metadata": {}, "weight_map": {w: "model-00001-of-00001.safetensors" for w in weights}}
    (run / "merged" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["push", str(run), "someone/m", "--merged"]) == 0
    sent = set(fake_hub.repos["someone/m"]["files"])
    assert "model-00001-of-00001.safetensors" in sent and "model-00009-of-00009.safetensors" not in sent


@pytest.mark.parametrize(
    "text, scrubbed",
    [
        ("/home/me/data/train.json", "<local>/train.json"),
        ("image_folder: ~/datasets/shapes/images", "image_folder: <local>/images"),
        ("~alice/d/x.json", "<local>/x.json"),
        ("file:///home/me/x.png", "<local>/x.png"),
        (r"path: C:\Users\me\data\train.json", "path: <local>/train.json"),
        ("C:/Users/me/x.json", "<local>/x.json"),
        (r"\\server\share\x.json", "<local>/x.json"),
        ("./data/train.json and ../data/eval.jsonl", "<local>/train.json and <local>/eval.jsonl"),
        ("runs/quickstart/data/train.json", "<local>/train.json"),
        ("data/train.json", "<local>/train.json"),
        ("base: /root/.cache/lora_llava/tiny-v3", "base: <local>/tiny-v3"),
    ],
)
def test_the_scrubber_removes_every_kind_of_local_path(text, scrubbed):
    from lora_llava.card import scrub

    assert scrub(text) == scrubbed
    assert scrub(scrubbed) == scrubbed  # twice changes nothing more
    assert scrub({"a": [text]}) == {"a": [scrubbed]}


@pytest.mark.parametrize(
    "text",
    ["llava-hf/llava-1.5-7b-hf", "https://huggingface.co/someone/x", "[someone/x](https://huggingface.co/someone/x)",
     "2026/12/04", "What is 3/4 of 8?", "model.language_model.layers.0", "lr 2e-4/step", "USER: <image>\nWhat?"],
)  # fmt: skip
def test_the_scrubber_leaves_what_is_no_local_path(text):
    from lora_llava.card import scrub

    assert scrub(text) == text
