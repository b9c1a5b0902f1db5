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


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_folder_gets_the_umask_s_permissions_not_mkdtemp_s(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "merged") as tmp:
            (tmp / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "merged").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_name_with_glob_characters_cleans_up_only_its_own_leftovers(tmp_path):
    mine = tmp_path / ".*-2147480000-abcd"  # a killed writer of a folder literally named '*'
    users = [tmp_path / ".vim-old", tmp_path / ".config-2147480000-x", tmp_path / ".cache-old"]
    for d in (mine, *users):
        d.mkdir()
    with atomic_dir(tmp_path / "*") as tmp:
        (tmp / "done").write_text("ok")
    assert not mine.exists() and all(d.exists() for d in users)
