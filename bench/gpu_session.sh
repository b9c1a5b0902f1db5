#!/usr/bin/env bash
# One device session: the offline quickstart on CUDA (the whole pipeline through the CLI), the GPU check
# (bench/gpu_check.py), train + plan + merge at 7B scale through the CLI (bench/gpu_train.py), and on a machine
# with two GPUs or more the DDP check (two processes against one with twice the batch, NCCL).
# Usage (repo root, wheels of the lock's versions in .whl/ as bench/README.md says):
#   bash bench/gpu_session.sh OUT                       # all of them
#   STEPS="check train" bash bench/gpu_session.sh OUT   # some of them
set -u
OUT=${1:?output folder}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
log() { echo "== $(date -u +%H:%M:%S) $*"; }
log machine; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/machine.txt"
log install
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -3
  export PYTHONPATH=/tmp/site:$PWD
  if ! python3 -c "import transformers, peft, accelerate, bitsandbytes, lora_llava.training" 2>"$OUT/import_error.txt"; then
    log "the lock's versions do not import here; bitsandbytes alone over the image's libraries"; tail -3 "$OUT/import_error.txt"
    rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/bitsandbytes-*.whl
  fi
else
  export PYTHONPATH=$PWD
fi
python3 -c "import transformers, peft, accelerate, bitsandbytes as b; print('transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__, 'bitsandbytes', b.__version__)" | tee -a "$OUT/machine.txt"
STEPS=${STEPS:-quickstart check train ddp}
if [[ " $STEPS " == *" quickstart "* ]]; then
log quickstart
( time timeout "${QUICKSTART_S:-200}" python3 -m lora_llava quickstart output_dir=/tmp/qs ) > "$OUT/quickstart.log" 2>&1
echo "quickstart rc $?" | tee -a "$OUT/quickstart.log"; tail -40 "$OUT/quickstart.log"
cp /tmp/qs/metrics.jsonl "$OUT/qs_metrics.jsonl" 2>/dev/null
fi
if [[ " $STEPS " == *" check "* ]]; then
log gpu_check
timeout "${CHECK_S:-330}" python3 bench/gpu_check.py --out "$OUT" --cases ${CASES:-qlora-b1 qlora-b4 lora16-b4} 2>&1 | tee /tmp/gpu_check.log | tail -60
fi
if [[ " $STEPS " == *" train "* ]]; then
log gpu_train
timeout "${TRAIN_S:-400}" python3 bench/gpu_train.py --out "$OUT" 2>&1 | tee /tmp/gpu_train.log | grep -v "it/s\]" | tail -80
fi
if [[ " $STEPS " == *" ddp "* ]]; then
GPUS=$(nvidia-smi -L | wc -l)
if [ "$GPUS" -ge 2 ]; then
log "ddp on 2 of $GPUS GPUs"
# the same 240 samples, 4 per optimizer step either way: per-step losses and the adapters should agree
COMMON="quickstart quantization.compute_dtype=bfloat16 train.max_steps=60 train.logging_steps=1 train.eval_steps=null data.eval=[]"
( time timeout "${DDP_S:-300}" python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m lora_llava train \
    $COMMON train.batch_size=2 output_dir=/tmp/ddp2 ) > "$OUT/ddp2.log" 2>&1; echo "ddp2 rc $?" | tee -a "$OUT/ddp2.log"
( time timeout "${DDP_S:-300}" python3 -m lora_llava train $COMMON train.batch_size=4 output_dir=/tmp/ddp1 ) \
    > "$OUT/ddp1.log" 2>&1; echo "ddp1 rc $?" | tee -a "$OUT/ddp1.log"
python3 - <<'PY' | tee "$OUT/ddp_compare.txt"
import json, torch
from safetensors.torch import load_file
rows = lambda p: [json.loads(x) for x in open(p + "/metrics.jsonl") if '"learning_rate"' in x]
a, b = rows("/tmp/ddp2"), rows("/tmp/ddp1")
print("steps", len(a), len(b), "max |loss diff|", max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)))
for f in ("adapter_model.safetensors", "projector.safetensors"):
    ta, tb = load_file(f"/tmp/ddp2/adapter/{f}"), load_file(f"/tmp/ddp1/adapter/{f}")
    print(f, "max |diff|", max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta))
print("world_size", json.load(open("/tmp/ddp2/run.json"))["world_size"])
PY
else
log "ddp: skipped, $GPUS GPU(s) here"
fi
fi
[ -s "$OUT/import_error.txt" ] || rm -f "$OUT/import_error.txt"
log done
