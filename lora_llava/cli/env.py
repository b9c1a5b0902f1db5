"""lora-llava env: the versions, device, cache folders and Hub access to paste into a bug report."""

from __future__ import annotations

import argparse
from typing import Any

HELP = "print the package versions, device, CUDA, cache folders and Hub access (paste it into a bug report)"
EPILOG = """examples:
  lora-llava env                     (text: packages, runtime, cache folders, the Hub)
  lora-llava env --no-network        (the same, without trying to reach the Hub)
  lora-llava env --json              (one JSON object, for scripts)

nothing secret is printed: HF_TOKEN shows only "set" or "unset", never its value"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument(
        "--no-network", action="store_true", help="do not try to reach the Hugging Face Hub (it shows 'not checked')"
    )


def run(args: argparse.Namespace) -> int:
    import json

    from lora_llava.environment import environment

    env = environment(check_hub=not args.no_network)
    if args.json:
        print(json.dumps(env, indent=2))
    else:
        print(render(env))
    return 0


def render(env: dict[str, Any]) -> str:
    """The text form of environment.environment(): one section after another, "key: value" lines aligned."""
    packages, rt, cache, hub = env["packages"], env["runtime"], env["cache"], env["hub"]
    sections: list[tuple[str, list[tuple[str, str]]]] = [
        ("packages", [(name, version or "not installed") for name, version in packages.items()]),
        (
            "runtime",
            [
                ("python", rt["python"]),
                ("platform", rt["platform"]),
                ("os", rt.get("os") or "unknown"),
                ("cpu", f"{rt.get('cpu')} ({rt.get('cpu_count')} cores)"),
                ("memory", f"{rt['memory_bytes'] / 2**30:.1f} GiB" if rt.get("memory_bytes") else "unknown"),
                ("device", _device(rt)),
                ("torch CUDA", _cuda(rt)),
                *([("cuDNN", str(rt["cudnn"]) if rt["cudnn"] else "not available")] if rt["cuda"] else []),
                ("bitsandbytes backend", _bnb(rt, packages)),
            ],
        ),
        (
            "cache",
            [
                ("lora_llava", f"{cache['lora_llava']} ({_cache_from(cache['lora_llava_from'])})"),
                ("Hugging Face hub", cache["hf_hub"]),
                ("HF_HOME", cache["hf_home"]),
            ],
        ),
        ("Hugging Face Hub", [("status", _hub(hub))]),
        ("lora_llava source", [("path", env["source"]["path"]), ("git commit", env["source"]["commit"] or "none")]),
        ("settings", [(name, value if value is not None else "unset") for name, value in env["settings"].items()]),
    ]
    width = max(len(key) for _, rows in sections for key, _ in rows) + 1
    lines: list[str] = []
    for title, rows in sections:
        lines += ["", f"{title}:"] if lines else [f"{title}:"]
        lines += [f"  {key + ':':<{width}} {value}" for key, value in rows]
    return "\n".join(lines)


def _device(rt: dict[str, Any]) -> str:
    names: list[str] = rt.get("gpu_names") or []
    if not names:
        return f"CPU ({rt['device'].removeprefix('cpu: ')}), no GPU visible to torch"
    distinct = list(dict.fromkeys(names))
    shown = ", ".join(f"{names.count(n)} x {n}" if names.count(n) > 1 else n for n in distinct)
    return f"{shown} ({len(names)} GPU{'s' if len(names) > 1 else ''})"


def _cuda(rt: dict[str, Any]) -> str:
    if rt["cuda"]:
        return str(rt["cuda"])
    if rt.get("hip"):
        return f"none (ROCm build, HIP {rt['hip']})"
    return "none (CPU build)"


def _bnb(rt: dict[str, Any], packages: dict[str, str | None]) -> str:
    backend = rt.get("bitsandbytes_backend")
    if backend:
        return str(backend)
    return "none (bitsandbytes not installed)" if not packages.get("bitsandbytes") else "none (cannot import it)"


def _cache_from(source: str) -> str:
    return {"LORA_LLAVA_CACHE": "from LORA_LLAVA_CACHE", "XDG_CACHE_HOME": "under XDG_CACHE_HOME"}.get(
        source, "default; set LORA_LLAVA_CACHE to move it"
    )


def _hub(hub: dict[str, Any]) -> str:
    if hub["offline"]:
        return f"offline ({hub['reason']})"
    if hub["reachable"] is None:
        return "not checked (--no-network)"
    if hub["reachable"]:
        return f"reachable ({hub['endpoint']})"
    return f"unreachable ({hub['reason']})"
