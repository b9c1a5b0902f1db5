"""Reading every data format into samples, with every bad sample named by file, line or index, id and reason."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest
from helpers import GOOD_TURNS, conv, read_one
from PIL import Image

from lora_llava.config import load_recipe
from lora_llava.config.schema import Columns, DataSource, RoleNames
from lora_llava.data.formats import open_source, read_source
from lora_llava.data.formats.storage import DatasetImage
from lora_llava.data.images import load_image
from lora_llava.errors import UserError


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


@pytest.mark.parametrize("later", ["<image>\nColor?", "Color? <image>", "Color?\n<image>"])
def test_placeholder_in_a_later_turn_opens_that_turn(folder, later):
    record = {
        "id": "a",
        "image": "ok.png",
        "conversations": conv("human: Hi", "gpt: Hello", f"human: {later}", "gpt: Red"),
    }
    (sample,), _ = read_one(folder, record)
    assert sample.messages[0] == ("user", "Hi") and sample.messages[2] == ("user", "<image>\nColor?")


def test_text_only_and_system_samples(folder):
    record = {"id": "t", "conversations": conv("system: Be brief.", "human: Hi", "gpt: Hello")}
    (sample,), bad = read_one(folder, record)
    assert bad == [] and sample.images == []
    assert sample.messages == [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello")]


RED, BLUE = (220, 30, 30), (30, 60, 220)


@pytest.fixture
def root(tmp_path) -> Path:
    """tmp_path with images/red.png (64x64) and images/blue.png (48x40)."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (64, 64), RED).save(tmp_path / "images" / "red.png")
    Image.new("RGB", (48, 40), BLUE).save(tmp_path / "images" / "blue.png")
    return tmp_path


def png_bytes(color, size=(20, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def user(*items) -> dict:
    return {"role": "user", "content": list(items)}


def text(t: str) -> dict:
    return {"type": "text", "text": t}


IMG = {"type": "image"}


def test_llava_jsonl_with_a_list_of_images(root):
    records = [
        {  # placeholders where the text puts them: they stay there, images in order
            "id": "two",
            "image": ["red.png", "blue.png"],
            "conversations": [
                {"from": "human", "value": "First <image> then <image>: which is red?"},
                {"from": "gpt", "value": "The first."},
            ],
        },
        {  # no placeholders: one per image at the start of the first human turn
            "id": "none",
            "image": ["blue.png", "red.png"],
            "conversations": [{"from": "human", "value": "Compare."}, {"from": "gpt", "value": "Blue, red."}],
        },
    ]
    path = write_jsonl(root / "multi.jsonl", records)
    reader = open_source(DataSource(path=str(path), image_folder=str(root / "images")))
    assert reader.format == "llava" and len(reader) == 2
    read = reader.read()
    assert read.bad == [] and read.warnings == []
    two, none = read.samples
    assert two.messages == [("user", "First <image> then <image>: which is red?"), ("assistant", "The first.")]
    assert [p.name for p in two.images] == ["red.png", "blue.png"] and two.line == 1
    assert none.messages[0] == ("user", "<image>\n<image>\nCompare.")
    assert [p.name for p in none.images] == ["blue.png", "red.png"] and none.line == 2


MESSAGES = [
    {
        "id": "m0",
        "messages": [
            {"role": "system", "content": [text("Be brief.")]},
            user(IMG, text("What color is it?")),
            {"role": "assistant", "content": [text("Red")]},
            {"role": "user", "content": "Sure?"},  # plain string content works too
            {"role": "assistant", "content": "Yes."},
        ],
        "images": ["red.png"],
    },
    {"id": "m1", "messages": [user(text("Hi")), {"role": "assistant", "content": [text("Hello")]}], "images": []},
]


EXPECTED_M0 = [
    ("system", "Be brief."),
    ("user", "<image>\nWhat color is it?"),
    ("assistant", "Red"),
    ("user", "Sure?"),
    ("assistant", "Yes."),
]


@pytest.mark.parametrize("kind", ["json", "jsonl"])
def test_messages_format_from_json_and_jsonl(root, kind):
    path = root / f"m.{kind}"
    if kind == "json":
        path.write_text(json.dumps(MESSAGES))
    else:
        write_jsonl(path, MESSAGES)
    reader = open_source(DataSource(path=str(path), image_folder=str(root / "images")))
    assert reader.format == "messages"  # auto: records hold `messages`
    read = reader.read()
    assert read.bad == []
    m0, m1 = read.samples
    assert m0.messages == EXPECTED_M0 and [p.name for p in m0.images] == ["red.png"]
    assert m1.messages == [("user", "Hi"), ("assistant", "Hello")] and m1.images == []
    assert (m0.line, m1.line) == ((1, 2) if kind == "jsonl" else (None, None))


def _hf_rows(images: list) -> dict:
    return {
        "id": ["a", "b", "c"],
        "messages": [
            [user(IMG, text("Color?")), {"role": "assistant", "content": [text("Red")]}],
            [user(text("Left or right?"), IMG, IMG), {"role": "assistant", "content": [text("Left")]}],
            [user(text("Hi")), {"role": "assistant", "content": [text("Hello")]}],
        ],
        "images": images,
    }


def _check_embedded(samples):
    a, b, c = samples
    assert a.messages == [("user", "<image>\nColor?"), ("assistant", "Red")]
    assert b.messages == [("user", "<image>\n<image>\nLeft or right?"), ("assistant", "Left")]  # images first
    assert c.messages == [("user", "Hi"), ("assistant", "Hello")] and c.images == []
    assert all(isinstance(im, DatasetImage) for im in a.images + b.images)
    assert [im.name for im in b.images] == ["row 1 images[0]", "row 1 images[1]"]
    assert load_image(a.images[0]).getpixel((0, 0)) == RED
    assert [load_image(im).getpixel((3, 3)) for im in b.images] == [BLUE, RED]


def test_messages_parquet_with_images_stored_in_the_rows(root):
    from datasets import Dataset

    rows = _hf_rows([[Image.new("RGB", (20, 10), RED)], [Image.new("RGB", (8, 8), BLUE), png_bytes(RED)], []])
    rows["images"][1][1] = Image.open(io.BytesIO(rows["images"][1][1]))
    Dataset.from_dict(rows).to_parquet(str(root / "vqa.parquet"))
    reader = open_source(DataSource(path=str(root / "vqa.parquet")))
    assert reader.format == "messages" and reader.storage.kind == "datasets" and len(reader) == 3
    read = reader.read()
    assert read.bad == []
    assert [s.id for s in read.samples] == ["a", "b", "c"] and [s.index for s in read.samples] == [0, 1, 2]
    _check_embedded(read.samples)


def test_datasets_folder_dataset_and_datasetdict(root):
    from datasets import Dataset, DatasetDict

    rows = _hf_rows([[png_bytes(RED)], [png_bytes(BLUE, (8, 8)), png_bytes(RED)], []])
    ds = Dataset.from_dict(rows)  # images as raw bytes (a binary column)
    ds.save_to_disk(str(root / "one"))
    _check_embedded(read_source(DataSource(path=str(root / "one")))[0])

    DatasetDict({"train": ds, "test": ds.select([2])}).save_to_disk(str(root / "dict"))
    assert len(open_source(DataSource(path=str(root / "dict")))) == 3  # train by default
    (only,), _ = read_source(DataSource(path=str(root / "dict"), split="test"))
    assert only.messages == [("user", "Hi"), ("assistant", "Hello")]
    with pytest.raises(UserError, match=r"holds splits train, test, not 'dev'"):
        open_source(DataSource(path=str(root / "dict"), split="dev"))
    with pytest.raises(UserError, match="holds one Dataset; data.\\*.split applies to a DatasetDict"):
        open_source(DataSource(path=str(root / "one"), split="train"))


def test_datasets_images_given_as_paths_stay_confined(root):
    from datasets import Dataset

    Image.new("RGB", (8, 8)).save(root / "outside.png")
    rows = {
        "messages": [[user(IMG, text("Q")), {"role": "assistant", "content": [text("A")]}]] * 2,
        "images": [["red.png"], ["../outside.png"]],
    }
    Dataset.from_dict(rows).to_parquet(str(root / "paths.parquet"))
    good, bad = read_source(DataSource(path=str(root / "paths.parquet"), image_folder=str(root / "images")))
    assert [p.name for p in good[0].images] == ["red.png"]
    assert [(b.index, b.id) for b in bad] == [(1, None)]
    assert (
        bad[0].describe() == f"{root / 'paths.parquet'} sample 1: image '../outside.png' leaves the image folder ('..')"
    )


def test_sharegpt_text_only_both_turn_styles(root):
    records = [
        {"id": "fv", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
        {"id": "rc", "conversations": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
        {
            "id": "img",
            "image": "red.png",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        },
        {"id": "ph", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]},
    ]
    path = write_jsonl(root / "chat.jsonl", records)
    good, bad = read_source(DataSource(path=str(path), format="sharegpt", image_folder=str(root / "images")))
    assert [(s.id, s.messages, s.images) for s in good] == [
        ("fv", [("user", "Hi"), ("assistant", "Hello")], []),
        ("rc", [("user", "Hi"), ("assistant", "Yo")], []),
    ]
    assert [(b.id, b.line, b.reason) for b in bad] == [
        ("img", 3, "has 'image' but format sharegpt is text-only; use format llava or messages"),
        ("ph", 4, "1 <image> placeholder(s) but no image"),
    ]
    with pytest.raises(UserError, match="columns.image is set but format sharegpt is text-only"):
        open_source(DataSource(path=str(path), format="sharegpt", columns=Columns(image="img")))


def test_columns_and_roles_map_other_names_without_code(root):
    records = [
        {
            "qid": 7,
            "img_path": "blue.png",
            "dialog": [
                {"speaker": "customer", "text": "Which color?"},
                {"speaker": "agent", "text": "Blue."},
                {"speaker": "client", "text": "Thanks"},
                {"speaker": "agent", "text": "Welcome."},
            ],
        }
    ]
    path = write_jsonl(root / "custom.jsonl", records)
    src = {
        "path": str(path),
        "image_folder": str(root / "images"),
        "columns": {"id": "qid", "conversations": "dialog", "image": "img_path", "role": "speaker", "text": "text"},
        "roles": {"user": ["customer", "client"], "assistant": ["agent"]},
    }
    recipe = load_recipe({"backbone": "tiny", "output_dir": "x", "data": {"train": [src]}})  # a recipe says it all
    (sample,), bad = read_source(recipe.data.train[0])
    assert bad == []
    assert sample.id == "7" and [p.name for p in sample.images] == ["blue.png"]
    assert sample.messages == [
        ("user", "<image>\nWhich color?"),
        ("assistant", "Blue."),
        ("user", "Thanks"),
        ("assistant", "Welcome."),
    ]
    unmapped = DataSource(
        path=str(path), image_folder=str(root / "images"), columns=recipe.data.train[0].columns, roles=RoleNames()
    )
    _, (b,) = read_source(unmapped)
    assert b.reason == "turn 0: unknown speaker 'customer' (human, gpt, system; map others with data.*.roles)"


def test_bad_samples_in_the_new_formats_name_sample_and_reason(root):
    from datasets import Dataset

    rows = {
        "id": ["ok", "video", "corrupt", "nomsg"],
        "messages": [
            [user(IMG, text("Q")), {"role": "assistant", "content": [text("A")]}],
            [user({"type": "video", "text": None}, text("Q")), {"role": "assistant", "content": [text("A")]}],
            [user(IMG, text("Q")), {"role": "assistant", "content": [text("A")]}],
            None,
        ],
        "images": [[png_bytes(RED)], [], [b"\x89PNG\r\n\x1a\nnot really"], []],
    }
    Dataset.from_dict(rows).to_parquet(str(root / "bad.parquet"))
    good, bad = read_source(DataSource(path=str(root / "bad.parquet")))
    assert [s.id for s in good] == ["ok"]
    where = str(root / "bad.parquet")
    described = [b.describe() for b in bad]
    assert (
        described[0]
        == f"{where} sample 1 (id video): turn 0: content item 0 has type 'video'; expected 'text', 'image' or 'image_url'"
    )
    assert described[1].startswith(f"{where} sample 2 (id corrupt): image 'row 2 images[0]': not a readable image (")
    assert described[2] == f"{where} sample 3 (id nomsg): missing field 'messages' (it is null)"

    lines = [json.dumps(MESSAGES[1]), '{"id": "cut", "messages": [', json.dumps({**MESSAGES[1], "id": "x"})]
    (root / "m.jsonl").write_text("\n".join(lines) + "\n")
    good, bad = read_source(DataSource(path=str(root / "m.jsonl")))
    assert [s.id for s in good] == ["m1", "x"]
    assert bad[0].describe().startswith(f"{root / 'm.jsonl'} line 2: broken JSON line (")


def test_text_that_is_not_unicode_and_a_byte_order_mark(root):
    raw = '[{"id": "s", "conversations": [{"from": "human", "value": "bad \\udc80"}, {"from": "gpt", "value": "A"}]},'
    raw += ' {"id": "t", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}]'
    (root / "bom.json").write_bytes(b"\xef\xbb\xbf" + raw.encode())
    good, bad = read_source(DataSource(path=str(root / "bom.json")))
    assert [s.id for s in good] == ["t"]
    assert bad[0].reason == "turn 0: text is not valid Unicode (surrogates not allowed at character 4)"


def test_unusable_sources_are_user_errors(root):
    (root / "folder").mkdir()
    with pytest.raises(UserError, match="is not a datasets save_to_disk folder"):
        open_source(DataSource(path=str(root / "folder")))
    (root / "x.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="is not a readable parquet file"):
        open_source(DataSource(path=str(root / "x.parquet")))
    (root / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="cannot tell its kind from the extension '.txt'"):
        open_source(DataSource(path=str(root / "notes.txt")))
    write_jsonl(root / "data.lines", MESSAGES)  # another extension: JSONL told by its first character
    assert len(open_source(DataSource(path=str(root / "data.lines")))) == 2
    # a missing image folder is an error once a sample needs it (naming the folder), not at opening
    with pytest.raises(UserError, match="image folder .*nope.* does not exist; 1 sample\\(s\\) give images by path"):
        read_source(DataSource(path=str(root / "data.lines"), image_folder=str(root / "nope")))


PLAIN_TURNS = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": "A"}]


ODD_CASES = {
    "nul-in-path": ({"image": "a\x00.png"}, "image 'a\\x00.png' holds a NUL character"),
    "symlink-loop": ({"image": "loop1.png"}, "image 'loop1.png' in '<F>' cannot be opened ("),
    "thin": ({"image": "thin.png"}, "image is 1x500 pixels, more than 100 times longer than wide"),
    "zero-bytes": ({"image": "zero.png"}, "image 'zero.png': not a readable image (UnidentifiedImageError"),
    "directory": ({"image": "dir.png"}, "image 'dir.png' is not a file"),
    "turn-is-text": ({"conversations": ["human: hi", "gpt: yo"]}, "turn 0 must be an object, got str"),
    "speaker-is-list": ({"conversations": [{"from": ["human"], "value": "Q"}]}, "turn 0: unknown speaker ['human']"),
    "nested-image-list": ({"image": [["ok.png"]]}, "'image' must be a path or a list of paths"),
    "name-too-long": ({"image": "x" * 5000 + ".png"}, "'" + "x" * 75 + "...' in '<F>' cannot be opened ("),
    "system-only": ({"conversations": [{"from": "system", "value": "S"}]}, "no answer to learn"),
}


@pytest.mark.parametrize("case", list(ODD_CASES))
def test_odd_bad_samples_get_a_reason_not_a_traceback(root, case):
    import os

    folder = root / "images"
    Image.new("RGB", (1, 500)).save(folder / "thin.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "dir.png").mkdir()
    os.symlink("loop2.png", folder / "loop1.png")
    os.symlink("loop1.png", folder / "loop2.png")
    fields, reason = ODD_CASES[case]
    record = {"id": case, "image": "red.png", "conversations": PLAIN_TURNS, **fields}
    (root / "one.json").write_text(json.dumps([record]))
    good, (bad,) = read_source(DataSource(path=str(root / "one.json"), image_folder=str(folder)))
    assert good == [] and bad.id == case
    assert reason.replace("<F>", str(folder)) in bad.reason, bad.reason


def test_llava_records_in_a_datasets_folder_and_embedded_images_pickle(root):
    """LLaVA records stored with `datasets` (one Image per row, as LLaVA-OneVision-style sets ship);
    images travel to DataLoader workers by pickling a reference, not the bytes of the whole set."""
    import pickle

    from datasets import Dataset, Features, List, Value
    from datasets import Image as HFImage

    turns = [{"from": "human", "value": "What color?"}, {"from": "gpt", "value": "Red"}]
    features = Features(
        {
            "id": Value("string"),
            "image": HFImage(),
            "conversations": List({"from": Value("string"), "value": Value("string")}),
        }
    )
    rows = {"id": ["x", "y"], "image": [Image.new("RGB", (20, 10), RED), None], "conversations": [turns, turns]}
    Dataset.from_dict(rows, features=features).save_to_disk(str(root / "llava_ds"))
    reader = open_source(DataSource(path=str(root / "llava_ds")))
    assert reader.format == "llava"
    read = reader.read()
    (x, y), bad = read.samples, read.bad
    assert bad == [] and y.images == [] and y.messages == [("user", "What color?"), ("assistant", "Red")]
    assert x.messages == [("user", "<image>\nWhat color?"), ("assistant", "Red")] and x.images[0].name == "row 0 image"
    copy = pickle.loads(pickle.dumps(x))
    assert len(pickle.dumps(x)) < 20_000
    assert load_image(copy.images[0]).getpixel((0, 0)) == RED
    assert load_image(copy.images[0]).tobytes() == load_image(x.images[0]).tobytes()


def test_data_users_have_is_read(root):
    """pandas-written parquet with {bytes, path} image structs; OpenAI image_url items (data URLs, paths);
    TRL's inline {"type": "image", "image": path}; a kept image_folder that does not apply is named."""
    import base64
    import io

    import pandas as pd

    red = (root / "images" / "red.png").read_bytes()
    turns = [{"from": "human", "value": "<image>\nColor?"}, {"from": "gpt", "value": "Red"}]
    frame = pd.DataFrame(
        {"id": ["p0", "p1"], "conversations": [turns, turns], "image": [{"bytes": red, "path": "red.png"}] * 2}
    )
    frame.to_parquet(root / "pandas.parquet")
    warned = []
    good, bad = read_source(
        DataSource(path=str(root / "pandas.parquet"), image_folder=str(root / "kept-from-recipe")), warn=warned.append
    )
    assert not bad and [s.id for s in good] == ["p0", "p1"]
    assert good[0].images[0].read_bytes() == red
    assert warned == [
        f"{root / 'pandas.parquet'}: image_folder '{root / 'kept-from-recipe'}' is not used: the images of this "
        "source are stored in its rows"
    ]

    buf = io.BytesIO()
    Image.open(root / "images" / "blue.png").save(buf, format="PNG")
    data_url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    records = [
        {"id": "openai", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url}},
                                         {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": "Blue"}]},
        {"id": "trl", "messages": [
            {"role": "user", "content": [{"type": "image", "image": "red.png"}, {"type": "text", "text": "Color?"}]},
            {"role": "assistant", "content": "Red"}]},
        {"id": "web", "messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.org/a.png"}}]},
            {"role": "assistant", "content": "?"}]},
        {"id": "both", "images": ["red.png"], "messages": [
            {"role": "user", "content": [{"type": "image", "image": "red.png"}]},
            {"role": "assistant", "content": "Red"}]},
    ]  # fmt: skip
    write_jsonl(root / "inline.jsonl", records)
    good, bad = read_source(DataSource(path=str(root / "inline.jsonl"), image_folder=str(root / "images")))
    assert [s.id for s in good] == ["openai", "trl"]
    assert good[0].messages[0] == ("user", "<image>\nColor?")
    assert load_image(good[0].images[0]).getpixel((0, 0)) == BLUE
    assert good[1].images == [root / "images" / "red.png"]
    assert {b.id: b.reason for b in bad} == {
        "web": "image 'https://x.org/a.png' is a URL; download it into the image folder first",
        "both": "images given both in 'images' and inside content items; give them one way",
    }


def test_a_missing_conversations_field_names_the_fields_and_columns(root):
    write_jsonl(root / "odd.jsonl", [{"qid": 1, "dialog": [], "img_path": "red.png"}])
    _, bad = read_source(DataSource(path=str(root / "odd.jsonl"), image_folder=str(root / "images")))
    assert bad[0].reason == (
        "missing field 'conversations' (the record has 'qid', 'dialog', 'img_path'; name the turns field with "
        "data.*.columns: {conversations: <field>})"
    )


def test_duplicate_ids_are_one_warning_line(root, capsys):
    turns = [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A"}]
    write_jsonl(root / "dup.jsonl", [{"id": "a", "conversations": turns}] * 2)
    read_source(DataSource(path=str(root / "dup.jsonl"), image_folder=str(root / "images")))
    err = capsys.readouterr().err
    assert err == f"warning: {root / 'dup.jsonl'}: 1 duplicate id(s) (2 samples), e.g. a\n"


def test_a_dvc_style_folder_of_links_reads_with_image_roots_and_stays_confined(tmp_path):
    """DVC keeps the files in its cache and the workspace holds relative links to them; the recipe names the
    cache in image_roots. A link out of every named folder is still a bad sample."""
    project = tmp_path / "project"
    cache = project / ".dvc" / "cache" / "files" / "md5"
    scans = project / "data" / "scans"
    scans.mkdir(parents=True)
    for name, digest, color in (("x1.jpg", "3fa9c1", (10, 200, 120)), ("x2.jpg", "b07e44", (200, 10, 90))):
        blob = cache / digest[:2] / digest[2:]
        blob.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (24, 36), color).save(blob, format="JPEG", quality=95)
        (scans / name).symlink_to(os.path.relpath(blob, scans))
    (tmp_path / "private.jpg").write_bytes((scans / "x1.jpg").read_bytes())
    (scans / "x3.jpg").symlink_to(tmp_path / "private.jpg")  # absolute, and outside the project
    turns = [{"from": "human", "value": "Finding?"}, {"from": "gpt", "value": "None."}]
    data = write_jsonl(
        tmp_path / "scans.jsonl", [{"id": n, "image": f"x{n}.jpg", "conversations": turns} for n in (1, 2, 3)]
    )
    src = {"path": str(data), "image_folder": str(scans), "image_roots": [str(project / ".dvc" / "cache")]}
    recipe = load_recipe({"backbone": "tiny", "output_dir": "x", "data": {"train": [src]}})
    assert recipe.data.train[0].image_roots == [str(project / ".dvc" / "cache")]
    good, bad = read_source(recipe.data.train[0])
    assert [(s.id, s.images) for s in good] == [("1", [scans / "x1.jpg"]), ("2", [scans / "x2.jpg"])]
    assert load_image(good[1].images[0]).size == (24, 36)
    assert [(b.id, b.reason) for b in bad] == [
        (
            "3",
            f"image 'x3.jpg' is a link to {str(tmp_path / 'private.jpg')!r}, outside the image folder and image_roots; "
            "to use it, name a folder holding its target in data.*.image_roots, or copy the images with their links "
            "followed (cp -rL IMAGE_FOLDER NEW_FOLDER)",
        )
    ]
    # without image_roots every link is refused, and the reason says which key lets it through
    _, bad = read_source(DataSource(path=str(data), image_folder=str(scans)))
    assert len(bad) == 3 and all("outside the image folder; to use it, name a folder" in b.reason for b in bad)


def _struct_table(column: str, cells: list, ids: list[str], turns: list) -> object:
    import pyarrow as pa

    return pa.Table.from_pylist([{"id": i, column: c, "conversations": turns} for i, c in zip(ids, cells)])


def test_image_cells_with_a_path_and_no_bytes_are_paths_in_the_image_folder(root):
    """`datasets` Image cells stored as {"bytes": null, "path": ...} (pyarrow types the bytes null) are paths,
    confined like any; a cell with neither is a bad sample that says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset

    (root / "images" / "gulls").mkdir()
    Image.new("RGB", (30, 18), (128, 64, 0)).save(root / "images" / "gulls" / "herring.bmp")
    turns = [{"from": "human", "value": "<image>\nWhich bird?"}, {"from": "gpt", "value": "A gull."}]
    cells = [
        {"bytes": None, "path": "gulls/herring.bmp"},
        {"bytes": None, "path": "../../etc/passwd"},
        {"bytes": None, "path": None},
        {"bytes": None, "path": "gulls/missing.bmp"},
    ]
    table = _struct_table("image", cells, ["g", "esc", "empty", "gone"], turns)
    assert table.schema.field("image").type == pa.struct([("bytes", pa.null()), ("path", pa.string())])
    pq.write_table(table, root / "gulls.parquet")
    Dataset(table).save_to_disk(str(root / "gulls_ds"))  # the same rows as a datasets folder
    folder = str(root / "images")
    for path in (root / "gulls.parquet", root / "gulls_ds"):
        good, bad = read_source(DataSource(path=str(path), image_folder=folder))
        assert [(s.id, s.images) for s in good] == [("g", [root / "images" / "gulls" / "herring.bmp"])]
        assert good[0].messages[0] == ("user", "<image>\nWhich bird?")
        assert {b.id: b.reason for b in bad} == {
            "esc": "image '../../etc/passwd' leaves the image folder ('..')",
            "empty": "'image': an image with neither bytes nor a path (both null)",
            "gone": f"image 'gulls/missing.bmp' not found in {folder!r}",
        }
    # format messages: a list of such cells
    rows = [
        {"messages": [{"role": "user", "content": "<image><image>Same bird?"}, {"role": "assistant", "content": "Yes"}],
         "images": [{"bytes": None, "path": "gulls/herring.bmp"}, {"bytes": None, "path": "red.png"}]},
        {"messages": [{"role": "user", "content": "<image>Bird?"}, {"role": "assistant", "content": "No"}],
         "images": [{"bytes": None, "path": None}]},
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), root / "pairs.parquet")
    good, bad = read_source(DataSource(path=str(root / "pairs.parquet"), image_folder=folder))
    assert [p.name for p in good[0].images] == ["herring.bmp", "red.png"]
    assert [b.reason for b in bad] == ["'images' item 0: an image with neither bytes nor a path (both null)"]
    # the same cells inside TRL content items
    records = [
        {"id": i, "messages": [{"role": "user", "content": [{"type": "image", "image": {"bytes": None, "path": p}}]},
                               {"role": "assistant", "content": "A gull."}]}
        for i, p in (("in", "gulls/herring.bmp"), ("none", None))
    ]  # fmt: skip
    good, bad = read_source(DataSource(path=str(write_jsonl(root / "items.jsonl", records)), image_folder=folder))
    assert [(s.id, [p.name for p in s.images]) for s in good] == [("in", ["herring.bmp"])]
    assert [b.reason for b in bad] == ["turn 0: content item 0: its image has neither bytes nor a path (both null)"]


def test_a_corrupt_embedded_image_is_named_by_row_and_column_not_by_a_repr(root):
    import pyarrow.parquet as pq

    turns = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A chart."}]
    good_png = (root / "images" / "blue.png").read_bytes()
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' width='8' height='8'/>"  # not a format PIL reads
    cells = [{"bytes": good_png, "path": None}, {"bytes": svg, "path": "chart.svg"}]
    pq.write_table(_struct_table("scan", cells, ["ok", "broken"], turns), root / "scans.parquet")
    good, (bad,) = read_source(DataSource(path=str(root / "scans.parquet"), columns=Columns(image="scan")))
    assert [s.id for s in good] == ["ok"]
    assert bad.id == "broken"
    assert bad.reason == (
        "image 'row 1 scan': not a readable image (UnidentifiedImageError: cannot identify image file 'row 1 scan')"
    )
    assert "0x" not in bad.reason and "object at" not in bad.reason and "BytesIO" not in bad.reason
