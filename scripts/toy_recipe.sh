#!/usr/bin/env bash
# The recipe of the bundled toy model (dlmnumba/data/toy-dlm.gguf), on the CPU, from the seeds:
#
#     bash scripts/toy_recipe.sh [WORK_DIR]        # default /tmp/toy-recipe; resumable
#
# Stage 1: the 12,000-step schedule of seed 0 (3,600 autoregressive steps, then the Fast-dLLM v2
#          adaptation with an AR step every fourth, curriculum over the first 1,800 steps),
#          stopped at step 5,200 (~2.5 hours on 2 cores).
# Stage 2: from stage 1's weights, seed 1, 4,000 steps (2,000 AR, then every third step AR),
#          full difficulty, lookup and sort weighted up (~1.5 hours on 2 cores); the final
#          torch-side eval picks the recommended decode settings written into the file.
# Each stage checkpoints every 50 steps and continues where it stopped when run again; on the
# CPU a resumed run equals an uninterrupted one bit for bit (tests/test_trainer.py).
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-/tmp/toy-recipe}
mkdir -p "$WORK"
SHAPE="--batch 64 --n-embd 256 --n-layer 4 --n-head 4 --n-head-kv 2 --n-ff 768"
RUN="--device cpu --threads ${THREADS:-2} --workers 0 --checkpoint-every 50"

resume() { [ -f "$1" ] && echo "--resume $1" || true; }

if [ ! -f "$WORK/stage1-5200.pt" ]; then
  python3 scripts/train_toy_dlm.py --seed 0 --steps 12000 $SHAPE $RUN --stop-at 5200 \
    --checkpoint "$WORK/stage1.pt" $(resume "$WORK/stage1.pt") --eval-n 0 \
    --out "$WORK/stage1.gguf"
  cp "$WORK/stage1.pt" "$WORK/stage1-5200.pt"
fi

MIX="add=1,add2=2,add_carry=1,sub=1,sub2=2,sub_borrow=1,copy=1.5,copy_long=1,reverse=1.5"
MIX="$MIX,reverse_long=1,sort=3,lookup=10"
python3 scripts/train_toy_dlm.py --init-from "$WORK/stage1-5200.pt" --seed 1 --steps 4000 \
  --ar-frac 0.5 --ar-every 3 --lr 1e-3 --warmup 50 --curriculum 0 --mix "$MIX" $SHAPE $RUN \
  --checkpoint "$WORK/stage2.pt" $(resume "$WORK/stage2.pt") --eval-n 100 \
  --eval-json "$WORK/eval.json" --out "$WORK/toy-dlm.gguf"
echo "done: $WORK/toy-dlm.gguf (compare: python -m dlmnumba eval --model $WORK/toy-dlm.gguf)"
