"""Annotation readers (COCO, CSV, LLaVA captions) and the symbolic context."""

from __future__ import annotations

import csv
import json

import pytest

from lora_llava.datagen.annotations import Box, read_annotations
from lora_llava.datagen.config import AnnotationsConfig
from lora_llava.datagen.context import render_context
from lora_llava.errors import UserError


def cfg(path, folder, **kw) -> AnnotationsConfig:
    return AnnotationsConfig(path=str(path), image_folder=str(folder), **kw)


def test_coco_captions_and_instances_in_two_files_are_merged(tmp_path, make_images):
    images = make_images(3)
    recs = [{"id": im["id"], "file_name": im["file_name"], "width": 64, "height": 48} for im in images]
    recs.append({"id": 99, "file_name": "missing.png", "width": 64, "height": 48})
    captions = {"images": recs, "annotations": [{"image_id": i, "caption": f"  cap  {i} "} for i in (0, 1, 99)]}
    instances = {
        "images": recs,
        "annotations": [
            {"image_id": 0, "bbox": [16, 12, 32, 24], "category_id": 3},
            {"image_id": 0, "bbox": [0, 0, 4, 3], "category_id": 3},  # the smallest: left out
            {"image_id": 0, "bbox": [60, 40, 20, 20], "category_id": 4},  # runs off the image: clipped
        ],
        "categories": [{"id": 3, "name": "dog"}, {"id": 4, "name": "ball"}],
    }
    (tmp_path / "cap.json").write_text(json.dumps(captions))
    (tmp_path / "inst.json").write_text(json.dumps(instances))
    good, skipped = read_annotations(
        cfg(tmp_path / "cap.json", tmp_path / "images", boxes=str(tmp_path / "inst.json"), max_boxes=2)
    )
    assert [g.id for g in good] == ["0", "1"]
    assert good[0].captions == ["cap 0"]
    # the two largest boxes, in file order, normalized by 64 x 48
    assert good[0].boxes == [Box("dog", 0.25, 0.25, 0.75, 0.75), Box("ball", 0.9375, 40 / 48, 1.0, 1.0)]
    assert len(skipped) == 2
    assert skipped[0] == "image 'img2.png' (id 2): no caption"
    assert skipped[1].startswith("image 'missing.png' (id 99): image 'missing.png' not found in")


def test_csv_pixel_boxes_use_the_image_size_and_normalized_ones_stay(tmp_path, make_images):
    make_images(2)  # 64 x 48 pixels
    (tmp_path / "a.csv").write_text(
        "image,caption,boxes\n"
        'img0.png,A red square.,"[{""label"": ""square"", ""box"": [16, 12, 48, 36]}]"\n'
        "img0.png,Another caption.,\n"
        'img1.png,A green circle.,"[[""circle"", 0.1, 0.2, 0.3, 0.4]]"\n'
    )
    good, skipped = read_annotations(cfg(tmp_path / "a.csv", tmp_path / "images"))
    assert not skipped
    assert good[0].captions == ["A red square.", "Another caption."]
    assert good[0].boxes == [Box("square", 0.25, 0.25, 0.75, 0.75)]
    assert good[1].boxes == [Box("circle", 0.1, 0.2, 0.3, 0.4)]
    xywh, _ = read_annotations(cfg(tmp_path / "a.csv", tmp_path / "images", box_format="xywh"))
    assert xywh[0].boxes == [Box("square", 0.25, 0.25, 1.0, 1.0)]


def test_csv_mistakes_name_the_line(tmp_path, make_images):
    make_images(1)
    (tmp_path / "a.csv").write_text('image,caption,boxes\nimg0.png,x,"[{""box"": [1, 2]}]"\n')
    with pytest.raises(UserError, match="no usable image .*line 2: boxes must be JSON like"):
        read_annotations(cfg(tmp_path / "a.csv", tmp_path / "images"))  # its only image is skipped
    (tmp_path / "b.csv").write_text("file,text\na.png,x\n")
    with pytest.raises(UserError, match="needs the columns image,caption"):
        read_annotations(cfg(tmp_path / "b.csv", tmp_path / "images"))


def test_llava_caption_pairs_give_captions(tmp_path, make_images):
    make_images(2)
    recs = [
        {"id": "a", "image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nDescribe."},
                                                            {"from": "gpt", "value": "A red square."}]},
        {"id": "b", "image": "img1.png", "conversations": [{"from": "human", "value": "<image>"}]},
    ]  # fmt: skip
    (tmp_path / "c.json").write_text(json.dumps(recs))
    good, skipped = read_annotations(cfg(tmp_path / "c.json", tmp_path / "images"))
    assert [(g.id, g.captions) for g in good] == [("a", ["A red square."])]
    assert skipped == ["image 'img1.png' (id b): no caption"]


def test_broken_files_are_one_clear_error(tmp_path, make_images):
    make_images(1)
    (tmp_path / "x.json").write_text('{"images": [}')
    with pytest.raises(UserError, match="broken JSON at line 1"):
        read_annotations(cfg(tmp_path / "x.json", tmp_path / "images"))
    with pytest.raises(UserError, match="file not found"):
        read_annotations(cfg(tmp_path / "nope.json", tmp_path / "images"))


def test_context_lists_captions_then_normalized_boxes(coco):
    good, _ = read_annotations(cfg(coco, coco.parent / "images"))
    assert render_context(good[1]) == (
        "Captions:\n- A green circle on gray.\n- One green circle.\n"
        "Objects (label: [x1, y1, x2, y2], normalized to 0-1, origin at the top left):\n"
        "- circle: [0.109, 0.167, 0.359, 0.500]"
    )


BOXES_HELP = 'boxes must be JSON like [{"label": "dog", "box": [x1, y1, x2, y2]}] or [["dog", x1, y1, x2, y2]]'


def test_a_malformed_boxes_cell_skips_its_image_only(tmp_path, make_images):
    make_images(4)  # 64 x 48 pixels each
    (tmp_path / "kites.csv").write_text(
        "image,caption,boxes\n"
        'img0.png,Kites over a beach.,"[[""kite"", 8, 6, 24, 18]]"\n'
        'img1.png,A tree.,"{""tree"": [1, 2, 3, 4]}"\n'  # an object, not a list
        "img2.png,A boat.,[[boat 1 2 3 4]]\n"  # not JSON
        "img1.png,A tall tree.,\n"  # a later row of a skipped image: still skipped
        'img3.png,Two gulls.,"[[""gull"", 0.1, 0.1, 0.2, 0.3], [""gull"", 0.5, 0.5, ""x"", 0.6]]"\n'
    )
    good, skipped = read_annotations(cfg(tmp_path / "kites.csv", tmp_path / "images"))
    assert [(g.id, g.captions, g.boxes) for g in good] == [
        ("img0.png", ["Kites over a beach."], [Box("kite", 0.125, 0.125, 0.375, 0.375)])
    ]
    assert skipped == [
        f"image 'img1.png' (id img1.png): line 3: {BOXES_HELP}",
        f"image 'img2.png' (id img2.png): line 4: {BOXES_HELP}",
        f"image 'img3.png' (id img3.png): line 6: {BOXES_HELP}",
    ]


def test_a_malformed_coco_bbox_skips_its_image_only(tmp_path, make_images):
    images = make_images(3)
    data = {
        "images": [{"id": 10 + im["id"], "file_name": im["file_name"]} for im in images],
        "annotations": [{"image_id": 10 + im["id"], "caption": f"Shape {im['id']}."} for im in images]
        + [
            {"image_id": 10, "bbox": [4, 4, 8, 8], "category_id": 1},
            {"image_id": 11, "bbox": [4, 4, "8", 8], "category_id": 1},
            {"image_id": 12, "bbox": None, "category_id": 1},
        ],
        "categories": [{"id": 1, "name": "shape"}],
    }
    (tmp_path / "inst.json").write_text(json.dumps(data))
    good, skipped = read_annotations(cfg(tmp_path / "inst.json", tmp_path / "images"))
    assert [(g.id, len(g.boxes)) for g in good] == [("10", 1)]
    assert skipped == [
        "image 'img1.png' (id 11): inst.json annotations[4]: bbox must be 4 numbers [x, y, w, h]",
        "image 'img2.png' (id 12): inst.json annotations[5]: bbox must be 4 numbers [x, y, w, h]",
    ]


def test_rows_repeating_an_images_boxes_give_each_box_once(tmp_path, make_images):
    make_images(2)
    per_caption = json.dumps([["heron", 0.1, 0.2, 0.4, 0.9], {"label": "reed", "box": [0.6, 0.0, 0.7, 1.0]}])
    per_box = [json.dumps([["egret", 32, 0, 64, 24]]), json.dumps([["egret", 0, 24, 16, 48]])]
    rows = [
        ["img0.png", "A heron in the reeds.", per_caption],  # one row per caption, each repeating every box
        ["img0.png", "A grey heron standing.", per_caption],
        ["img0.png", "A heron in the reeds.", per_caption],
        ["img1.png", "Two egrets.", per_box[0]],  # one row per box, the caption repeated
        ["img1.png", "Two egrets.", per_box[1]],
        ["img1.png", "Two  egrets.", per_box[1]],
    ]
    with open(tmp_path / "birds.csv", "w", newline="") as f:
        csv.writer(f).writerows([["image", "caption", "boxes"], *rows])
    good, skipped = read_annotations(cfg(tmp_path / "birds.csv", tmp_path / "images"))
    assert not skipped
    heron, egrets = good
    assert heron.captions == ["A heron in the reeds.", "A grey heron standing."]
    assert heron.boxes == [Box("heron", 0.1, 0.2, 0.4, 0.9), Box("reed", 0.6, 0.0, 0.7, 1.0)]
    assert egrets.captions == ["Two egrets."]
    assert egrets.boxes == [Box("egret", 0.5, 0.0, 1.0, 0.5), Box("egret", 0.0, 0.5, 0.25, 1.0)]
    assert render_context(egrets).count("- egret:") == 2


def test_a_decompression_bomb_is_one_skipped_image_not_a_traceback(tmp_path, make_images):
    import struct
    import zlib

    make_images(1)
    # a PNG whose header claims 20000 x 20000 pixels (the data itself is tiny): opened for its size only
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "images" / "bomb.png").write_bytes(png)
    (tmp_path / "boxes.csv").write_text(
        "image,caption,boxes\n"
        'img0.png,A shape.,"[[""shape"", 8, 6, 24, 18]]"\n'
        'bomb.png,Nothing.,"[[""x"", 1, 2, 3, 4]]"\n'
    )
    good, skipped = read_annotations(cfg(tmp_path / "boxes.csv", tmp_path / "images"))
    assert [g.id for g in good] == ["img0.png"]
    assert len(skipped) == 1 and "bomb.png" in skipped[0] and "cannot read its size" in skipped[0]
    assert "pixels" in skipped[0] and "Traceback" not in skipped[0]
