"""A small visual task for offline runs: name the color of the shape drawn in the image.

Usage::

    write_shapes_dataset("runs/quickstart/data", n_train=320, n_eval=64, seed=0)
    # -> train.json, eval.json (LLaVA-Instruct format) and images/*.png

The answer can only come from the pixels: the question text never hints at the color, the
shape, its size, position and the background vary, and the colors are balanced, so an untrained
model can do no better than chance (1 / len(COLORS)). A quarter of the training samples are
two-turn conversations, so multi-turn answer masking is exercised too.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

from lora_llava.data.prompts import BRIEF_DESCRIPTION_PROMPTS

COLORS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (30, 60, 220), "yellow": (240, 210, 20)}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = (
    "What color is the shape?",
    "What is the color of the object in the picture?",
    "Which color is the shape drawn in the image?",
    "Tell me the color of the shape.",
)
SIZE = 64


def _draw(rng: random.Random, color: tuple[int, int, int], shape: str) -> Image.Image:
    bg = tuple(rng.randint(200, 250) for _ in range(3))
    img = Image.new("RGB", (SIZE, SIZE), bg)
    d = ImageDraw.Draw(img)
    r = rng.randint(14, 24)
    cx, cy = rng.randint(r, SIZE - r), rng.randint(r, SIZE - r)
    jitter = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in color)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    elif shape == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=jitter)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=jitter)
    return img


def _samples(
    rng: random.Random, n: int, prefix: str, folder: Path, multi_turn: bool, task: str = "color"
) -> list[dict]:
    names = list(COLORS)
    out = []
    for i in range(n):
        color = names[i % len(names)]
        shape = rng.choice(SHAPES)
        image = f"{prefix}_{i:04d}.png"
        _draw(rng, COLORS[color], shape).save(folder / image)
        if task == "caption":  # stage-1 alignment data: brief-description prompt -> caption
            conv = [
                {"from": "human", "value": f"<image>\n{rng.choice(BRIEF_DESCRIPTION_PROMPTS)}"},
                {"from": "gpt", "value": f"A {color} {shape}."},
            ]
            out.append({"id": f"{prefix}-{i}", "image": image, "conversations": conv})
            continue
        q = rng.choice(QUESTIONS)
        conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": color.capitalize()}]
        if multi_turn and rng.random() < 0.25:  # independent of the color
            conv = [
                {"from": "human", "value": "<image>\nHow many shapes are in the image?"},
                {"from": "gpt", "value": "One."},
                {"from": "human", "value": q},
                {"from": "gpt", "value": color.capitalize()},
            ]
        out.append({"id": f"{prefix}-{i}", "image": image, "conversations": conv})
    rng.shuffle(out)
    return out


QUADRANT_QUESTION = "Where is the shape? Answer 1 (top left), 2 (top right), 3 (bottom left) or 4 (bottom right)."


def _quadrant_samples(rng: random.Random, n: int, prefix: str, folder: Path) -> list[dict]:
    """Answers are digits: in Llama-style sentencepiece " 2" is a lone "\u2581" then "2", so the answer's
    first generated token is the space, which must carry loss for the answer to be learned."""
    out = []
    for i in range(n):
        q = i % 4
        bg = tuple(rng.randint(200, 250) for _ in range(3))
        img = Image.new("RGB", (SIZE, SIZE), bg)
        r = rng.randint(8, 12)
        cx = rng.randint(r + 2, SIZE // 2 - r - 2) + (SIZE // 2 if q in (1, 3) else 0)
        cy = rng.randint(r + 2, SIZE // 2 - r - 2) + (SIZE // 2 if q in (2, 3) else 0)
        color = COLORS[rng.choice(list(COLORS))]
        ImageDraw.Draw(img).ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
        image = f"{prefix}_{i:04d}.png"
        img.save(folder / image)
        conv = [{"from": "human", "value": f"<image>\n{QUADRANT_QUESTION}"}, {"from": "gpt", "value": str(q + 1)}]
        out.append({"id": f"{prefix}-{i}", "image": image, "conversations": conv})
    rng.shuffle(out)
    return out


def write_shapes_dataset(folder: str | Path, n_train: int = 320, n_eval: int = 64, seed: int = 0) -> Path:
    """Write the dataset into ``folder``; the same seed writes the same files.

    Also writes ``align.json``: caption pairs ("Describe the image briefly." -> "A red circle.") on
    the training images, the stage-1 (feature alignment) data of an assembled LLaVA; and
    ``quadrant_train.json`` / ``quadrant_eval.json``: where is the shape, answered with a digit 1-4.
    """
    folder = Path(folder)
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    train = _samples(rng, n_train, "train", images, multi_turn=True)
    evals = _samples(rng, n_eval, "eval", images, multi_turn=False)
    (folder / "train.json").write_text(json.dumps(train, indent=1))
    (folder / "eval.json").write_text(json.dumps(evals, indent=1))
    align = _samples(random.Random(seed + 1), n_train, "align", images, multi_turn=False, task="caption")
    (folder / "align.json").write_text(json.dumps(align, indent=1))
    quadrant = random.Random(seed + 2)
    (folder / "quadrant_train.json").write_text(
        json.dumps(_quadrant_samples(quadrant, n_train, "quadrant_train", images), indent=1)
    )
    (folder / "quadrant_eval.json").write_text(
        json.dumps(_quadrant_samples(quadrant, n_eval, "quadrant_eval", images), indent=1)
    )
    return folder
