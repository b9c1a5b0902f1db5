"""Read image annotations (captions, labelled boxes) of three formats into one record per image.

Usage::

    images, skipped = read_annotations(config.annotations)
    images[0]            # ImageAnnotation(id='139', image='000000000139.jpg', captions=[...], boxes=[Box('person', ...)])
    for s in skipped: print(s)     # "image '7.jpg' (id 7): not found in 'images'" ...

Formats (``annotations.format``, ``auto`` picks one from the file):

- ``coco``: COCO-style JSON, ``{"images": [{"id", "file_name", "width", "height"}], "annotations":
  [{"image_id", "caption"} or {"image_id", "bbox": [x, y, w, h], "category_id"}], "categories": [{"id", "name"}]}``;
  captions and instances may be two files (``path`` and ``boxes``), merged by image id;
- ``csv``: a header with ``image`` and ``caption`` (and optionally ``boxes``, ``width``, ``height``);
  several rows of one image add captions and boxes (one row per caption, one row per box, or every row
  repeating the image's boxes: a caption or box given again is kept once); ``boxes`` is JSON:
  ``[{"label": "dog", "box": [x1, y1, x2, y2]}]`` (or ``[["dog", x1, y1, x2, y2]]``), in pixels (the
  image's size is read from the file unless given) or all within 0..1 when already normalized;
- ``llava``: a LLaVA JSON list or JSONL of caption pairs (as LLaVA's stage-1 data): each record's ``image``
  and the text of its answers (``gpt`` turns) as captions.

Boxes are normalized to 0..1 (``x1, y1, x2, y2``, origin top left) and clipped to the image. An image
whose file is missing or outside ``image_folder``, that has no caption, or whose boxes are malformed (a CSV
``boxes`` cell that is not such JSON, a COCO ``bbox`` that is not 4 numbers) is skipped with its reason;
the other images are used.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_llava.data.images import ImageError, image_size, resolve_image_path
from lora_llava.datagen.config import AnnotationsConfig
from lora_llava.errors import UserError


@dataclass(frozen=True)
class Box:
    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def area(self) -> float:
        return (self.x2 - self.x1) * (self.y2 - self.y1)


@dataclass
class ImageAnnotation:
    id: str
    image: str  # relative to image_folder
    captions: list[str] = field(default_factory=list)
    boxes: list[Box] = field(default_factory=list)
    width: int | None = None
    height: int | None = None
    raw_boxes: list[tuple[str, list[float]]] = field(default_factory=list)  # as read, before normalizing
    problem: str | None = None  # the first malformed annotation of this image: it is skipped with this reason

    def add_caption(self, text: str) -> None:
        """Add a caption unless the image has it already (rows of one image may repeat it)."""
        if text not in self.captions:
            self.captions.append(text)

    def add_box(self, label: str, box: list[float]) -> None:
        """Add a box unless the image has the same label and coordinates already (rows may repeat them)."""
        if (label, box) not in self.raw_boxes:
            self.raw_boxes.append((label, box))

    def refuse(self, why: str) -> None:
        """Mark the image unusable (its first problem is the reason it is skipped with)."""
        self.problem = self.problem or why


def read_annotations(cfg: AnnotationsConfig) -> tuple[list[ImageAnnotation], list[str]]:
    """Every usable image (in file order) and a line per skipped image saying why."""
    path = Path(cfg.path)
    if not path.is_file():
        raise UserError(
            f"annotations.path {cfg.path!r}: file not found", hint="give a COCO JSON, a CSV or a LLaVA JSON"
        )
    folder = Path(cfg.image_folder)
    if not folder.is_dir():
        raise UserError(f"annotations.image_folder {cfg.image_folder!r}: not a folder")
    fmt = cfg.format if cfg.format != "auto" else _detect(path)
    if cfg.boxes is not None and fmt != "coco":
        raise UserError(f"annotations.boxes: only used with COCO annotations (format is {fmt})")
    if fmt == "coco":
        images = _read_coco([path] + ([Path(cfg.boxes)] if cfg.boxes else []))
        box_format = "xywh_pixels"
    elif fmt == "csv":
        images = _read_csv(path)
        box_format = cfg.box_format or "xyxy"
    else:
        images = _read_llava(path)
        box_format = "xyxy"
    good, skipped = [], []
    for im in images:
        why = _finish(im, folder, box_format, cfg)
        if why:
            skipped.append(f"image {im.image!r} (id {im.id}): {why}")
        else:
            good.append(im)
    if not good:
        shown = "; ".join(skipped[:3]) or "the file lists no image"
        raise UserError(f"annotations {cfg.path!r}: no usable image ({shown})")
    return good, skipped


def _detect(path: Path) -> str:
    if path.suffix.lower() == ".csv":
        return "csv"
    if path.suffix.lower() == ".jsonl":
        return "llava"
    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(4096).lstrip()
    return "llava" if head.startswith("[") else "coco"


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"annotations {str(path)!r}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise UserError(
            f"annotations {str(path)!r}: broken JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def _read_coco(paths: list[Path]) -> list[ImageAnnotation]:
    by_id: dict[str, ImageAnnotation] = {}
    for path in paths:
        data = _load_json(path)
        if not isinstance(data, dict) or not isinstance(data.get("images"), list):
            raise UserError(f"annotations {str(path)!r}: a COCO file is an object with an `images` list")
        cats = {c.get("id"): str(c.get("name")) for c in data.get("categories") or [] if isinstance(c, dict)}
        for i, rec in enumerate(data["images"]):
            if not isinstance(rec, dict) or "id" not in rec or not isinstance(rec.get("file_name"), str):
                raise UserError(f"annotations {str(path)!r}: images[{i}] needs `id` and `file_name`")
            key = str(rec["id"])
            im = by_id.setdefault(key, ImageAnnotation(id=key, image=rec["file_name"]))
            im.width, im.height = (
                _int_or_none(rec.get("width")) or im.width,
                _int_or_none(rec.get("height")) or im.height,
            )
        for i, ann in enumerate(data.get("annotations") or []):
            if not isinstance(ann, dict) or str(ann.get("image_id")) not in by_id:
                raise UserError(f"annotations {str(path)!r}: annotations[{i}] names no image of `images` (image_id)")
            im = by_id[str(ann["image_id"])]
            if isinstance(ann.get("caption"), str):
                im.add_caption(ann["caption"])
            if "bbox" in ann:
                label = cats.get(ann.get("category_id"), str(ann.get("category_id")))
                box = ann["bbox"]
                if _is_box(box):
                    im.add_box(label, [float(v) for v in box])
                else:  # this image's problem, not the whole file's
                    im.refuse(f"{path.name} annotations[{i}]: bbox must be 4 numbers [x, y, w, h]")
    return list(by_id.values())


def _read_csv(path: Path) -> list[ImageAnnotation]:
    by_image: dict[str, ImageAnnotation] = {}
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or [])
            if not {"image", "caption"} <= cols:
                raise UserError(
                    f"annotations {str(path)!r}: the CSV header needs the columns image,caption (has {sorted(cols)})",
                    hint="optional columns: boxes, width, height",
                )
            for line, row in enumerate(reader, start=2):
                name = (row.get("image") or "").strip()
                if not name:
                    raise UserError(f"annotations {str(path)!r} line {line}: empty image")
                im = by_image.setdefault(name, ImageAnnotation(id=name, image=name))
                if (row.get("caption") or "").strip():
                    im.add_caption(row["caption"].strip())
                im.width = _int_or_none(row.get("width")) or im.width
                im.height = _int_or_none(row.get("height")) or im.height
                if (row.get("boxes") or "").strip():
                    try:
                        boxes = _csv_boxes(row["boxes"])
                    except ValueError as e:  # this image's problem, not the whole file's
                        im.refuse(f"line {line}: {e}")
                    else:
                        for label, box in boxes:
                            im.add_box(label, box)
    except UnicodeDecodeError:
        raise UserError(f"annotations {str(path)!r}: not UTF-8 text") from None
    except csv.Error as e:
        raise UserError(f"annotations {str(path)!r}: broken CSV: {e}") from None
    return list(by_image.values())


def _csv_boxes(text: str) -> list[tuple[str, list[float]]]:
    """The boxes of one CSV cell, or ValueError saying what they must look like."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        items = None
    out = []
    for item in items if isinstance(items, list) else [None]:
        if isinstance(item, dict) and isinstance(item.get("label"), str) and _is_box(item.get("box")):
            out.append((item["label"], [float(v) for v in item["box"]]))
        elif isinstance(item, list) and len(item) == 5 and isinstance(item[0], str) and _is_box(item[1:]):
            out.append((item[0], [float(v) for v in item[1:]]))
        else:
            raise ValueError(
                'boxes must be JSON like [{"label": "dog", "box": [x1, y1, x2, y2]}] or [["dog", x1, y1, x2, y2]]'
            )
    return out


def _read_llava(path: Path) -> list[ImageAnnotation]:
    if path.suffix.lower() == ".jsonl":
        records = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise UserError(f"annotations {str(path)!r} line {n}: broken JSON: {e.msg}") from None
    else:
        records = _load_json(path)
        if not isinstance(records, list):
            raise UserError(f"annotations {str(path)!r}: a LLaVA file is a JSON list of records")
    by_image: dict[str, ImageAnnotation] = {}
    for i, rec in enumerate(records):
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str):
            raise UserError(f"annotations {str(path)!r}: record {i} needs an `image` path (one image per record)")
        name = rec["image"]
        im = by_image.setdefault(name, ImageAnnotation(id=str(rec.get("id", name)), image=name))
        for turn in rec.get("conversations") or []:
            if isinstance(turn, dict) and turn.get("from", turn.get("role")) in ("gpt", "assistant"):
                text = turn.get("value", turn.get("content"))
                if isinstance(text, str) and text.strip():
                    im.add_caption(text.strip())
    return list(by_image.values())


def _finish(im: ImageAnnotation, folder: Path, box_format: str, cfg: AnnotationsConfig) -> str | None:
    """Resolve the file, normalize the boxes, cap the lists; the reason when the image cannot be used."""
    if im.problem is not None:
        return im.problem
    try:
        path = resolve_image_path(im.image, folder, roots_key=None)  # no image_roots option here: copying is the way
    except ImageError as e:
        return str(e)
    captions = (" ".join(c.split()) for c in im.captions if c.strip())
    im.captions = list(dict.fromkeys(captions))[: cfg.max_captions]  # a caption differing only in spaces: once
    if not im.captions:
        return "no caption"
    if im.raw_boxes:
        # COCO boxes are pixels; elsewhere boxes all within 0..1 are taken as already normalized
        normalized = box_format != "xywh_pixels" and all(0.0 <= v <= 1.0 for _, b in im.raw_boxes for v in b)
        if not normalized and (im.width is None or im.height is None):
            try:  # the header only, as training reads it (EXIF orientation, the pixel limit)
                im.width, im.height = image_size(path)
            except ImageError as e:
                return f"cannot read its size to normalize the boxes ({e})"
        w, h = (1.0, 1.0) if normalized else (float(im.width or 1), float(im.height or 1))
        boxes = []
        for label, (a, b, c, d) in im.raw_boxes:
            x2, y2 = (a + c, b + d) if box_format.startswith("xywh") else (c, d)
            box = Box(label.strip(), _clip(a / w), _clip(b / h), _clip(x2 / w), _clip(y2 / h))
            if box.x2 > box.x1 and box.y2 > box.y1 and box.label:
                boxes.append(box)
        keep = set(sorted(range(len(boxes)), key=lambda i: -boxes[i].area)[: cfg.max_boxes])
        im.boxes = [b for i, b in enumerate(boxes) if i in keep]
    return None


def _clip(v: float) -> float:
    return min(1.0, max(0.0, v))


def _is_box(v: Any) -> bool:
    return (
        isinstance(v, list) and len(v) == 4 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    )


def _int_or_none(v: Any) -> int | None:
    try:
        return int(v) if v not in (None, "") else None
    except (TypeError, ValueError):
        return None
