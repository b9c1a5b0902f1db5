"""Safe image loading: every mode to RGB, EXIF orientation, decompression bombs, disallowed formats."""

from __future__ import annotations

import hashlib
import struct
import warnings
import zlib
from pathlib import Path

import pytest
from helpers import GOOD_TURNS, read_one
from PIL import Image

from lora_llava.data import images as images_mod
from lora_llava.data.images import image_size, load_image


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` but holds no pixels: cheap to write, huge to decode."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


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
    Image.new("RGB", (16, 16)).save(tmp_path / "x.ico")  # an ICO holds 16 px and up (smaller is an empty file)
    with pytest.raises(images_mod.ImageError, match="image format ICO is not allowed"):
        load_image(tmp_path / "x.ico")
    frames = [Image.new("RGB", (20, 10), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = load_image(tmp_path / "anim.gif")
    assert out.mode == "RGB" and out.size == (20, 10)
    assert out.getpixel((0, 0))[0] > 200 and out.getpixel((0, 0))[1] < 50  # first frame: red


def _hub_cache(root: Path) -> tuple[Path, Path]:
    """A Hugging Face Hub cache of one dataset repo, as the Hub client lays it out: the files live in
    ``blobs/<sha>``; ``snapshots/<rev>/...`` holds relative symlinks to them. Returns (repo, photos folder)."""
    repo = root / "hub" / "datasets--acme--herons"
    (repo / "blobs").mkdir(parents=True)
    photos = repo / "snapshots" / "4f0c2e9" / "photos"
    photos.mkdir(parents=True)
    for name, color in (("heron.webp", (90, 110, 140)), ("egret.webp", (250, 250, 245))):
        blob = repo / "blobs" / hashlib.sha256(name.encode()).hexdigest()
        Image.new("RGB", (33, 21), color).save(blob, format="WEBP", lossless=True)
        (photos / name).symlink_to(Path("../../..") / "blobs" / blob.name)  # relative, as the Hub writes them
    (root / "secret.txt").write_text("not for training")
    (photos / "stolen.webp").symlink_to(Path("../../../../..") / "secret.txt")  # out of the repo: never allowed
    return repo, photos


def test_links_into_a_named_root_resolve_and_links_elsewhere_stay_refused(tmp_path):
    from lora_llava.data.images import ImageError, resolve_image_path

    repo, photos = _hub_cache(tmp_path)
    # the image folder alone: the blob lies outside it, and the message names both ways through
    with pytest.raises(ImageError) as refused:
        resolve_image_path("heron.webp", photos)
    blob = (photos / "heron.webp").resolve()
    assert str(refused.value) == (
        f"image 'heron.webp' is a link to {str(blob)!r}, outside the image folder; to use it, name a folder "
        "holding its target in data.*.image_roots, or copy the images with their links followed "
        "(cp -rL IMAGE_FOLDER NEW_FOLDER)"
    )
    # the repo named as a root: the snapshot's links resolve, the path stays the one under the image folder
    path = resolve_image_path("heron.webp", photos, roots=[repo])
    assert path == photos / "heron.webp"
    assert load_image(path).getpixel((5, 5)) == (90, 110, 140)
    assert image_size(resolve_image_path("egret.webp", str(photos), roots=[str(repo)])) == (33, 21)
    # confinement holds: a link out of every named folder, `..`, and absolute paths are still refused
    with pytest.raises(ImageError, match="is a link to .*secret.txt', outside the image folder and image_roots; "):
        resolve_image_path("stolen.webp", photos, roots=[repo])
    with pytest.raises(ImageError, match=r"leaves the image folder \('..'\)"):
        resolve_image_path("../../../blobs/" + blob.name, photos, roots=[repo])
    with pytest.raises(ImageError, match="is an absolute path"):
        resolve_image_path(str(blob), photos, roots=[repo])
    # a caller without the option suggests only the copy
    with pytest.raises(ImageError, match=r"outside the image folder; to use it, copy the images with their links"):
        resolve_image_path("heron.webp", photos, roots_key=None)


class _Named:
    """An embedded image as a dataset reader hands it over: a name and bytes read on demand."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name, self.data = name, data

    def read_bytes(self) -> bytes:
        return self.data


@pytest.mark.parametrize("data", [b"%PDF-1.4 not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_a_broken_embedded_image_is_named_never_shown_as_a_repr(data):
    cell = _Named("row 12 photo", data)
    for read in (load_image, image_size):
        with pytest.raises(images_mod.ImageError) as e:
            read(cell)
        text = str(e.value)
        assert "row 12 photo" in text and "0x" not in text and "object at" not in text and "BytesIO" not in text, text
