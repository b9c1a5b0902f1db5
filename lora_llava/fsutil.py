"""Directories that are whole or absent.

Usage::

    with atomic_dir("runs/x/merged") as tmp:      # a temporary sibling
        model.save_pretrained(tmp)
    # renamed into place only if the block finished; on any error the temporary folder is removed

With ``replace=True`` an existing target is swapped out (and deleted) only after the new one is
complete; otherwise the target must be absent or an empty folder.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


_HELD: dict[str, Any] = {}  # lock files this process holds, by resolved path (an open file each)


def hold_lock(lock_file: Path, what: str) -> None:
    """Hold an exclusive lock on ``lock_file`` until ``release_lock`` (or the process ends): a second process asking
    for it gets a UserError naming ``what`` and the holder's pid. Reentrant within one process. A file of someone
    else's at that name (a link, a folder, anything but a pid) is refused and left as it is. Where the platform
    has no ``fcntl`` (Windows), nothing is locked."""
    key = str(lock_file.resolve())
    if key in _HELD:
        return
    if lock_file.is_symlink() or lock_file.is_dir() or (lock_file.is_file() and not _pid_only(lock_file)):
        raise UserError(
            f"{str(lock_file)!r} is not a lock file of lora_llava (the lock of {what}); it is left as it is",
            hint="move that file away, or choose another output",
        )
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return
    while True:
        f = open(lock_file, "a+")  # noqa: SIM115 - held open until released
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            f.close()
            raise UserError(
                f"{what} is in use by another lora_llava process (pid {holder})",
                hint="wait for it to finish, or choose another output",
            ) from None
        try:  # the file may have been released and removed between our open and our lock: lock the one there now
            same = os.stat(lock_file).st_ino == os.fstat(f.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        f.close()
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    _HELD[key] = f


def lock_holder(lock_file: Path) -> str | None:
    """The pid another process holds ``lock_file`` with (``hold_lock``), or None when nobody does (asked without
    taking it, and without creating the file)."""
    if str(lock_file.resolve()) in _HELD:
        return None  # this process's own
    try:
        import fcntl

        f = open(lock_file)  # noqa: SIM115
    except (ImportError, OSError):
        return None
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return f.read().strip() or "unknown"
        except OSError:
            return None
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return None


def _pid_only(path: Path) -> bool:
    """A lock file as ``hold_lock`` leaves it: empty, or a process id."""
    held = path.read_bytes()[:64].strip()
    return held == b"" or held.isdigit()


def release_lock(lock_file: Path) -> None:
    """Free the lock and remove its file (a process that opened it meanwhile finds it gone and locks anew)."""
    f = _HELD.pop(str(lock_file.resolve()), None)
    if f is not None:
        with contextlib.suppress(OSError):
            lock_file.unlink()
        f.close()  # closing the file releases the lock
