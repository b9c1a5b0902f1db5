#!/usr/bin/env bash
# One device session: the offline quickstart on CUDA (the whole pipeline through the CLI), the GPU check
# (bench/gpu_check.py), then train + plan + merge at 7B scale through the CLI (bench/gpu_train.py).
# Usage (repo root, wheels of the lock's versions in .whl/ as bench/README.md says):
#   bash bench/gpu_session.sh OUT                       # all three
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
STEPS=${STEPS:-quickstart check train}
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
[ -s "$OUT/import_error.txt" ] || rm -f "$OUT/import_error.txt"
log done
