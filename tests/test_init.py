"""The public API: ``import lora_llava`` is light, has no side effects, and names the main jobs."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_changes_no_process_wide_setting():
    got = _run(
        "import json, PIL.Image, torch\n"
        "before = (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads())\n"
        "import lora_llava, lora_llava.data.images, lora_llava.training.run, lora_llava.infer, lora_llava.cli.main\n"
        "print(json.dumps({'before': before, 'after': (PIL.Image.MAX_IMAGE_PIXELS, torch.get_num_threads())}))"
    )
    assert got["before"] == got["after"]


def test_import_is_light_and_names_the_public_api():
    got = _run(
        "import json, sys, lora_llava\n"
        "print(json.dumps({'heavy': sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules),"
        " 'version': lora_llava.__version__, 'all': lora_llava.__all__}))"
    )
    assert got["heavy"] == []
    from importlib.metadata import version

    import lora_llava

    assert got["version"] == lora_llava.__version__ == version("lora_llava")
    for name in ("load_recipe", "train", "load_model", "evaluate", "merge", "open_artifact", "read_data"):
        assert name in got["all"] and callable(getattr(lora_llava, name)), name
    from lora_llava.merging import merge
    from lora_llava.workflows import train

    assert lora_llava.merge is merge and lora_llava.train is train  # the functions, not same-named modules
