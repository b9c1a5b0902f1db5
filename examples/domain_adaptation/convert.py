"""CSV (image,question,answer) -> LLaVA-Instruct JSON; rows of one image become one conversation.

Usage: python convert.py qa.csv --images images/ --out train.json [--eval eval.json --eval-share 0.2]
"""

import argparse
import csv
import json
import random
from collections import OrderedDict
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("csv")
ap.add_argument("--images", required=True)
ap.add_argument("--out", required=True)
ap.add_argument("--eval", default=None, help="also write held-out images' first question here")
ap.add_argument("--eval-share", type=float, default=0.2)
args = ap.parse_args()

by_image: "OrderedDict[str, list]" = OrderedDict()
with open(args.csv, newline="") as f:
    for row in csv.DictReader(f):
        by_image.setdefault(row["image"], []).append((row["question"].strip(), row["answer"].strip()))
images = list(by_image)
random.Random(0).shuffle(images)
n_eval = int(len(images) * args.eval_share) if args.eval else 0
held, train = images[:n_eval], images[n_eval:]


def record(image, qa):
    turns = []
    for k, (q, a) in enumerate(qa):
        turns += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
    return {"id": Path(image).stem, "image": image, "conversations": turns}


Path(args.out).write_text(json.dumps([record(i, by_image[i]) for i in train], indent=1))
if args.eval:
    Path(args.eval).write_text(json.dumps([record(i, by_image[i][:1]) for i in held], indent=1))
print(
    f"{len(train)} training conversations -> {args.out}"
    + (f"; {len(held)} held out -> {args.eval}" if args.eval else "")
)
