"""lora-llava env: what a user pastes into a bug report, as text or JSON, with or without trying the Hub."""

from __future__ import annotations

import json
import os
import re
import socket
from importlib import metadata

import pytest
from helpers import run_cli

import lora_llava
from lora_llava import hub


@pytest.fixture
def no_connection(monkeypatch):
    """socket.create_connection fails the test if anything calls it."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError(f"lora-llava env tried to connect: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    hub.hub_reachable.cache_clear()
    yield calls
    hub.hub_reachable.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_json_is_one_object_with_the_installed_versions(capsys, offline, no_connection):
    code, out, err = run_cli(capsys, "env", "--json")
    assert code == 0, err
    assert "Traceback" not in err and "Warning" not in err
    env = json.loads(out)
    assert set(env) == {"packages", "source", "runtime", "cache", "hub", "settings"}
    for name in ("torch", "transformers", "peft"):
        assert env["packages"][name] == metadata.version(name)
    for name in ("lora_llava", "bitsandbytes", "accelerate", "trl", "datasets", "huggingface_hub", "gradio"):
        assert name in env["packages"]
    assert env["hub"]["offline"] is True and env["hub"]["reachable"] is False
    assert env["hub"]["endpoint"].startswith("http")
    assert env["cache"]["lora_llava"] == os.environ["LORA_LLAVA_CACHE"]
    assert env["cache"]["lora_llava_from"] == "LORA_LLAVA_CACHE"
    runtime = env["runtime"]
    assert runtime["python"] and runtime["platform"] and runtime["device"]
    assert runtime["gpus"] == len(runtime["gpu_names"])
    assert no_connection == []


def test_text_names_every_package_and_its_version(capsys, offline, no_connection):
    code, out, err = run_cli(capsys, "env")
    assert code == 0, err
    assert "Traceback" not in out + err
    lines = out.splitlines()
    for name in ("lora_llava", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl", "gradio"):
        try:
            version: str | None = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = lora_llava.__version__ if name == "lora_llava" else None  # a source tree, not installed
        line = next(ln for ln in lines if ln.strip().startswith(f"{name}:"))
        assert line.split(":", 1)[1].strip() == (version or "not installed"), line
    for key in ("python:", "platform:", "device:", "torch CUDA:", "bitsandbytes backend:", "HF_HOME:"):
        assert any(ln.strip().startswith(key) for ln in lines), key
    assert re.search(rf"\n  lora_llava: +{re.escape(os.environ['LORA_LLAVA_CACHE'])} \(from LORA_LLAVA_CACHE\)\n", out)
    assert re.search(r"\n  status: +offline \(HF_HUB_OFFLINE is set\)\n", out)
    # aligned: every value starts in the same column
    columns = {re.match(r"  [^:]+:\s+", ln).end() for ln in lines if ln.startswith("  ")}
    assert len(columns) == 1, columns


def test_no_network_makes_no_connection_attempt(capsys, monkeypatch, no_connection):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, out, err = run_cli(capsys, "env", "--no-network")
    assert code == 0, err
    assert re.search(r"\n  status: +not checked \(--no-network\)\n", out)
    code, out, err = run_cli(capsys, "env", "--no-network", "--json")
    assert code == 0, err
    assert json.loads(out)["hub"] == {
        "offline": False,
        "reachable": None,
        "endpoint": constants.ENDPOINT,
        "reason": None,
    }
    assert no_connection == []


def test_the_hub_is_reported_reachable_or_unreachable(capsys, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")

    class Connection:
        def close(self) -> None:
            pass

    for connect, expected in [
        (lambda *a, **k: Connection(), "reachable (https://hub.example)"),
        (lambda *a, **k: (_ for _ in ()).throw(TimeoutError()), "unreachable (hub.example did not answer within 3 s)"),
    ]:
        monkeypatch.setattr(socket, "create_connection", connect)
        hub.hub_reachable.cache_clear()
        try:
            code, out, err = run_cli(capsys, "env")
        finally:
            hub.hub_reachable.cache_clear()
        assert code == 0, err
        assert re.search(rf"\n  status: +{re.escape(expected)}\n", out)


def test_a_cuda_machine_shows_its_gpus_cuda_and_cudnn():
    from lora_llava.cli.env import render

    env = {
        "packages": {"torch": "2.13.0+cu130", "trl": None},
        "runtime": {
            "python": "3.11.7",
            "platform": "Linux",
            "device": "cuda: NVIDIA H200",
            "gpus": 3,
            "gpu_names": ["NVIDIA H200", "NVIDIA H200", "NVIDIA A100"],
            "cuda": "13.0",
            "cudnn": 91002,
            "hip": None,
            "bitsandbytes_backend": "CUDA",
        },
        "cache": {"lora_llava": "/c/lora_llava", "lora_llava_from": "default", "hf_hub": "/h/hub", "hf_home": "/h"},
        "hub": {"offline": False, "reachable": True, "endpoint": "https://huggingface.co", "reason": None},
        "source": {"path": "/src/lora_llava", "commit": None},
        "settings": {"CUDA_VISIBLE_DEVICES": "0,1,2"},
    }
    out = render(env)
    assert re.search(r"\n  trl: +not installed\n", out)
    assert re.search(r"\n  device: +2 x NVIDIA H200, NVIDIA A100 \(3 GPUs\)\n", out)
    assert re.search(r"\n  torch CUDA: +13.0\n  cuDNN: +91002\n", out)
    assert re.search(r"\n  bitsandbytes backend: +CUDA\n", out)
    assert re.search(r"\n  status: +reachable \(https://huggingface.co\)\n", out)
    assert out.endswith("CUDA_VISIBLE_DEVICES: 0,1,2")


def test_a_bug_report_names_the_machine_source_and_settings_but_no_secret(capsys, offline, no_connection, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_CANARYsecret123")
    monkeypatch.setenv("LORA_LLAVA_THIRD_PARTY", "show")
    code, out, err = run_cli(capsys, "env", "--json")
    assert code == 0, err
    env = json.loads(out)
    assert env["packages"]["numpy"] == metadata.version("numpy") and env["packages"]["pillow"] == metadata.version(
        "pillow"
    )
    assert env["runtime"]["cpu_count"] == os.cpu_count() and env["runtime"]["memory_bytes"] > 0
    assert env["source"]["path"] == os.path.dirname(lora_llava.__file__)
    assert env["settings"]["HF_TOKEN"] == "set" and env["settings"]["LORA_LLAVA_THIRD_PARTY"] == "show"
    code, text, err = run_cli(capsys, "env", "--no-network")
    assert "CANARY" not in out + text + err
    assert re.search(r"\n  HF_TOKEN: +set\n", text) and "lora_llava source:" in text
