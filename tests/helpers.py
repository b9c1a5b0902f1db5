"""Helpers shared by the tests: running the command, writing recipes and records, model inspection.

Usage (tests/ is on the import path, see pyproject's pytest settings)::

    from helpers import run_cli, assert_user_error
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import bitsandbytes as bnb
import torch
import yaml
from PIL import Image, ImageDraw

from lora_llava.cli.main import main
from lora_llava.config.schema import DataSource
from lora_llava.data.formats import read_source

REPO = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_user_error(code: int, out: str, err: str, *expected: str) -> None:
    assert code == 2, (out, err)
    err = "".join(ln for ln in err.splitlines(keepends=True) if not ln.startswith("warning: "))  # said before it
    assert err.startswith("error: "), err
    assert sum(ln.startswith("error:") for ln in err.splitlines()) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    for text in expected:
        assert text in err, (text, err)


def write_recipe(path: Path, shapes: Path, train: Path | None = None, **data) -> Path:
    raw = {
        "backbone": "tiny",
        "output_dir": str(path.parent / "run"),
        "data": {
            "train": [{"path": str(train or shapes / "train.json"), "image_folder": str(shapes / "images")}],
            "eval": [{"path": str(shapes / "eval.json"), "image_folder": str(shapes / "images")}],
            "max_length": 256,
            **data,
        },
        "quantization": {"compute_dtype": "float32"},
    }
    path.write_text(yaml.safe_dump(raw))
    return path


def conv(*turns: str) -> list[dict]:
    """conv("human: Q", "gpt: A") -> LLaVA conversation turns."""
    out = []
    for t in turns:
        who, _, value = t.partition(": ")
        out.append({"from": who, "value": value})
    return out


GOOD_TURNS = conv("human: <image>\nWhat color is the shape?", "gpt: Red")


def read_one(folder: Path, record: dict):
    path = folder.parent / "one.json"
    path.write_text(json.dumps([record]))
    return read_source(DataSource(path=str(path), image_folder=str(folder)))


def draw_shape(path, w, h):
    img = Image.new("RGB", (w, h), (230, 230, 230))
    ImageDraw.Draw(img).ellipse([w // 4, h // 4, 3 * w // 4, 3 * h // 4], fill=(200, 20, 20))
    img.save(path)


def base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


LM = "model.language_model"


VISION = "model.vision_tower"


PROJECTOR = "model.multi_modal_projector"


PEFT_PREFIX = "base_model.model."


def is_4bit(m: torch.nn.Module) -> bool:
    return isinstance(m, bnb.nn.Linear4bit)


def quiet(*_):
    pass


def align_data(tmp_path, shapes, extra=()):
    recs = json.loads((shapes / "align.json").read_text())[:12] + list(extra)
    path = tmp_path / "align.json"
    path.write_text(json.dumps(recs))
    return {"train": [{"path": str(path), "image_folder": str(shapes / "images")}], "eval": []}


def shipped_recipes() -> list[Path]:
    """The training recipes under recipes/ (recipes/datagen holds lora-llava data generate's configs)."""
    return sorted(
        p
        for p in (REPO / "recipes").rglob("*.yaml")
        if p.relative_to(REPO / "recipes").parts[0] not in ("datagen", "accelerate")
    )


N_IMAGE_TOKENS = 16  # tiny: 32 px image, 8 px patches -> 4 x 4 (CLS dropped by the "default" strategy)


def adapted_model(prepared, recipe, lora_b_std: float):
    """The model as training builds it for ``recipe`` (base + adapters), seeded, with LoRA B drawn from
    N(0, lora_b_std) instead of zero so that the adapters change the outputs a test compares."""
    from lora_llava.model.loading import load_base
    from lora_llava.model.trainability import attach_adapters

    torch.manual_seed(0)
    model, _ = load_base(prepared.spec, recipe.quantization)
    model = attach_adapters(model, prepared.spec, recipe)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, lora_b_std)
    return model


def unseal(folder: Path) -> Path:
    """``folder`` (an adapter or merged model) as lora_llava wrote it before manifests: no manifest.json, and its
    metadata not sealed, so loading checks it key by key only (what the tests of those checks damage)."""
    (folder / "manifest.json").unlink(missing_ok=True)
    meta = json.loads((folder / "lora_llava.json").read_text())
    meta["sealed"] = False
    (folder / "lora_llava.json").write_text(json.dumps(meta))
    return folder


class LockHolder:
    """Another process holding ``lock`` (``fsutil.hold_lock``) for the ``with`` block; ``.pid`` is its pid."""

    def __init__(self, lock: Path) -> None:
        self.lock = lock

    def __enter__(self) -> LockHolder:
        import subprocess
        import sys

        code = (
            "import sys, time; from pathlib import Path; from lora_llava.layout import hold_lock\n"
            f"hold_lock(Path({str(self.lock)!r}), 'x'); print('held', flush=True); time.sleep(60)"
        )
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "held"
        self.pid = self.proc.pid
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()


class Child:
    """A command in a child process (a ``lora-llava train``, alone or under a launcher), its output (stdout and
    stderr together) read line by line as it comes."""

    def __init__(self, cmd: list[str], env: dict[str, str], limit: float) -> None:
        self.limit = limit  # seconds before waiting calls it a hang
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def wait_for(self, text: str, timeout: float | None = None) -> None:
        end = time.time() + (timeout or self.limit)
        while not any(text in ln for ln in self.lines):
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {text!r}:\n{self.output}"
            assert time.time() < end, f"no {text!r} after {timeout or self.limit}s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float | None = None) -> int:
        import pytest

        try:
            code = self.proc.wait(timeout=timeout or self.limit)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            pytest.fail(f"no end after {timeout or self.limit}s (a hang):\n{self.output}")
        self._reader.join(timeout=10)
        return code

    def workers(self) -> list[int]:
        """The pids of the processes this one started (a launcher's workers, in rank order)."""
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True).stdout
        return sorted(int(p) for p in out.split())

    @property
    def output(self) -> str:
        return "".join(self.lines)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """An adapter directory's LoRA weights and its projector's (``projector/`` before their names)."""
    from safetensors.torch import load_file

    out = load_file(folder / "adapter_model.safetensors")
    out.update({f"projector/{k}": v for k, v in load_file(folder / "projector.safetensors").items()})
    return out
