"""Safe, deterministic image loading.

Usage::

    path = resolve_image_path("cats/1.jpg", image_folder="data/images")   # confined to the folder
    path = resolve_image_path("x.png", "hub/snapshots/abc", roots=["hub"])  # links may point into hub/ too
    img = load_image(path)                                                # RGB PIL image
    img = load_image(embedded)          # or any object with .read_bytes() and .name (an image stored in a dataset)
    image_label(embedded)               # 'row 3 image': how messages name an image (never a repr)

Rules, the same every time:
- the path is relative to the image folder and may not leave it (no absolute paths, ``..``,
  URLs); a symlink (or a linked folder on the way) may point only inside the image folder or
  inside one of the extra ``roots`` the user named (``data.*.image_roots``: the Hugging Face Hub
  cache keeps ``snapshots/<rev>/x.png -> ../../blobs/<hash>``, DVC and git-annex link into their
  caches); a link to anywhere else is refused, saying how to allow it or to copy the files (``cp -rL``);
- an embedded image is named in every message by its ``name`` (``row 3 image``), never by a repr;
- formats: JPEG, PNG, WebP, GIF, BMP, TIFF; files over ``MAX_FILE_BYTES``, images over
  ``MAX_PIXELS`` pixels (decompression bombs; the limit is never disabled) and images more than
  ``MAX_ASPECT`` times longer than wide (a processor resizing the short side would explode) are
  rejected; a file any decoder fails on is rejected with the decoder's message;
- EXIF orientation is applied; animated images use their first frame;
- every mode becomes RGB: transparency is flattened onto white, palette, CMYK, grayscale and
  16-bit images are converted.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol, runtime_checkable

from PIL import Image, ImageOps

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"}
MAX_PIXELS = 64_000_000
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_ASPECT = 100  # longest side / shortest side
_ORIENTATION = 0x0112  # the EXIF orientation tag
BACKGROUND = (255, 255, 255)


class ImageError(ValueError):
    """A sample's image cannot be used; the message says why."""


@runtime_checkable
class EmbeddedImage(Protocol):
    """An image whose encoded bytes live inside a dataset (a `datasets` row), read on demand."""

    name: str

    def read_bytes(self) -> bytes: ...


ImageRef = Path | EmbeddedImage  # what a Sample holds per image


def image_label(src: object) -> str:
    """How a message names an image: a path as text, an embedded image by its ``name`` (``row 3 image``),
    never a repr (which would show ``<_io.BytesIO object at 0x...>``)."""
    if isinstance(src, (str, os.PathLike)):
        return os.fsdecode(src)
    name = getattr(src, "name", None)
    return name if isinstance(name, str) else f"an embedded {type(src).__name__}"


class _NamedBytes(io.BytesIO):
    """An embedded image's bytes for Image.open, whose repr (which decoders put into their messages) is its name."""

    def __init__(self, data: bytes, label: str) -> None:
        super().__init__(data)
        self.label = label

    def __repr__(self) -> str:
        return repr(self.label)


_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9a-fA-F]+>")


def _scrubbed(text: str, label: str) -> str:
    """A decoder's message with any object repr in it replaced by the image's name."""
    return _OBJECT_REPR.sub(repr(label), text)


def _open(src: str | os.PathLike | EmbeddedImage) -> tuple[int, Path | io.BytesIO]:
    """(size in bytes, something Image.open reads) for a file path or an embedded image."""
    if isinstance(src, (str, os.PathLike)):
        return Path(src).stat().st_size, Path(src)
    data = src.read_bytes()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"it holds no image bytes (got {type(data).__name__})")
    return len(data), _NamedBytes(bytes(data), image_label(src))


def quoted(name: object, limit: int = 80) -> str:
    """``repr`` of an image's name (a path, or an embedded image's ``name``), shortened to ``limit``
    characters for messages."""
    text = repr(name if isinstance(name, str) else image_label(name))
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def resolve_image_path(
    name: str,
    image_folder: str | os.PathLike | None,
    roots: Sequence[str | os.PathLike] = (),
    roots_key: str | None = "data.*.image_roots",
) -> Path:
    """``image_folder / name``, or ImageError naming why the image cannot be used.

    ``name`` must stay inside the folder as written (relative, no ``..``); once its links are followed,
    the file must lie inside the image folder or inside one of ``roots`` (folders the user named, where
    link targets may live). ``roots_key`` is the option a refused link's message tells the user to set
    (None: the caller has no such option, only copying the files is suggested).
    """
    if not isinstance(name, str) or not name.strip():
        raise ImageError("image path is empty or not a string")
    shown = quoted(name)
    if "://" in name:
        raise ImageError(f"image {shown} is a URL; download it into the image folder first")
    rel = Path(name)
    if rel.is_absolute():
        raise ImageError(f"image {shown} is an absolute path; give it relative to image_folder")
    if ".." in rel.parts:
        raise ImageError(f"image {shown} leaves the image folder ('..')")
    if "\x00" in name:
        raise ImageError(f"image {shown} holds a NUL character")
    folder = Path(image_folder) if image_folder else Path(".")
    path = folder / rel
    try:
        real = path.resolve(strict=True)
    except FileNotFoundError:
        raise ImageError(f"image {shown} not found in {str(folder)!r}") from None
    except (OSError, RuntimeError) as e:  # a symlink loop (RuntimeError before Python 3.13), a name too long, ...
        why = getattr(e, "strerror", None) or str(e)
        raise ImageError(f"image {shown} in {str(folder)!r} cannot be opened ({why})") from None
    allowed = [folder.resolve(), *(Path(r).resolve() for r in roots)]
    if not any(real.is_relative_to(a) for a in allowed):
        where = "the image folder and image_roots" if roots else "the image folder"
        allow = f"name a folder holding its target in {roots_key}, or " if roots_key else ""
        raise ImageError(
            f"image {shown} is a link to {str(real)!r}, outside {where}; to use it, {allow}"
            "copy the images with their links followed (cp -rL IMAGE_FOLDER NEW_FOLDER)"
        )
    if not real.is_file():
        raise ImageError(f"image {shown} is not a file")
    return path


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, BACKGROUND)
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    return img.convert("RGB")


@contextmanager
def _pixel_limit() -> Iterator[None]:
    """PIL's decompression-bomb limit at ``MAX_PIXELS`` while lora_llava opens an image, restored after
    (importing lora_llava leaves the process-wide setting alone)."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def load_image(src: str | os.PathLike | EmbeddedImage) -> Image.Image:
    """Open ``src`` (a path or an embedded image) and return an RGB image, or raise ImageError naming the problem."""
    label = image_label(src)
    try:
        size, handle = _open(src)
    except (OSError, ValueError, TypeError) as e:
        raise ImageError(f"image cannot be read ({type(e).__name__}: {_scrubbed(str(e), label)})") from None
    if size > MAX_FILE_BYTES:
        raise ImageError(f"image file is {size} bytes, over the {MAX_FILE_BYTES}-byte cap")
    try:
        with _pixel_limit(), Image.open(handle) as img:
            if img.format not in ALLOWED_FORMATS:
                raise ImageError(f"image format {img.format} is not allowed ({', '.join(sorted(ALLOWED_FORMATS))})")
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise ImageError(f"image is {w}x{h} pixels, over the {MAX_PIXELS}-pixel limit")
            if max(w, h) > MAX_ASPECT * max(min(w, h), 1):
                raise ImageError(
                    f"image is {w}x{h} pixels, more than {MAX_ASPECT} times longer than wide "
                    "(resizing its short side would take unbounded memory)"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)
            img.load()
            oriented: Image.Image = img
            if img.getexif().get(_ORIENTATION, 1) != 1:
                oriented = ImageOps.exif_transpose(img)
            return oriented if oriented.mode == "RGB" else _to_rgb(oriented)  # loaded: usable after the file is closed
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"image rejected as a decompression bomb: {_scrubbed(str(e), label)}") from None
    except MemoryError:
        raise
    except Exception as e:  # a malformed file can make any decoder fail in its own way
        raise ImageError(f"not a readable image ({type(e).__name__}: {_scrubbed(str(e), label)})") from None


def image_size(src: str | os.PathLike | EmbeddedImage) -> tuple[int, int]:
    """(width, height) after EXIF orientation, reading only the header; ImageError naming the image when
    its header cannot be read."""
    label = image_label(src)
    try:
        with _pixel_limit(), Image.open(_open(src)[1]) as img:
            w, h = img.size
            orientation = img.getexif().get(_ORIENTATION, 1)
    except MemoryError:
        raise
    except Exception as e:
        why = f"{type(e).__name__}: {_scrubbed(str(e), label)}"
        raise ImageError(f"image {quoted(label)}: not a readable image ({why})") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def pad_to_square(img: Image.Image, color: tuple[int, int, int]) -> Image.Image:
    """LLaVA-1.5's ``pad`` image handling: center the image on a square canvas of ``color``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), color)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas
