"""Third parties speak through lora_llava: their lines go to a log file, none reaches the terminal, and no
command looks anything up on the network that it does not need (kernels, telemetry)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# loaded by every Python process started with this folder on PYTHONPATH: records each name lookup and
# connection attempt (then lets it fail, as on a machine without network), and with FAKE_AVX512BF16 makes
# bitsandbytes believe the CPU has AVX512-BF16, the CPUs on which it asks the Hub for a 4-bit kernel
SITECUSTOMIZE = textwrap.dedent(
    """
    import importlib.abc, importlib.machinery, os, socket, sys

    def _record(what):
        with open(os.environ["NET_LOG"], "a") as f:
            f.write(what + "\\n")
        raise OSError("no network here (test)")

    socket.getaddrinfo = lambda host, *a, **k: _record(f"getaddrinfo {host}")
    socket.socket.connect = lambda self, addr: _record(f"connect {addr}")

    class _FakeAvx(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != "bitsandbytes.functional":
                return None
            spec = importlib.machinery.PathFinder.find_spec(name, path)
            run = spec.loader.exec_module
            def exec_module(module):
                run(module)
                module.has_avx512bf16 = lambda: True
            spec.loader.exec_module = exec_module
            return spec

    if os.environ.get("FAKE_AVX512BF16"):
        sys.meta_path.insert(0, _FakeAvx())
    """
)


def _cli(tmp_path: Path, *args: str, offline: bool, cwd: Path | None = None) -> tuple[subprocess.CompletedProcess, str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    net_log = tmp_path / f"net-{len(list(tmp_path.glob('net-*')))}.log"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "USE_HUB_KERNELS")}
    env.update(PYTHONPATH=str(site), NET_LOG=str(net_log), FAKE_AVX512BF16="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "lora_llava.cli.main", *args],
        capture_output=True, text=True, timeout=300, cwd=cwd or tmp_path, env=env,
    )  # fmt: skip
    return proc, net_log.read_text() if net_log.exists() else ""


@pytest.mark.parametrize("offline", [False, True])
def test_a_mistyped_recipe_prints_exactly_its_two_lines_and_touches_no_network(tmp_path, offline):
    proc, network = _cli(tmp_path, "check", "quickstrat", offline=offline)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr == (
        "error: no recipe 'quickstrat': not a file and not a built-in recipe\n"
        "hint: did you mean 'quickstart'? list them with: lora-llava recipes\n"
    )
    assert network == ""


@pytest.mark.parametrize("offline", [False, True])
def test_check_of_a_builtin_backbone_reaches_no_network(tmp_path, tiny_path, offline):
    """bitsandbytes on an AVX512-BF16 CPU asks the Hub for a kernel (and its `kernels` package says so on
    stderr); transformers >= 5.25 would kernelize every model it loads. Neither may happen here."""
    proc, network = _cli(tmp_path, "check", "quickstart", offline=offline)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == "ok"
    assert network == ""


def test_training_keeps_third_party_lines_in_the_run_and_loads_no_hub_kernel(tmp_path, tiny_path, shapes):
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", shapes)
    out = tmp_path / "run"
    proc, network = _cli(tmp_path, "train", str(recipe), f"output_dir={out}", "train.max_steps=2", offline=False)
    assert proc.returncode == 0, proc.stderr
    assert network == ""
    assert proc.stderr == ""
    for line in proc.stdout.splitlines():  # lora_llava's own lines only: no logger or warnings format
        assert "Warning:" not in line and "WARNING" not in line and "warnings.warn" not in line, line
    log = (out / "third_party.log").read_text()
    assert log.startswith("# ") and "lora-llava train" in log.splitlines()[0]


def _settled(tmp_path: Path, code: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    script = "from pathlib import Path\nfrom lora_llava import thirdparty\n"
    script += f"thirdparty.settle('probe', cache=Path({str(tmp_path)!r}))\n" + textwrap.dedent(code)
    env = {k: v for k, v in os.environ.items() if k not in ("USE_HUB_KERNELS", "HF_HUB_DISABLE_TELEMETRY")}
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)


def test_warnings_and_library_loggers_go_to_the_log_file(tmp_path):
    proc = _settled(
        tmp_path,
        f"""
        import logging, warnings
        from transformers.utils import logging as hf_logging
        hf_logging.get_logger("transformers.x").warning("a transformers warning")
        from datasets.utils import logging as ds_logging
        ds_logging.get_logger("datasets.y").warning("a datasets warning")
        logging.getLogger("kernels.z").warning("a kernels warning")
        warnings.warn("a python warning", UserWarning)
        thirdparty.log_into(Path({str(tmp_path)!r}) / "run" / "third_party.log")
        logging.getLogger("PIL.Image").warning("after the run dir is known")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == ""
    default = (tmp_path / "logs" / "probe.log").read_text()
    for text in ("a transformers warning", "a datasets warning", "a kernels warning", "a python warning"):
        assert text in default
    moved = (tmp_path / "run" / "third_party.log").read_text()
    for text in ("a transformers warning", "a python warning", "after the run dir is known"):
        assert text in moved  # what came before is replayed into the run's log
    assert "after the run dir is known" not in default


def test_lines_that_change_the_run_become_one_warning_of_ours(tmp_path):
    proc = _settled(
        tmp_path,
        """
        import logging
        log = logging.getLogger("bitsandbytes.cextension")
        log.error("bitsandbytes library load error: libcudart.so.13: cannot open shared object file")
        log.error("bitsandbytes library load error: again")
        """,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: bitsandbytes could not load its native library")
    assert str(tmp_path / "logs" / "probe.log") in lines[0]
    assert "libcudart.so.13" in (tmp_path / "logs" / "probe.log").read_text()


def test_show_mode_also_prints_the_lines_as_written(tmp_path):
    proc = _settled(
        tmp_path,
        "import logging\nlogging.getLogger('datasets').warning('shown')\n",
        {"LORA_LLAVA_THIRD_PARTY": "show"},
    )
    assert "WARNING datasets: shown" in proc.stderr


def test_settle_blocks_hub_kernels_and_telemetry(tmp_path):
    proc = _settled(
        tmp_path,
        """
        import os
        try:
            import kernels
        except ImportError:
            print("blocked")
        print(os.environ["USE_HUB_KERNELS"], os.environ["HF_HUB_DISABLE_TELEMETRY"])
        """,
    )
    assert proc.stdout.split() == ["blocked", "NO", "1"], proc.stderr
