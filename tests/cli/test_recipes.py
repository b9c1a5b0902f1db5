"""lora-llava recipes: list, show, copy, backbones, keys, validate."""

from __future__ import annotations

import yaml
from helpers import assert_user_error, run_cli, shipped_recipes


def test_recipes_list(capsys):
    code, out, _ = run_cli(capsys, "recipes")
    assert code == 0
    names = [ln.split()[0] for ln in out.splitlines()]
    assert {"quickstart", "llava-1.5-7b/qlora", "llava-1.5-13b/qlora"} <= set(names)
    assert (
        next(ln for ln in out.splitlines() if ln.startswith("quickstart "))
        .split(None, 1)[1]
        .startswith("Quickstart: QLoRA on the offline `tiny` backbone")
    )


def test_recipes_show(capsys):
    from lora_llava.recipes import recipe_path

    code, out, _ = run_cli(capsys, "recipes", "show", "quickstart")
    assert code == 0
    assert out == recipe_path("quickstart").read_text()
    assert yaml.safe_load(out)["backbone"] == "tiny"


def test_recipes_copy_refuses_to_overwrite(capsys, tmp_path):
    from lora_llava.recipes import recipe_path

    dest = tmp_path / "sub" / "mine.yaml"
    code, out, _ = run_cli(capsys, "recipes", "copy", "quickstart", dest)
    assert code == 0 and out == f"copied quickstart to {dest}\n"
    assert dest.read_text() == recipe_path("quickstart").read_text()
    dest.write_text("# mine\n")
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart", dest)
    assert_user_error(code, out, err, "exists; not overwriting it")
    assert dest.read_text() == "# mine\n"


def test_recipes_show_and_copy_need_arguments(capsys, tmp_path, monkeypatch):
    assert_user_error(*run_cli(capsys, "recipes", "show"), "recipes show needs a recipe name")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(capsys, "recipes", "copy", "llava-1.5-7b/qlora")  # DEST defaults, as --help says
    assert code == 0 and out == "copied llava-1.5-7b/qlora to llava-1.5-7b-qlora.yaml\n"
    assert (tmp_path / "llava-1.5-7b-qlora.yaml").is_file()
    assert_user_error(*run_cli(capsys, "recipes", "show", "nope"), "no recipe 'nope'")


def test_recipes_backbones(capsys):
    code, out, _ = run_cli(capsys, "recipes", "--backbones")
    assert code == 0
    rows = {ln.split()[0]: ln.split()[1] for ln in out.splitlines()}
    assert rows["tiny"] == "builtin:tiny"
    assert rows["llava-1.5-7b"] == "llava-hf/llava-1.5-7b-hf"


def test_recipes_keys(capsys):
    code, out, _ = run_cli(capsys, "recipes", "--keys")
    assert code == 0
    keys = [ln.split()[0] for ln in out.splitlines()]
    assert "train.learning_rate" in keys and "data.train.N.path" in keys and "lora.r" in keys
    row = next(ln for ln in out.splitlines() if ln.startswith("train.learning_rate "))
    assert row.split()[1:4] == ["float,", ">=", "0.0"]


def test_recipes_validate(capsys):
    code, out, err = run_cli(capsys, "recipes", "--validate")
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(shipped_recipes())
    assert "tiny-assembled/instruct" in out and "stage-1 output of tiny-assembled/align" in out
    assert all(" ok " in ln for ln in lines)


def test_recipes_copy_refuses_a_symbolic_link_dangling_or_not(capsys, tmp_path):
    """DEST a symbolic link: refused in one line naming it; nothing is written there or where it points."""
    target = tmp_path / "elsewhere" / "target.yaml"
    target.parent.mkdir()
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(target)
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart", dangling)
    assert_user_error(code, out, err)
    assert err == f"error: {str(dangling)!r} is a symbolic link (to {str(target)!r}); not writing through it: " \
                  "give another destination\n"  # fmt: skip
    assert not target.exists() and dangling.is_symlink()

    mine = tmp_path / "mine.yaml"
    mine.write_text("# mine\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(mine)
    code, out, err = run_cli(capsys, "recipes", "copy", "quickstart", link)
    assert_user_error(code, out, err, f"{str(link)!r} is a symbolic link (to {str(mine)!r}); not writing through it")
    assert len(err.splitlines()) == 1 and mine.read_text() == "# mine\n" and link.is_symlink()
