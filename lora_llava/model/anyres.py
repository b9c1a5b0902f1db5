"""LLaVA-NeXT's AnyRes grids: capping the tiles per image on the model config and the processor together.

Usage::

    cap_tiles([[336, 672], [672, 672]], tile=336, max_tiles=2)   # [[336, 672]]
    apply_max_tiles(model, processor, max_tiles=2)                # both agree, so token counts stay exact
"""

from __future__ import annotations

from lora_llava.annotations import Model, Processor
from lora_llava.errors import UserError


def cap_tiles(pinpoints: list, tile: int, max_tiles: int | None) -> list:
    """AnyRes grid resolutions with at most ``max_tiles`` tiles of ``tile`` pixels."""
    if not max_tiles:
        return pinpoints
    kept = [p for p in pinpoints if (p[0] // tile) * (p[1] // tile) <= max_tiles]
    if not kept:
        raise UserError(
            f"images.max_tiles={max_tiles} leaves no AnyRes grid (smallest has "
            f"{min((p[0] // tile) * (p[1] // tile) for p in pinpoints)} tiles)"
        )
    return kept


def apply_max_tiles(model: Model, processor: Processor, max_tiles: int | None) -> None:
    """Cap LLaVA-NeXT's AnyRes grids on the model config (when given) and the processor together."""
    ip = getattr(processor, "image_processor", None)
    if not max_tiles or ip is None or not getattr(ip, "image_grid_pinpoints", None):
        return
    tile = ip.crop_size["height"] if isinstance(ip.crop_size, dict) else ip.crop_size.height
    kept = cap_tiles(ip.image_grid_pinpoints, tile, max_tiles)
    ip.image_grid_pinpoints = kept
    if model is not None:
        model.config.image_grid_pinpoints = kept
