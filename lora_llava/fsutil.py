"""Directories that are whole or absent.

Usage::

    with atomic_dir("runs/x/merged") as tmp:      # a temporary sibling
        model.save_pretrained(tmp)
    # renamed into place only if the block finished; on any error the temporary folder is removed

With ``replace=True`` an existing target is swapped out (and deleted) only after the new one is
complete; otherwise the target must be absent or an empty folder.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_llava.errors import UserError


@contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a directory", hint="choose a new directory")
    if not replace and target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not empty", hint="choose a new directory or delete it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield tmp
        old = target.parent / f".{target.name}-old"
        if target.exists():
            if replace:
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
            else:
                target.rmdir()
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
