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
