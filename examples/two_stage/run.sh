#!/usr/bin/env bash
# Assemble a new LLaVA, align its projector (stage 1), instruction-tune it (stage 2), score it.
set -euo pipefail
out=runs/examples/two_stage
steps="${STEPS:-150}"
set -x
lora-llava train tiny-assembled/align --overwrite output_dir=$out/align train.max_steps=$steps
lora-llava quickstart tiny-assembled/instruct --overwrite backbone=$out/align output_dir=$out/instruct train.max_steps=$steps
