#!/usr/bin/env bash
# Domain adaptation from a folder of images + a CSV: convert -> check -> train -> eval -> merge -> chat.
set -euo pipefail
here="$(dirname "$0")"
out=runs/examples/domain_adaptation
steps="${STEPS:-500}"
python "$here/make_data.py" "$out/data"
python "$here/convert.py" "$out/data/qa.csv" --images "$out/data/images" --out "$out/data/train.json" --eval "$out/data/eval.json"
set -x
lora-llava check tiny-sp/qlora output_dir=$out/run data.train.0.path=$out/data/train.json \
  data.train.0.image_folder=$out/data/images data.eval.0.path=$out/data/eval.json data.eval.0.image_folder=$out/data/images
lora-llava train tiny-sp/qlora --overwrite output_dir=$out/run train.max_steps=$steps data.train.0.path=$out/data/train.json \
  data.train.0.image_folder=$out/data/images data.eval.0.path=$out/data/eval.json data.eval.0.image_folder=$out/data/images
lora-llava eval $out/run
rm -rf $out/merged
lora-llava merge $out/run $out/merged
echo "Where is the defect?" | lora-llava chat $out/merged --image $out/data/images/part_000.png --max-new-tokens 8
