"""Print the lock (constraints.txt) of the active environment: every installed distribution at its exact version.

Run by ``LORA_LLAVA_DEPS=refresh bash .ci/run`` after the tests passed with the newest allowed versions.
Local version labels are left out (``torch==2.13.0`` matches the CPU and the CUDA builds alike).
"""

import platform
import re
import sys
import time
from importlib import metadata

SKIP = {"lora-llava", "pip", "setuptools", "wheel"}


def main() -> None:
    pins = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name and re.sub(r"[-_.]+", "-", name).lower() not in SKIP:
            pins[name.lower()] = dist.version.split("+")[0]
    print("# lora_llava's lock: the exact versions the tests last passed with; CI and the README install with it.")
    print(f"# Made {time.strftime('%Y-%m-%d')} on Python {platform.python_version()} ({sys.platform}, CPU build of torch).")
    print("# Refresh: LORA_LLAVA_DEPS=refresh bash .ci/run  (newest versions pyproject.toml allows, tests, then this file)")
    for name in sorted(pins):
        print(f"{name}=={pins[name]}")


if __name__ == "__main__":
    main()
