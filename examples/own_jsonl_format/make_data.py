"""Write support.jsonl in a team's own format, and the product photos it names."""

import json
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
(out / "photos").mkdir(parents=True, exist_ok=True)
rng = random.Random(5)
COLORS = {"red": (210, 40, 40), "blue": (40, 70, 210), "green": (40, 160, 60)}
for split, n in (("train", 240), ("eval", 48)):
    with open(out / f"support_{split}.jsonl", "w") as f:
        for i in range(n):
            color = list(COLORS)[i % 3]
            img = Image.new("RGB", (64, 64), (235, 235, 235))
            ImageDraw.Draw(img).rectangle(
                [rng.randint(4, 20), rng.randint(4, 20), rng.randint(40, 60), rng.randint(40, 60)], fill=COLORS[color]
            )
            name = f"{split}_{i:03d}.jpg"
            img.save(out / "photos" / name, quality=92)
            record = {
                "ticket": f"T-{split}-{i}",
                "photo": name,
                "dialog": [
                    {"speaker": "customer", "text": "Which color did I receive? <image>"},
                    {"speaker": "agent", "text": color.capitalize()},
                ],
            }
            f.write(json.dumps(record) + "\n")
