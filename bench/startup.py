"""How long the light commands take from a cold process, and what they import.

    python bench/startup.py                 # check, plan, recipes, --help on quickstart: 7 runs each
    python bench/startup.py --runs 15

Each command runs in a fresh ``python -m lora_llava.cli.main`` process (wall time, best and median), after one
warm-up run that builds the tiny backbone, writes the synthetic data and fills lora_llava's cache of LoRA
target names. Beside them, the floor: ``import torch`` and the import of transformers' LLaVA modeling code,
which ``plan`` needs to build its meta-device model. The last column lists which of torch, peft,
bitsandbytes, transformers' modeling code and its Trainer each command left in ``sys.modules``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "check quickstart": ["check", "quickstart"],
    "plan quickstart": ["plan", "quickstart"],
    "recipes": ["recipes"],
    "--help": ["--help"],
}
FLOORS = {
    "import torch": "import torch",
    "import torch + LLaVA modeling": "import torch, transformers.models.llava.modeling_llava",
}
HEAVY = ("torch", "peft", "bitsandbytes", "transformers.modeling_utils", "transformers.trainer")
PROBE = """
import contextlib, io, json, sys
from lora_llava.cli.main import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main({argv!r})
    except SystemExit:
        pass
print(json.dumps([m for m in {heavy!r} if m in sys.modules]))
"""


def wall(argv: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    py = sys.executable
    env_note = f"{os.cpu_count()} CPU cores, python {sys.version.split()[0]}"
    print(f"{args.runs} runs each; {env_note}")
    print(f"{'command':34} {'best s':>7} {'median s':>9}  imported")
    for name, argv in COMMANDS.items():
        cmd = [py, "-m", "lora_llava.cli.main", *argv]
        wall(cmd)  # warm-up: tiny backbone, synthetic data, target-name cache
        times = sorted(wall(cmd) for _ in range(args.runs))
        probe = subprocess.run(
            [py, "-c", PROBE.format(argv=argv, heavy=HEAVY)], capture_output=True, text=True, check=False
        )
        lines = probe.stdout.strip().splitlines()
        heavy = ", ".join(json.loads(lines[-1])) if lines else "?"
        print(f"{name:34} {times[0]:7.2f} {statistics.median(times):9.2f}  {heavy or '-'}")
    for name, code in FLOORS.items():
        times = sorted(wall([py, "-c", code]) for _ in range(args.runs))
        print(f"{name:34} {times[0]:7.2f} {statistics.median(times):9.2f}  (floor)")


if __name__ == "__main__":
    main()
