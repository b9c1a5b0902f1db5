"""Directories that are whole or absent, and what a killed writer leaves behind is cleaned up."""

from __future__ import annotations

import os

import pytest

from lora_llava.errors import UserError
from lora_llava.fsutil import atomic_dir


def test_a_killed_writers_temporary_folder_is_removed_and_a_live_ones_kept(tmp_path):
    dead = tmp_path / ".merged-2147480000-abcd"  # no such process
    alive = tmp_path / f".merged-{os.getpid()}-efgh"  # a writer still at work
    other = tmp_path / ".unrelated-2147480000-x"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "part.safetensors").write_bytes(b"x")
    with atomic_dir(tmp_path / "merged") as tmp:
        (tmp / "done").write_text("ok")
    assert (tmp_path / "merged" / "done").read_text() == "ok"
    assert not dead.exists() and alive.exists() and other.exists()


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out"):
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        with atomic_dir(tmp_path / "f"):
            pass
