"""Every example runs from its README line (shortened with STEPS=40), offline, on the tiny backbones."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run(name: str, cwd: Path) -> str:
    (cwd / "examples").symlink_to(EXAMPLES)
    readme = (EXAMPLES / name / "README.md").read_text()
    command = f"bash examples/{name}/run.sh"
    assert f"```bash\n{command}\n```" in readme  # the command the README gives is the one run here
    env = {**os.environ, "STEPS": "40", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    return run.stdout


def test_examples_are_listed():
    index = (EXAMPLES / "README.md").read_text()
    folders = sorted(p.name for p in EXAMPLES.iterdir() if p.is_dir())
    assert folders == ["domain_adaptation", "own_jsonl_format", "publish", "two_stage"]
    for name in folders:
        assert f"`bash examples/{name}/run.sh`" in index


def test_domain_adaptation(tmp_path):
    out = _run("domain_adaptation", tmp_path)
    assert "192 training conversations" in out and "48 held out" in out
    assert re.search(r"accuracy \d\.\d{3} \(\d+/48\) — adapter .* on the run's eval data", out)
    assert "parity on 4 samples" in out
    assert out.rstrip().splitlines()[-1] in ("Top left", "Top right", "Bottom left", "Bottom right")


def test_own_jsonl_format(tmp_path):
    out = _run("own_jsonl_format", tmp_path)
    assert re.search(r"train +240 +0 ", out) and out.count("\nok\n") + out.startswith("ok") >= 1
    assert re.search(r"accuracy \d\.\d{3} \(\d+/48\)", out)


def test_two_stage(tmp_path):
    out = _run("two_stage", tmp_path)
    assert "stage 1 done" in out and re.search(r"accuracy  base 0\.000 -> adapter \d\.\d{3}", out)
    assert (tmp_path / "runs/examples/two_stage/align/model/config.json").is_file()


def test_publish(tmp_path):
    out = _run("publish", tmp_path)
    assert "repo: me/my-llava-adapter (private), revision: main, adapter" in out
    assert "repo: me/my-llava (private), revision: main, merged" in out
    assert out.count("nothing uploaded (--dry-run)") == 2


@pytest.mark.parametrize("name", ["domain_adaptation", "own_jsonl_format", "two_stage", "publish"])
def test_each_example_has_a_readme_with_its_command(name):
    readme = (EXAMPLES / name / "README.md").read_text()
    assert readme.startswith("# ") and f"bash examples/{name}/run.sh" in readme
