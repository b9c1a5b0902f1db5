"""Write a toy inspection dataset: images/ and qa.csv (image,question,answer), two questions per image."""

import csv
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

out = Path(sys.argv[1])
(out / "images").mkdir(parents=True, exist_ok=True)
rng = random.Random(11)
QUADRANTS = ["top left", "top right", "bottom left", "bottom right"]
with open(out / "qa.csv", "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image", "question", "answer"])
    for i in range(240):
        q = i % 4
        img = Image.new("RGB", (64, 64), tuple(rng.randint(190, 240) for _ in range(3)))
        x = rng.randint(10, 22) + (32 if q in (1, 3) else 0)
        y = rng.randint(10, 22) + (32 if q in (2, 3) else 0)
        ImageDraw.Draw(img).ellipse([x - 9, y - 9, x + 9, y + 9], fill=(30, 30, 30))
        name = f"part_{i:03d}.png"
        img.save(out / "images" / name)
        w.writerow([name, "Where is the defect?", QUADRANTS[q].capitalize()])
        w.writerow([name, "Does the part pass inspection?", "No" if q in (0, 3) else "Yes"])
