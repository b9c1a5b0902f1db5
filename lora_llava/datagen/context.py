"""The symbolic context of one image: what a text-only LLM is shown instead of the pixels.

Usage::

    render_context(image_annotation)
    # Captions:
    # - A brown dog leaps to catch a frisbee on a lawn.
    # Objects (label: [x1, y1, x2, y2], normalized to 0-1, origin at the top left):
    # - dog: [0.312, 0.405, 0.688, 0.870]
    # - frisbee: [0.550, 0.210, 0.640, 0.280]
"""

from __future__ import annotations

from lora_llava.datagen.annotations import Box, ImageAnnotation

BOXES_HEADER = "Objects (label: [x1, y1, x2, y2], normalized to 0-1, origin at the top left):"


def format_box(box: Box) -> str:
    return f"{box.label}: [{box.x1:.3f}, {box.y1:.3f}, {box.x2:.3f}, {box.y2:.3f}]"


def render_context(im: ImageAnnotation) -> str:
    lines = ["Captions:"] + [f"- {c}" for c in im.captions]
    if im.boxes:
        lines += [BOXES_HEADER] + [f"- {format_box(b)}" for b in im.boxes]
    return "\n".join(lines)
