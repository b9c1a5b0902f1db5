"""The software and hardware lora_llava runs with: stamped into every artifact, printed by ``lora-llava env``.

Usage::

    package_versions()        # {"lora_llava": "0.2.0", "torch": "2.13.0+cpu", ..., "trl": None}: no package is imported
    stamp()                   # package_versions() + device, CUDA, bitsandbytes backend: what an artifact records
    environment()             # {"packages", "runtime", "cache", "hub"}: what lora-llava env prints for a bug report
    drift(saved, stamp())     # ["transformers 5.25.0 -> 5.30.1"]: major/minor changes of the packages that load it

An artifact made with another major/minor version of transformers or peft may name its weights
differently; ``drift`` is what the loaders warn about (``lora_llava.artifacts``).
"""

from __future__ import annotations

import sys
from importlib import metadata
from typing import Any

# the packages whose versions decide how a model is built, trained, saved and loaded
PACKAGES = ("lora_llava", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "trl")
# the other packages a bug report names (installed or not): data, Hub, weights, kernels, logging, demo
REPORTED = (
    "datasets", "huggingface_hub", "safetensors", "tokenizers", "kernels", "numpy", "pillow", "wandb", "gradio",
)  # fmt: skip
# the packages whose major/minor versions decide how saved weights are named and loaded
LOADERS = ("transformers", "peft")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each package (None: not installed), read from its metadata, imported by nobody."""
    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if out.get("lora_llava") is None and "lora_llava" in names:  # run from a source tree that is not installed
        out["lora_llava"] = getattr(sys.modules.get("lora_llava"), "__version__", None)
    return out


def runtime() -> dict[str, Any]:
    """The device torch computes on, its CUDA version and the bitsandbytes backend in use (when loaded)."""
    import platform

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["device"] = f"cuda: {torch.cuda.get_device_name(0)}"
        info["gpus"] = torch.cuda.device_count()
    else:
        info["device"] = f"cpu: {platform.machine()}"
    info["cuda"] = torch.version.cuda  # None for a CPU build of torch
    info["bitsandbytes_backend"] = bitsandbytes_backend(import_it=False)
    return info


def bitsandbytes_backend(import_it: bool = True) -> str | None:
    """bitsandbytes' native backend ("CUDA", "ROCm", "XPU", "CPU"), or None when it is not installed (or,
    with ``import_it=False``, not loaded by this process: importing it only to stamp an artifact is not worth it)."""
    if not import_it and "bitsandbytes" not in sys.modules:
        return None
    try:
        from bitsandbytes import cextension
    except ImportError:
        return None
    backend = getattr(cextension, "BNB_BACKEND", None)
    lib = getattr(cextension, "lib", None)
    if backend and lib is not None and type(lib).__name__.startswith("ErrorHandlerMock"):
        return f"{backend} (native library not loaded: slow fallback)"
    return backend


def hardware() -> str:
    """Where this process trains, in words: the GPU's name and CUDA version, or the CPU and its threads."""
    import platform

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} thread(s))"


def stamp() -> dict[str, Any]:
    """What an artifact records: package versions and the runtime (device, CUDA, bitsandbytes backend)."""
    return {**package_versions(), **runtime()}


def _major_minor(version: str | None) -> tuple[str, ...] | None:
    if not version:
        return None
    parts = version.split("+")[0].split(".")
    return tuple(parts[:2])


def drift(saved: dict[str, Any], now: dict[str, Any], names: tuple[str, ...] = LOADERS) -> list[str]:
    """``"name saved -> now"`` for each package in ``names`` whose major/minor version differs (an empty
    ``saved``, from an artifact older than version stamps, reports nothing)."""
    out = []
    for name in names:
        then, current = saved.get(name), now.get(name)
        if then and current and _major_minor(then) != _major_minor(current):
            out.append(f"{name} {then} -> {current}")
    return out
