"""Train the bundled toy ternary block-diffusion model and export it as GGUF (I2_S).

    python scripts/train_toy_dlm.py --probe 20 --fit-seconds 420     # steps that fit 420 s here
    python scripts/train_toy_dlm.py --steps N --out dlmnumba/data/toy-dlm.gguf   # the shipped model
    python scripts/train_toy_dlm.py --out /tmp/t.gguf --steps 60 --batch 32 \\
        --n-embd 64 --n-layer 2 --n-head 4 --n-head-kv 2 --n-ff 256         # a smoke run
    bash scripts/device_train.sh 420                                 # the GPU run (see there)

Architecture exactly as dlmnumba runs it (arch `bitnet-b1.58`): tied embedding, per layer
RMSNorm -> BitLinear q,k,v -> NEOX RoPE -> attention (GQA) -> sub-norm -> BitLinear o, then
RMSNorm -> BitLinear gate, up -> relu(gate)^2 * up -> sub-norm -> BitLinear down; final RMSNorm
and the embedding as LM head.  BitLinear is quantization-aware: weights ternary with one absmean
scale per tensor, activations int8 absmax per token (round half to even), straight-through
gradients.  The forward multiplies the integer codes (int8 activations x {-1, 0, 1} weights,
held in float32) and scales the sums afterwards, as the engine does: those products and sums are
exact in float32 and in TF32 (inputs of at most 8 bits), so the GPU's TF32 matmuls change no
quantized value, and what trains is what the exported file computes.  No bf16: an integer sum
rounded to bf16 would lose three digits.

Training (Fast-dLLM v2, reference.md section 3), on dlmnumba.tasks' synthetic tasks in the seed's
chat form, held-out prompts (the table's sets and the fresh two-digit sets) excluded:
1. the first `--ar-frac` of `--steps` train autoregressively (causal attention, next-token loss
   on the answer);
2. the rest adapt to block diffusion: the input is [noisy ; clean], noisy positions attend
   bidirectionally inside their block and to the clean stream of earlier blocks, clean positions
   attend block-causally to the clean stream; answer positions of a block are masked with a
   per-block ratio t ~ U(0, 1), and every example also appears with the complementary mask;
   token shift: the token at position i is predicted from the noisy row i-1, or from the clean
   row i-1 when i starts a block (what the engine's first pass of a block computes).  The block
   size is drawn per step from --block-sizes (32, the recommended size, most often).  Every
   `--ar-every`-th step stays autoregressive, so `--mode ar` keeps working.
AdamW, linear warm-up then a cosine to 10% of the peak over the fixed step count.

Data (`--mix`): the held-out tasks' own distributions plus more of what small models get wrong:
two-digit sums and differences (`add2`, `sub2`, 10-99 as the fresh sets), ones forced to carry or
borrow (`add_carry`, `sub_borrow`), long copies (14-24 letters) and reversals (10-16), and lookup
at the highest weight, also in a multi-query form (`lookup_multi`: `Given o=903 q=949, find q o`
-> `q=949 o=903`, several recalls per sequence; `lookup_value` answers with the bare value, as
the bundled model's first two stages were trained).  Curriculum: a difficulty d rises linearly
from 0 to 1 over the first `--curriculum` of the steps; at d an operand is one-digit with
probability 1-d, strings are at most lo + d*(hi-lo) long, lookup has 2 + 3d pairs of values with
1 + 2d digits.

Reproducible from the seed: the batch of step s (its examples, block size and masks) is a pure
function of (seed, s), so worker processes may build batches ahead, and the step count is fixed
in advance (`--probe` times steps and prints how many fit a time budget; the run then takes that
`--steps`).  `--checkpoint` saves model, optimizer, step and every RNG state; `--resume`
continues bit-identically on the CPU (on CUDA up to the GPU's non-deterministic atomics).
`--time-budget` ends a run early (checkpoint and export) when its training time runs out.
`--init-from CHECKPOINT` starts a new stage from a checkpoint's weights (same shape, or more KV
heads: copies of its own, the same function; fresh optimizer, this run's own seed, step count,
schedule and mix): the shipped model is stage 1 stopped at a step, then stages that weight the
tasks it still got wrong (the command lines: scripts/toy_recipe.sh).  A stage resumes like any run.
After training the model is scored in torch on the held-out and fresh sets with the engine's
decoding policies re-implemented in `toytrain.decode`, and the best diffusion settings go into
the file as its recommended decode settings (`diffusion.decode_mode`, `.block_size`,
`.small_block_size`, `.threshold`).

Shape (default): 512 wide, 6 layers, 8 heads of 64 (4 KV heads), FFN 1024: 14 M parameters,
4.2 MB as I2_S; every K is a multiple of 256 (the engine's fast kernel paths).  Ternary models
need width more than depth; six layers leave room for the carry chains and the lookup's
match-then-copy.  On a GPU a model this small is bound by kernel launches and Python overhead
more than arithmetic, so batches are large (384 sequences) and torch.compile / CUDA graphs are
not used (compile time and shape churn on a 7-minute budget).

torch is a development dependency only; the engine never imports it.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time
from pathlib import Path

from .checkpoint import MODEL_ARGS, load_checkpoint
from .data import DEFAULT_MIX
from .decode import CANDIDATES, choose_decode, eval_sets, format_eval, torch_eval
from .export import export_gguf
from .model import TOY_SHAPE, ToyDLM
from .train import new_model, pick_device, probe, run_info, train

__all__ = ["ROOT", "reproduce_command", "final_eval", "parse_args", "main"]

ROOT = Path(__file__).resolve().parents[2]  # the repository


def reproduce_command(args) -> str:
    """The command line that trains this model again (device and logging aside)."""
    parts = ["python", "scripts/train_toy_dlm.py"]
    for k in MODEL_ARGS:
        if getattr(args, k) is not None:
            parts += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return shlex.join(parts)


def final_eval(model: ToyDLM, args) -> dict:
    """Torch-side scores of ar and the candidate settings; the recommended settings."""
    model.eval()
    exs = eval_sets(args.eval_n)
    t0 = time.time()
    results = [torch_eval(model, exs, {"decode_mode": "ar"})]
    results += [torch_eval(model, exs, c) for c in CANDIDATES]
    chosen = choose_decode(results[1:])
    print(f"torch-side accuracy (%), first {args.eval_n} held-out examples per task and fresh "
          f"two-digit sets (add2/sub2), max_tokens 48, {time.time() - t0:.1f} s:", flush=True)
    for r in results:
        print("  " + format_eval(r), flush=True)
    print(f"recommended decode settings: {json.dumps(chosen)}", flush=True)
    return {"results": results, "recommended": chosen}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (tests build their runs with it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dlmnumba" / "data" / "toy-dlm.gguf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000, help="total optimizer steps")
    ap.add_argument("--ar-frac", type=float, default=0.3,
                    help="fraction of the steps trained autoregressively before the diffusion "
                         "adaptation")
    ap.add_argument("--ar-every", type=int, default=4,
                    help="every Nth adaptation step is AR (0: none)")
    ap.add_argument("--batch", type=int, default=384,
                    help="sequences per AR step (diffusion steps take half, each twice)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--block-sizes", default="8,16,32,32,32,64")
    ap.add_argument("--mix", default=DEFAULT_MIX, help="training mix, entry=weight,...")
    ap.add_argument("--curriculum", type=float, default=0.15,
                    help="fraction of the steps over which the difficulty rises to 1")
    ap.add_argument("--recall-weight", type=float, default=0.0,
                    help="weight of the lookup recall attention loss (0: off; see ar_loss)")
    ap.add_argument("--recall-head", default="2,0", metavar="LAYER,HEAD",
                    help="the head --recall-weight teaches the copy step of a lookup")
    ap.add_argument("--key-head", default="", metavar="LAYER,HEAD",
                    help="the head --recall-weight teaches the key step (each digit of a value, "
                    "and each answer position that copies one, attends to its key)")
    ap.add_argument("--n-embd", type=int, default=TOY_SHAPE.n_embd)
    ap.add_argument("--n-layer", type=int, default=TOY_SHAPE.n_layer)
    ap.add_argument("--n-head", type=int, default=TOY_SHAPE.n_head)
    ap.add_argument("--n-head-kv", type=int, default=TOY_SHAPE.n_head_kv)
    ap.add_argument("--n-ff", type=int, default=TOY_SHAPE.n_ff)
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workers", type=int, default=-1,
                    help="processes building batches ahead (-1: 6 on CUDA, 0 on the CPU)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--checkpoint", type=Path, help="checkpoint file (written at the end too)")
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--resume", type=Path, help="continue from this checkpoint")
    ap.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                    help="start from this checkpoint's weights (a new stage: this run's own "
                         "seed, schedule, mix; fresh optimizer)")
    ap.add_argument("--stop-at", type=int, default=0, help="end the run at this step")
    ap.add_argument("--time-budget", type=float, default=0.0,
                    help="seconds of training after which the run stops early, checkpoints "
                         "and exports")
    ap.add_argument("--export-every", type=int, default=0, help="export --out every N steps")
    ap.add_argument("--eval-n", type=int, default=200,
                    help="held-out examples per task in the final torch-side eval (0: none)")
    ap.add_argument("--eval-json", type=Path, help="write the final eval here")
    ap.add_argument("--probe", type=int, default=0, metavar="K",
                    help="only time K AR and K diffusion steps (full difficulty)")
    ap.add_argument("--fit-seconds", type=float, default=0.0,
                    help="with --probe: print FIT_STEPS, the steps that fit this many seconds")
    ap.add_argument("--fit-margin", type=float, default=0.93)
    ap.add_argument("--export-only", type=Path, metavar="CHECKPOINT",
                    help="skip training: export (and evaluate) a checkpoint")
    args = ap.parse_args(argv)
    if args.workers < 0:
        args.workers = 6 if pick_device(args.device).type == "cuda" else 0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        probe(args)
        return 0
    if args.export_only:
        ck = load_checkpoint(args.export_only, args)
        model = new_model(args, pick_device(args.device))
        model.load_state_dict(ck["model"])
        reached = ck["step"]
    else:
        model, reached = train(args)
    print(f"reproduce: {reproduce_command(args)}", flush=True)
    decode = None
    if args.eval_n:
        ev = final_eval(model, args)
        decode = ev["recommended"]
        if args.eval_json:
            args.eval_json.write_text(json.dumps({**ev, "step": reached,
                                                  "command": reproduce_command(args)}, indent=1))
    info = run_info(args, reached)
    print(f"wrote {export_gguf(model, args.out, info, decode)}", flush=True)
    return 0
