"""Directories that are whole or absent.

Usage::

    with atomic_dir("runs/x/merged") as tmp:      # a temporary sibling
        model.save_pretrained(tmp)
    # renamed into place only if the block finished; on any error the temporary folder is removed

With ``replace=True`` an existing target is swapped out (and deleted) only after the new one is
complete; otherwise the target must be absent or an empty folder. (Locks on outputs: ``lora_llava.layout``.)
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora_llava.errors import UserError


def cache_root() -> Path:
    """lora_llava's cache folder: ``LORA_LLAVA_CACHE``, else ``$XDG_CACHE_HOME/lora_llava`` (``~/.cache/lora_llava``)."""
    base = os.environ.get("LORA_LLAVA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lora_llava"
    )
    return Path(base)


def _remove_abandoned(target: Path) -> None:
    """Delete temporary siblings of ``target`` left by a process that no longer runs (a killed merge)."""
    for tmp in target.parent.glob(f".{glob.escape(target.name)}-*"):  # a name like '*' matches only itself
        pid = tmp.name[len(target.name) + 2 :].split("-", 1)[0]
        if tmp.is_dir() and (tmp.name.endswith("-old") or (pid.isdigit() and not _alive(int(pid)))):
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def atomic_dir(target: str | Path, replace: bool = False) -> Iterator[Path]:
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise UserError(f"{target} is a file, not a directory", hint="choose a new directory")
    if not replace and target.exists() and any(target.iterdir()):
        raise UserError(f"{target} exists and is not empty", hint="choose a new directory or delete it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-{os.getpid()}-", dir=target.parent))
        tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would outlive the rename: others could not read a model
    except OSError as e:
        raise UserError(
            f"cannot write {target}: {e.strerror or e}", hint="choose a directory you can write to"
        ) from None
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
