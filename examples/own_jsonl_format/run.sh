#!/usr/bin/env bash
# A customer's own JSONL format, mapped with columns/roles only: check -> train -> eval.
set -euo pipefail
here="$(dirname "$0")"
python "$here/make_data.py" runs/examples/own_jsonl_format/data
set -x
lora-llava check "$here/recipe.yaml"
lora-llava train "$here/recipe.yaml" --overwrite train.max_steps="${STEPS:-200}"
lora-llava eval runs/examples/own_jsonl_format/run
