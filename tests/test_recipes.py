"""The built-in recipes: shipped, loadable, resolvable offline, faithful to upstream settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import shipped_recipes

from lora_llava.artifacts import resolve_backbone
from lora_llava.backbones.registry import registered_backbones
from lora_llava.errors import UserError


def test_shipped_recipes_are_the_builtin_ones():
    from lora_llava.recipes import list_recipes, recipes_root

    root = Path(__file__).resolve().parent.parent / "recipes"
    names = [p.relative_to(root).with_suffix("").as_posix() for p in shipped_recipes()]
    assert len(names) >= 3
    assert sorted(n for n, _ in list_recipes()) == sorted(names)
    assert all((recipes_root() / f"{n}.yaml").read_bytes() == (root / f"{n}.yaml").read_bytes() for n in names)


@pytest.mark.parametrize("path", shipped_recipes(), ids=lambda p: p.parent.name + "/" + p.stem)
def test_shipped_recipe_loads_and_backbone_resolves(path):
    from lora_llava.config import load_recipe

    recipe = load_recipe(path)  # structural validation only: no weights, no network
    assert path.read_text().startswith("# ")  # the first comment line is its description in `recipes`
    if recipe.backbone == "assemble" or recipe.stage == "instruct" and recipe.backbone.startswith("runs/"):
        return  # checked by test_builtin_recipes_check below (assembled / stage-2-from-stage-1)
    spec = resolve_backbone(recipe.backbone)
    assert recipe.backbone in (spec.name, spec.source)
    assert spec.model_class().__name__.endswith("ForConditionalGeneration")


def test_builtin_recipes_check():
    from lora_llava.recipes import check_builtin_recipes

    how = check_builtin_recipes()
    assert how["tiny-assembled/align"] == "assemble tiny-clip + tiny-qwen2"
    assert how["tiny-assembled/instruct"] == "stage-1 output of tiny-assembled/align"
    assert how["assemble-clip-qwen2/instruct"] == "stage-1 output of assemble-clip-qwen2/align"
    assert {s.recipe for s in registered_backbones()} <= set(how)
    assert how["llava-v1.6-34b/qlora"] == "llava-v1.6-34b"


def test_builtin_recipes_check_reports_a_missing_stage1(monkeypatch, tmp_path):
    import lora_llava.recipes as rec

    root = tmp_path / "recipes"
    (root / "x").mkdir(parents=True)
    (root / "x" / "instruct.yaml").write_text(
        "# x\nbackbone: runs/nowhere\ndata: {train: [{path: a.json}]}\noutput_dir: runs/x\n"
    )
    monkeypatch.setattr(rec, "recipes_root", lambda: root)
    with pytest.raises(UserError) as e:
        rec.check_builtin_recipes()
    assert "x/instruct: backbone directory 'runs/nowhere' does not exist" in str(e.value)
    assert "backbone tiny has no built-in recipe ('quickstart')" in str(e.value)


def test_llava15_recipes_pad_and_v16_tile_caps_cap():
    from lora_llava.config import load_recipe
    from lora_llava.model.anyres import cap_tiles
    from lora_llava.recipes import list_recipes, recipe_path

    v16_grids = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    for name, _ in list_recipes():
        r = load_recipe(recipe_path(name))
        if name.startswith("llava-1.5"):
            assert r.images.pad_to_square, name
        if name.startswith("llava-v1.6") and r.images.max_tiles:
            assert len(cap_tiles(v16_grids, 336, r.images.max_tiles)) < len(v16_grids), name
        text = recipe_path(name).read_text()
        if name.startswith("llava-"):
            assert f"global batch {r.train.batch_size * r.train.grad_accum} per optimizer step" in text, name


def test_copy_new_never_follows_a_link_made_after_its_checks(tmp_path):
    from lora_llava.recipes import copy_new

    target, dest = tmp_path / "target.yaml", tmp_path / "new" / "dest.yaml"

    class Racing:  # a recipe whose reading happens to race with someone making DEST a link
        def read_bytes(self):
            dest.parent.mkdir()
            dest.symlink_to(target)
            return b"# recipe\n"

    with pytest.raises(UserError, match=r"dest.yaml' is a symbolic link \(to '.*target.yaml'\); not writing through"):
        copy_new(Racing(), dest)  # type: ignore[arg-type]
    assert not target.exists() and dest.is_symlink()

    fresh = tmp_path / "a" / "b" / "fresh.yaml"
    copy_new(Path(__file__), fresh)  # a new file, its folders made
    assert fresh.read_bytes() == Path(__file__).read_bytes()
    with pytest.raises(UserError, match="exists; not overwriting it"):
        copy_new(Path(__file__), fresh)
