#!/usr/bin/env bash
# The GPU training run of the bundled toy model, in one command from the repository root:
#
#     OUT=/some/folder bash scripts/device_train.sh [TRAIN_SECONDS] [trainer flags...]
#
# TRAIN_SECONDS (default 420) is the training time to fill.  Needs python3 with torch, numpy,
# numba, tokenizers, click, pyyaml, tqdm; the `gguf` wheel comes from .whl/ (carried with the
# working tree), nothing from the network.  Steps:
#   1. install .whl/*.whl into /tmp/site (when present);
#   2. probe: time PROBE_STEPS AR and diffusion steps of the real shape and batch and print
#      FIT_STEPS, the step count that fits TRAIN_SECONDS (a fixed count keeps the run
#      reproducible from its seed; the trainer prints the command that repeats it);
#   3. train that many steps (cuda when available), checkpoints to $CKPT (model + optimizer are
#      too large to come back: they stay on the machine), the GGUF exported every EXPORT_EVERY
#      steps and at the end, a hard stop (checkpoint + export) at 1.15 x TRAIN_SECONDS;
#   4. torch-side eval on the held-out and fresh two-digit sets, recommended decode settings
#      into the file.
# Outputs in $OUT: toy-dlm.gguf, train_log.txt (everything printed), eval.json.
# ENGINE_CHECK=1 also runs `dlmnumba generate` on the file (numba compiles for ~1 minute).
set -euo pipefail
BUDGET=${1:-420}
shift || true
OUT=${OUT:-/tmp/toy16-out}
CKPT=${CKPT:-/tmp/toy16-ckpt/ckpt.pt}
PROBE_STEPS=${PROBE_STEPS:-20}
EXPORT_EVERY=${EXPORT_EVERY:-1500}
mkdir -p "$OUT" "$(dirname "$CKPT")"
export PYTHONUNBUFFERED=1
LOG="$OUT/train_log.txt"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

say() { echo "$@" | tee -a "$LOG"; }
say "== $(date -u +%FT%TZ) scripts/device_train.sh $BUDGET $* (git $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
(nvidia-smi -L 2>&1 || true) | tee -a "$LOG"
python3 -c 'import torch, numpy, numba, gguf; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "numpy", numpy.__version__, "numba", numba.__version__)' 2>&1 | tee -a "$LOG"

T0=$(date +%s)
python3 scripts/train_toy_dlm.py --probe "$PROBE_STEPS" --fit-seconds "$BUDGET" "$@" 2>&1 | tee -a "$LOG"
STEPS=$(awk '/^FIT_STEPS/ {n = $2} END {print n}' "$LOG")
if [ -z "$STEPS" ]; then say "probe printed no FIT_STEPS"; exit 1; fi
say "== probe took $(( $(date +%s) - T0 )) s; training $STEPS steps"

HARD=$(( BUDGET * 115 / 100 ))
python3 scripts/train_toy_dlm.py --steps "$STEPS" --out "$OUT/toy-dlm.gguf" \
  --checkpoint "$CKPT" --checkpoint-every 1000 --export-every "$EXPORT_EVERY" \
  --time-budget "$HARD" --eval-json "$OUT/eval.json" "$@" 2>&1 | tee -a "$LOG"
say "== done in $(( $(date +%s) - T0 )) s: $(ls -l "$OUT/toy-dlm.gguf" | awk '{print $5}') bytes"

if [ "${ENGINE_CHECK:-0}" = 1 ]; then
  for q in "What is 48+27?" "What is 12+35?" "Given a=12 b=345 c=7, find b"; do
    timeout 180 python3 -m dlmnumba generate "$q" --model "$OUT/toy-dlm.gguf" --mode ar \
      --max-tokens 16 2>&1 | tee -a "$LOG" || true
  done
fi
