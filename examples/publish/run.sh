#!/usr/bin/env bash
# Train briefly, merge (verified), and list what push would upload (nothing is uploaded).
set -euo pipefail
out=runs/examples/publish
set -x
lora-llava train quickstart --overwrite output_dir=$out/run train.max_steps="${STEPS:-150}"
rm -rf $out/run/merged
lora-llava merge $out/run $out/run/merged
lora-llava push $out/run me/my-llava-adapter --dry-run
lora-llava push $out/run me/my-llava --merged --dry-run
