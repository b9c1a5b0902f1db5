"""What ``lora-llava env`` reports for a bug report: versions, device, cache folders, the Hub.

Usage::

    env = environment()                     # {"packages": {...}, "runtime": {...}, "cache": {...}, "hub": {...}}
    env = environment(check_hub=False)      # no connection attempt: hub.reachable is None
"""

from __future__ import annotations

from typing import Any

from lora_llava.versions import PACKAGES, REPORTED, bitsandbytes_backend, package_versions, runtime


def environment(check_hub: bool = True) -> dict[str, Any]:
    """What ``lora-llava env`` prints for a bug report, as one JSON-ready dict:

    - ``packages``: name -> version (None: not installed), PACKAGES then REPORTED;
    - ``runtime``: runtime() plus every GPU's name, cuDNN (CUDA builds), ROCm's HIP (ROCm builds) and the
      bitsandbytes backend, for which bitsandbytes is imported (quietly);
    - ``cache``: lora_llava's cache folder and where it comes from, the Hugging Face hub cache and HF_HOME;
    - ``hub``: ``offline`` (HF_HUB_OFFLINE), ``reachable`` (one short connection attempt; None when
      ``check_hub`` is False and nothing was tried), ``endpoint``, and ``reason`` when it is not reachable.
    """
    import os

    import torch
    from huggingface_hub import constants

    from lora_llava.fsutil import cache_root
    from lora_llava.hub import hub_reachable, offline_reason

    info = runtime()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    info["gpus"] = gpus
    info["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(gpus)]
    info["cudnn"] = _cudnn_version() if torch.version.cuda else None
    info["hip"] = getattr(torch.version, "hip", None)  # None but for a ROCm build of torch
    info["bitsandbytes_backend"] = _quiet_bitsandbytes_backend()

    if os.environ.get("LORA_LLAVA_CACHE"):
        cache_from = "LORA_LLAVA_CACHE"
    elif os.environ.get("XDG_CACHE_HOME"):
        cache_from = "XDG_CACHE_HOME"
    else:
        cache_from = "default"
    cache = {
        "lora_llava": str(cache_root()),
        "lora_llava_from": cache_from,
        "hf_hub": str(constants.HF_HUB_CACHE),
        "hf_home": str(constants.HF_HOME),
    }

    offline = bool(constants.HF_HUB_OFFLINE)
    reachable: bool | None = False if offline else (hub_reachable() if check_hub else None)
    hub = {
        "offline": offline,
        "reachable": reachable,
        "endpoint": str(constants.ENDPOINT),
        "reason": offline_reason() if reachable is False else None,
    }
    info.update(_machine())
    settings = {name: os.environ.get(name) for name in SETTINGS}
    settings["HF_TOKEN"] = "set" if os.environ.get("HF_TOKEN") else None  # whether, never the value
    return {
        "packages": package_versions(PACKAGES + REPORTED),
        "source": _source(),
        "runtime": info,
        "cache": cache,
        "hub": hub,
        "settings": settings,
    }


# environment variables that change what lora_llava does (HF_TOKEN is reported as set or not, never shown)
SETTINGS = (
    "HF_HUB_OFFLINE", "HF_HOME", "LORA_LLAVA_CACHE", "LORA_LLAVA_THIRD_PARTY", "USE_HUB_KERNELS",
    "CUDA_VISIBLE_DEVICES", "WANDB_MODE",
)  # fmt: skip


def _machine() -> dict[str, Any]:
    """The OS release, CPU model, cores and memory."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    os_name = platform.system()
    try:
        release = dict(line.rstrip().split("=", 1) for line in open("/etc/os-release", encoding="utf-8") if "=" in line)
        os_name = release.get("PRETTY_NAME", os_name).strip('"')
    except OSError:
        pass
    try:
        memory: int | None = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {"os": os_name, "cpu": cpu, "cpu_count": os.cpu_count(), "memory_bytes": memory}


def _source() -> dict[str, Any]:
    """Where lora_llava is imported from and, in a git checkout, its commit (read from .git, no git run)."""
    from pathlib import Path

    package = Path(__file__).resolve().parent
    out: dict[str, Any] = {"path": str(package), "commit": None}
    git = package.parent / ".git"
    try:
        head = (git / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = head[5:]
            ref_file = git / ref
            if ref_file.is_file():
                head = ref_file.read_text().strip()
            else:  # a packed ref
                packed = (git / "packed-refs").read_text().splitlines()
                head = next((line.split()[0] for line in packed if line.endswith(" " + ref)), "")
        out["commit"] = head[:12] or None
    except OSError:
        pass
    return out


def _cudnn_version() -> int | None:
    import torch

    try:
        return torch.backends.cudnn.version()
    except (RuntimeError, OSError):  # a CUDA build whose cuDNN library cannot be loaded
        return None


def _quiet_bitsandbytes_backend() -> str | None:
    """bitsandbytes_backend(import_it=True) without what importing bitsandbytes may print or warn: a bug
    report's JSON stays the only thing on stdout; a failing import is reported, not raised."""
    import contextlib
    import io
    import logging
    import warnings

    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR + 1)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            return bitsandbytes_backend(import_it=True)
    except Exception as e:  # a broken install: the report says so instead of a traceback
        return f"error: {type(e).__name__}: {e}".splitlines()[0]
    finally:
        logger.setLevel(level)
