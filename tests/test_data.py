"""Reading LLaVA-Instruct data: every bad sample reported with its reason, safe image loading,
the <image> rule, prepare_data's error/skip policies, the synthetic dataset and the tiny backbone.

Usage: ``python -m pytest -q tests/test_data.py``
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image

from lora_llava.config import load_recipe
from lora_llava.config.schema import DataSource
from lora_llava.data import images as images_mod
from lora_llava.data.chat import chat_format
from lora_llava.data.check import prepare_data
from lora_llava.data.encode import Encoder
from lora_llava.data.formats import read_source
from lora_llava.data.images import image_size, load_image
from lora_llava.errors import UserError


def conv(*turns: str) -> list[dict]:
    """conv("human: Q", "gpt: A") -> LLaVA conversation turns."""
    out = []
    for t in turns:
        who, _, value = t.partition(": ")
        out.append({"from": who, "value": value})
    return out


GOOD_TURNS = conv("human: <image>\nWhat color is the shape?", "gpt: Red")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds no pixels: cheap to write, huge to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def folder(tmp_path) -> Path:
    """tmp_path/images with ok.png, plus an image outside the folder."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (220, 30, 30)).save(images / "ok.png")
    Image.new("RGB", (64, 64), (0, 0, 0)).save(tmp_path / "outside.png")
    return images


def read_one(folder: Path, record: dict):
    path = folder.parent / "one.json"
    path.write_text(json.dumps([record]))
    return read_source(DataSource(path=str(path), image_folder=str(folder)))


# ------------------------------------------------------------------------------------------ bad samples


def _corrupt(folder: Path) -> None:
    noise = Image.effect_noise((64, 64), 80).convert("RGB")
    noise.save(folder / "full.png")
    data = (folder / "full.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])


BAD_CASES = {
    "missing-image": ({"image": "nope.png", "conversations": GOOD_TURNS}, "image 'nope.png' not found in"),
    "truncated-image": (
        {"image": "truncated.png", "conversations": GOOD_TURNS},
        "not a readable image (OSError: image file is truncated",
    ),
    "text-as-png": (
        {"image": "text.png", "conversations": GOOD_TURNS},
        "not a readable image (UnidentifiedImageError: cannot identify image file",
    ),
    "dotdot": ({"image": "../outside.png", "conversations": GOOD_TURNS}, "leaves the image folder ('..')"),
    "absolute": ({"image": "<ABS>", "conversations": GOOD_TURNS}, "is an absolute path; give it relative to"),
    "symlink-out": ({"image": "link.png", "conversations": GOOD_TURNS}, "outside the image folder"),
    "url": ({"image": "http://x/y.png", "conversations": GOOD_TURNS}, "is a URL"),
    "placeholder-no-image": ({"conversations": GOOD_TURNS}, "1 <image> placeholder(s) but no image"),
    "two-placeholders-one-image": (
        {"image": "ok.png", "conversations": conv("human: <image>\n<image>\nWhat?", "gpt: Red")},
        "2 <image> placeholder(s) but 1 image(s)",
    ),
    "empty-conversations": ({"image": "ok.png", "conversations": []}, "'conversations' is empty or not a list"),
    "no-conversations": ({"image": "ok.png"}, "missing field 'conversations'"),
    "gpt-first": (
        {"image": "ok.png", "conversations": conv("gpt: Red", "human: What?")},
        "wrong role order at turn 0",
    ),
    "missing-value": (
        {"image": "ok.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "Red"}]},
        "turn 0 needs 'from' and 'value'",
    ),
    "non-string-value": (
        {"image": "ok.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": 3}]},
        "turn 1: 'value' must be a string, got int",
    ),
    "ends-with-human": (
        {"image": "ok.png", "conversations": conv("human: What?", "gpt: Red", "human: And?")},
        "no answer to learn: the conversation must end with a gpt turn",
    ),
    "empty-answer": (
        {"image": "ok.png", "conversations": conv("human: What?", "gpt:  ")},
        "an answer is empty: nothing to learn",
    ),
    "unknown-speaker": (
        {"image": "ok.png", "conversations": conv("bot: What?", "gpt: Red")},
        "turn 0: unknown speaker 'bot'",
    ),
    "image-in-answer": (
        {"image": "ok.png", "conversations": conv("human: What?", "gpt: <image> Red")},
        "<image> in an answer",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_sample_reason(folder, case):
    record, reason = BAD_CASES[case]
    record = {"id": case, **record}
    (folder / "text.png").write_text("this is not an image\n")
    _corrupt(folder)
    os.symlink(folder.parent / "outside.png", folder / "link.png")
    if record.get("image") == "<ABS>":
        record["image"] = str(folder / "ok.png")  # exists, but absolute paths are refused
    good, bad = read_one(folder, record)
    assert good == []
    assert len(bad) == 1
    assert bad[0].id == case and bad[0].index == 0 and bad[0].line is None
    assert reason in bad[0].reason, bad[0].reason
    assert bad[0].describe() == f"{folder.parent / 'one.json'} sample 0 (id {case}): {bad[0].reason}"


def test_jsonl_broken_and_non_utf8_lines_name_their_line(folder):
    good = {"id": "g", "image": "ok.png", "conversations": GOOD_TURNS}
    lines = [
        json.dumps(good).encode(),
        b"",  # blank lines are skipped but still counted
        b'{"id": "broken", "conversations": [',
        json.dumps({**good, "id": "h"}).encode(),
        '{"id": "latin", "conversations": "caf\u00e9"}'.encode("latin-1"),
    ]
    path = folder.parent / "data.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    samples, bad = read_source(DataSource(path=str(path), image_folder=str(folder)))
    assert [(s.id, s.line, s.index) for s in samples] == [("g", 1, 0), ("h", 4, 2)]
    assert [(b.line, b.index, b.id) for b in bad] == [(3, 1, None), (5, 3, None)]
    assert bad[0].reason.startswith("broken JSON line (")
    assert bad[0].describe().startswith(f"{path} line 3: broken JSON line")
    assert bad[1].reason.startswith("not UTF-8 (invalid continuation byte at byte ")
    assert bad[1].describe().startswith(f"{path} line 5: not UTF-8")


def test_unusable_files_raise_user_error(tmp_path):
    with pytest.raises(UserError, match="data file .* not found"):
        read_source(DataSource(path=str(tmp_path / "missing.json")))
    (tmp_path / "obj.json").write_text('{"id": 1}')
    with pytest.raises(UserError, match="expected a JSON list of samples, got dict"):
        read_source(DataSource(path=str(tmp_path / "obj.json")))
    (tmp_path / "bad.json").write_text('[{"id": 1},\n {"id": ]')
    with pytest.raises(UserError, match="invalid JSON at line 2, column"):
        read_source(DataSource(path=str(tmp_path / "bad.json")))


# -------------------------------------------------------------------------------------- the <image> rule


def test_image_without_placeholder_gets_one_in_front(folder):
    record = {
        "id": "a",
        "image": "ok.png",
        "conversations": conv("human: What color?", "gpt: Red", "human: Sure?", "gpt: Yes"),
    }
    (sample,), bad = read_one(folder, record)
    assert bad == []
    assert sample.messages == [
        ("user", "<image>\nWhat color?"),
        ("assistant", "Red"),
        ("user", "Sure?"),
        ("assistant", "Yes"),
    ]
    assert sample.images == [folder / "ok.png"]


@pytest.mark.parametrize(
    "first_turn",
    ["What color?\n<image>", "What color? <image>", "<image>\nWhat color?", "<image>What color?"],
)
def test_single_placeholder_moves_to_the_start(folder, first_turn):
    record = {"id": "a", "image": "ok.png", "conversations": conv(f"human: {first_turn}", "gpt: Red")}
    (sample,), bad = read_one(folder, record)
    assert bad == []
    assert sample.messages == [("user", "<image>\nWhat color?"), ("assistant", "Red")]


def test_placeholder_in_a_later_turn_moves_to_the_first(folder):
    record = {
        "id": "a",
        "image": "ok.png",
        "conversations": conv("human: Hi", "gpt: Hello", "human: <image>\nColor?", "gpt: Red"),
    }
    (sample,), _ = read_one(folder, record)
    assert sample.messages[0] == ("user", "<image>\nHi") and sample.messages[2] == ("user", "Color?")


def test_text_only_and_system_samples(folder):
    record = {"id": "t", "conversations": conv("system: Be brief.", "human: Hi", "gpt: Hello")}
    (sample,), bad = read_one(folder, record)
    assert bad == [] and sample.images == []
    assert sample.messages == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]


# ---------------------------------------------------------------------------------------- prepare_data


def recipe_for(tmp_path: Path, train: Path, folder: Path, **data):
    return load_recipe(
        {
            "backbone": "tiny",
            "output_dir": str(tmp_path / "run"),
            "data": {"train": [{"path": str(train), "image_folder": str(folder)}], "max_length": 256, **data},
        }
    )


@pytest.fixture
def encoder(tiny_processor):
    return Encoder(tiny_processor, chat_format("vicuna_v1", stop=tiny_processor.tokenizer.eos_token, system=""))


GOOD = [{"id": f"good-{i}", "image": "ok.png", "conversations": GOOD_TURNS} for i in range(6)]
BAD = [
    {"id": "bad-missing", "image": "nope.png", "conversations": GOOD_TURNS},
    {"id": "bad-order", "image": "ok.png", "conversations": conv("gpt: Red", "human: What?")},
    {"id": "bad-empty", "image": "ok.png", "conversations": conv("human: What?", "gpt: ")},
]
BAD_REASONS = {
    "bad-missing": "image 'nope.png' not found in",
    "bad-order": "wrong role order at turn 0",
    "bad-empty": "an answer is empty",
}


def write_mixed(tmp_path: Path) -> Path:
    path = tmp_path / "train.json"
    path.write_text(json.dumps(GOOD[:3] + BAD + GOOD[3:]))
    return path


def test_prepare_data_error_lists_every_bad_sample(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="error")
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("3 bad sample(s) of 9:\n")
    for sid, reason in BAD_REASONS.items():
        line = next(ln for ln in msg.splitlines() if f"(id {sid})" in ln)
        assert reason in line
    assert "good-" not in msg
    assert "data.on_bad_sample=skip" in msg
    assert not (tmp_path / "run" / "rejected.jsonl").exists()


def test_prepare_data_skip_writes_rejected(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="skip", max_bad_fraction=0.5)
    report = prepare_data(recipe, encoder, tmp_path / "run")
    assert [s.id for s in report.train] == [f"good-{i}" for i in range(6)]
    assert report.eval == []
    rows = [json.loads(ln) for ln in (tmp_path / "run" / "rejected.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["bad-missing", "bad-order", "bad-empty"]
    assert [r["index"] for r in rows] == [3, 4, 5]
    for r in rows:
        assert BAD_REASONS[r["id"]] in r["reason"]
        assert r["source"] == str(tmp_path / "train.json")
    st = report.stats[0]
    assert (st.split, st.samples, st.bad) == ("train", 6, 3)
    assert set(report.lengths.values()) == {33}  # 16 image tokens + 17 text tokens, as `check` reports for shapes
    assert st.tokens == 6 * 33
    summary = report.summary()
    assert "lengths (tokens, after image expansion): min 33, median 33, max 33; data.max_length 256" in summary


def test_prepare_data_too_many_bad_raises(tmp_path, folder, encoder):
    recipe = recipe_for(tmp_path, write_mixed(tmp_path), folder, on_bad_sample="skip", max_bad_fraction=0.2)
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder, tmp_path / "run")
    msg = str(err.value)
    assert msg.startswith("3 of 9 samples are bad (33.3%), over data.max_bad_fraction=0.2:")
    assert all(f"(id {sid})" in msg for sid in BAD_REASONS)
    assert len((tmp_path / "run" / "rejected.jsonl").read_text().splitlines()) == 3


def test_prepare_data_reports_over_length_sample_with_token_count(tmp_path, folder, encoder):
    long_q = "What color is the shape in the image? " * 6
    data = GOOD[:2] + [{"id": "long", "image": "ok.png", "conversations": conv(f"human: {long_q.strip()}", "gpt: Red")}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(data))
    recipe = recipe_for(tmp_path, path, folder, max_length=40)
    (long_sample,), _ = read_one(folder, data[2])
    n = encoder.length(long_sample)
    assert n == 81
    with pytest.raises(UserError) as err:
        prepare_data(recipe, encoder)
    assert f"sample 2 (id long): {n} tokens after image expansion, over data.max_length=40" in str(err.value)
    assert str(err.value).startswith("1 bad sample(s) of 3:")


def test_prepare_data_without_usable_training_samples(tmp_path, folder, encoder):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(BAD[:1]))
    recipe = recipe_for(tmp_path, path, folder, on_bad_sample="skip", max_bad_fraction=1.0)
    with pytest.raises(UserError, match="no usable training samples"):
        prepare_data(recipe, encoder, tmp_path / "run")


# ------------------------------------------------------------------------------------------------ images


def _modes(folder: Path) -> dict[str, Path]:
    size = (40, 30)
    out = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        out[name] = folder / name

    rgba = Image.new("RGBA", size, (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 20, 30))  # left half opaque blue, right half transparent red
    save("rgba.png", rgba)
    save("la.png", Image.new("LA", size, (10, 0)))
    pal = Image.new("P", size, 0)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.paste(1, (0, 0, 20, 30))
    save("p.png", pal, transparency=0)
    save("cmyk.jpg", Image.new("CMYK", size, (0, 255, 255, 0)), quality=100)
    save("cmyk.tif", Image.new("CMYK", size, (0, 255, 255, 0)))
    save("l.png", Image.new("L", size, 128))
    i16 = Image.new("I;16", size)
    i16.putdata([40000] * (size[0] * size[1]))
    save("i16.png", i16)
    return out


def test_every_mode_loads_as_rgb_of_the_same_size(tmp_path):
    files = _modes(tmp_path)
    for p in files.values():
        with Image.open(p) as raw:
            assert raw.mode != "RGB"
    loaded = {name: load_image(p) for name, p in files.items()}
    assert {name: (im.mode, im.size) for name, im in loaded.items()} == {name: ("RGB", (40, 30)) for name in files}
    # transparency is flattened onto white; opaque pixels keep their color
    assert loaded["rgba.png"].getpixel((5, 5)) == (0, 0, 255)
    assert loaded["rgba.png"].getpixel((30, 5)) == (255, 255, 255)
    assert loaded["la.png"].getpixel((0, 0)) == (255, 255, 255)
    assert loaded["p.png"].getpixel((5, 5)) == (0, 200, 0)
    assert loaded["p.png"].getpixel((30, 5)) == (255, 255, 255)
    assert loaded["cmyk.tif"].getpixel((0, 0)) == (255, 0, 0)
    r, g, b = loaded["cmyk.jpg"].getpixel((0, 0))
    assert r > 240 and g < 15 and b < 15
    assert loaded["l.png"].getpixel((0, 0)) == (128, 128, 128)
    assert loaded["i16.png"].getpixel((0, 0)) == (156, 156, 156)  # 40000 / 256


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 30), (0, 0, 0))
    img.paste((255, 255, 255), (0, 0, 10, 10))  # white top-left corner
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    img.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (30, 40)
    assert image_size(tmp_path / "rot.jpg") == (30, 40)
    assert out.getpixel((25, 4))[0] > 200 and out.getpixel((4, 4))[0] < 50  # corner moved to top-right


def test_huge_image_rejected_by_pixel_limit(tmp_path, monkeypatch):
    # the real 64M limit, on a header-only PNG of 10000 x 7000 (no pixels are decoded)
    (tmp_path / "big.png").write_bytes(png_header(10000, 7000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(images_mod.ImageError, match="image is 10000x7000 pixels, over the 64000000-pixel limit"):
            load_image(tmp_path / "big.png")
    # far over: PIL's own bomb check (2 x the limit) fires first, still an ImageError
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))
    with pytest.raises(images_mod.ImageError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")
    # a lowered limit goes through the same check on a real image
    Image.new("RGB", (50, 50)).save(tmp_path / "small.png")
    monkeypatch.setattr(images_mod, "MAX_PIXELS", 2000)
    with pytest.raises(images_mod.ImageError, match="image is 50x50 pixels, over the 2000-pixel limit"):
        load_image(tmp_path / "small.png")
    Image.new("RGB", (40, 50)).save(tmp_path / "fits.png")
    assert load_image(tmp_path / "fits.png").size == (40, 50)


def test_huge_image_is_a_bad_sample(folder):
    (folder / "big.png").write_bytes(png_header(10000, 7000))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        good, bad = read_one(folder, {"id": "big", "image": "big.png", "conversations": GOOD_TURNS})
    assert good == [] and "over the 64000000-pixel limit" in bad[0].reason


def test_disallowed_format_and_animated_gif(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.ico")
    with pytest.raises(images_mod.ImageError, match="image format ICO is not allowed"):
        load_image(tmp_path / "x.ico")
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "anim.gif")
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((0, 0))[0] > 200 and out.getpixel((0, 0))[1] < 50  # first frame: red


# ------------------------------------------------------------------------------------------- synthetic


def test_synthetic_dataset_is_deterministic_and_balanced(tmp_path):
    from lora_llava.data.synthetic import COLORS, write_shapes_dataset

    a = write_shapes_dataset(tmp_path / "a", n_train=12, n_eval=16, seed=3)
    b = write_shapes_dataset(tmp_path / "b", n_train=12, n_eval=16, seed=3)
    c = write_shapes_dataset(tmp_path / "c", n_train=12, n_eval=16, seed=4)
    assert (a / "train.json").read_bytes() == (b / "train.json").read_bytes()
    assert (a / "eval.json").read_bytes() == (b / "eval.json").read_bytes()
    assert (a / "train.json").read_bytes() != (c / "train.json").read_bytes()
    referenced = {s["image"] for f in ("train.json", "eval.json") for s in json.loads((a / f).read_text())}
    assert len(referenced) == 28
    names = sorted(p.name for p in (a / "images").iterdir())
    assert referenced <= set(names) and names == sorted(p.name for p in (b / "images").iterdir())
    assert all((a / "images" / n).read_bytes() == (b / "images" / n).read_bytes() for n in names)
    evals = json.loads((a / "eval.json").read_text())
    answers = [s["conversations"][-1]["value"] for s in evals]
    assert sorted(answers) == sorted([c.capitalize() for c in COLORS] * 4)
    # every sample reads cleanly
    samples, bad = read_source(DataSource(path=str(a / "train.json"), image_folder=str(a / "images")))
    assert bad == [] and len(samples) == 12


# ------------------------------------------------------------------------------------------------ tiny


def test_build_tiny_is_byte_identical(tmp_path):
    from lora_llava.backbones.tiny import build_tiny

    a = build_tiny(tmp_path / "a")
    b = build_tiny(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
