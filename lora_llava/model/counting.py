"""A processor that counts: the backbone's tokenizer and its image-token arithmetic, without pixels.

Usage::

    processor = counting_processor(path) or load_processor(path)   # None: load the full processor
    processor.tokenizer, processor.image_token, processor.image_processor.image_grid_pinpoints
    image_token_counts(processor, [(336, 672)])                     # as LlavaNextProcessor counts them

``check`` and ``plan`` need every sample's exact token count, never its pixels. The full processor imports
transformers' image-processing stack, which pulls its model-loading code and ``torch.distributed`` with it
(about 2 s of a 3.5 s check on two cores); this reads ``processor_config.json`` and loads the tokenizer the
class the full processor's ``AutoTokenizer`` would load (only the generic ``TokenizersBackend``, loaded directly). The counts follow the arithmetic of
``LlavaProcessor`` (a fixed count from the crop size) and ``LlavaNextProcessor`` (AnyRes: the best grid
pinpoint, the unpadded feature map, one newline per row, the base image); tests/model/test_counting.py pins
them, and the tokenizer and image token, against the full processor over many image sizes, grids and tile
caps. For any other processor class, a directory saved differently, or a Hub id, ``counting_processor``
returns None and the caller loads the full processor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_llava.annotations import Tokenizer
from lora_llava.layout import MODEL_CONFIG_FILE, PROCESSOR_CONFIG_FILE, TOKENIZER_CONFIG_FILE

KINDS = ("LlavaProcessor", "LlavaNextProcessor")


@dataclass
class CountingImageProcessor:
    """The image processor's settings that decide token counts (and the padding color)."""

    image_mean: list[float]
    crop_size: dict[str, int]
    size: dict[str, int]
    image_grid_pinpoints: list[list[int]] = field(default_factory=list)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a counting processor has no pixels: load the backbone's processor (load_processor) to encode")


@dataclass
class CountingProcessor:
    """What ``Encoder`` reads of a processor for lengths: ``tokenizer``, ``image_token``, ``image_processor``
    settings, and the image-token count per image size (``_get_num_multimodal_tokens``, the processors' own
    name for it, which ``compat.image_token_counts`` calls)."""

    kind: str
    tokenizer: Tokenizer
    image_processor: CountingImageProcessor
    image_token: str
    patch_size: int
    num_additional_image_tokens: int
    vision_feature_select_strategy: str | None

    def _get_num_multimodal_tokens(self, image_sizes: list[tuple[int, int]]) -> dict[str, list[int]]:
        counts = [self._count(h, w) for h, w in image_sizes]
        if self.vision_feature_select_strategy == "default":  # the CLS feature is dropped
            counts = [n - 1 for n in counts]
        return {"num_image_tokens": counts}

    def _count(self, height: int, width: int) -> int:
        p = self.patch_size
        if self.kind == "LlavaProcessor":
            crop = self.image_processor.crop_size
            return (crop["height"] // p) * (crop["width"] // p) + self.num_additional_image_tokens
        size = self.image_processor.size
        side = size["shortest_edge"] if size.get("shortest_edge") is not None else min(size["height"], size["width"])
        grid_h, grid_w = best_grid((height, width), self.image_processor.image_grid_pinpoints)
        rows, cols = side // p, side // p  # patches of one tile
        return anyres_features(height, width, rows * (grid_h // side), cols * (grid_w // side)) + (
            rows * cols + self.num_additional_image_tokens
        )


def best_grid(size: tuple[int, int], pinpoints: list[list[int]]) -> tuple[int, int]:
    """The (height, width) pinpoint AnyRes resizes an image of ``size`` (height, width) into: the most of the
    image kept after scaling to fit, ties broken by the least padding (the first such pinpoint wins)."""
    h, w = size
    best: tuple[int, int] = (0, 0)
    kept_best, waste_best = 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = ph * pw - kept
        if kept > kept_best or (kept == kept_best and waste < waste_best):
            best, kept_best, waste_best = (ph, pw), kept, waste
    return best


def anyres_features(height: int, width: int, rows: int, cols: int) -> int:
    """Features of a (rows x cols) AnyRes feature map once the padding around an image of (height, width) is cut
    away, plus one newline feature per remaining row."""
    if width / height > cols / rows:  # wider than the grid: rows of padding above and below
        kept = int(round(height * (cols / width), 7))
        rows -= (rows - kept) // 2 * 2
    else:
        kept = int(round(width * (rows / height), 7))
        cols -= (cols - kept) // 2 * 2
    return rows * cols + rows


def counting_processor(path: str | Path) -> CountingProcessor | None:
    """The counting processor of a saved LLaVA / LLaVA-NeXT processor directory, or None when ``path`` is not
    one whose settings this reads (a Hub id, another processor class, settings left to class defaults)."""
    folder = Path(path)
    try:
        config = json.loads((folder / PROCESSOR_CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("processor_class") not in KINDS:
        return None
    images = config.get("image_processor")
    patch = config.get("patch_size")
    if not isinstance(images, dict) or not isinstance(patch, int) or patch <= 0:
        return None
    crop, size = images.get("crop_size"), images.get("size")
    if config["processor_class"] == "LlavaProcessor":
        if not (isinstance(crop, dict) and {"height", "width"} <= crop.keys()):
            return None
    elif not (isinstance(size, dict) and ("shortest_edge" in size or {"height", "width"} <= size.keys())):
        return None
    elif not images.get("image_grid_pinpoints"):
        return None
    tokenizer = _generic_tokenizer(folder)
    if tokenizer is None:
        return None
    image_token = tokenizer.image_token if hasattr(tokenizer, "image_token") else config.get("image_token", "<image>")
    return CountingProcessor(
        kind=config["processor_class"],
        tokenizer=tokenizer,
        image_processor=CountingImageProcessor(
            image_mean=list(images.get("image_mean") or []),
            crop_size=dict(crop or {}),
            size=dict(size or {}),
            image_grid_pinpoints=[list(g) for g in images.get("image_grid_pinpoints") or []],
        ),
        image_token=image_token,
        patch_size=patch,
        num_additional_image_tokens=int(config.get("num_additional_image_tokens", 0)),
        vision_feature_select_strategy=config.get("vision_feature_select_strategy"),
    )


def _generic_tokenizer(folder: Path) -> Tokenizer | None:
    """The tokenizer ``AutoTokenizer`` loads from ``folder`` when that is transformers' generic
    ``TokenizersBackend`` (its ``tokenizer.json`` as saved): for a LLaVA / LLaVA-NeXT config, whose registered
    tokenizer is that same class, with no custom code named, AutoTokenizer loads exactly this class. Loading it
    directly skips AutoTokenizer's imports (torch and the config classes). Another class: None."""
    try:
        declared = json.loads((folder / TOKENIZER_CONFIG_FILE).read_text())
        model_type = json.loads((folder / MODEL_CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(declared, dict) or "auto_map" in declared or model_type not in ("llava", "llava_next"):
        return None
    if declared.get("tokenizer_class") != "TokenizersBackend":
        return None
    from transformers import TokenizersBackend

    from lora_llava.model.loading import quiet_transformers

    quiet_transformers()
    try:
        return TokenizersBackend.from_pretrained(str(folder))
    except (OSError, ValueError):  # the full processor's loading reports it
        return None
