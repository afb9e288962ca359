"""The training loop: the learning-rate schedule, the device, the run's data configuration, the
optimizer steps, a run (fresh, resumed or a new stage), what the exported file records of it
(run_info) and the step-time probe."""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dlmnumba.synth.models import Preset

from .checkpoint import init_weights, load_checkpoint, save_checkpoint, set_rng_states
from .data import Batches, DataConfig, Encoder, make_batch_example, parse_mix
from .decode import eval_sets
from .export import export_gguf
from .losses import Masks, batch_loss
from .model import Shape, ToyDLM

__all__ = ["lr_at", "pick_device", "shape_of", "data_config", "make_optimizer", "train_steps",
           "new_model", "train", "probe", "run_info"]


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        # exact for the integer products (toytrain.cli's docstring); attention and head in TF32
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def shape_of(args) -> Preset:
    return Shape(n_embd=args.n_embd, n_layer=args.n_layer, n_head=args.n_head,
                 n_head_kv=args.n_head_kv, n_ff=args.n_ff)


def data_config(args) -> DataConfig:
    entries, weights = parse_mix(args.mix)
    return DataConfig(seed=args.seed, steps=args.steps, ar_steps=round(args.ar_frac * args.steps),
                      ar_every=args.ar_every, batch=args.batch,
                      block_sizes=tuple(int(b) for b in args.block_sizes.split(",")),
                      entries=entries, weights=weights,
                      curriculum_steps=round(args.curriculum * args.steps),
                      recall_weight=args.recall_weight,
                      recall_head=_layer_head(args.recall_head),
                      key_head=_layer_head(args.key_head) if args.key_head else None)


def _layer_head(text: str) -> tuple[int, int]:
    layer, head = (int(x) for x in text.split(","))
    return layer, head


def run_info(args, reached: int) -> dict:
    """The run, as the exported file's description records it."""
    keys = ("seed", "steps", "ar_frac", "ar_every", "batch", "lr", "warmup", "block_sizes",
            "curriculum", "n_embd", "n_layer", "n_ff")
    info = {k: getattr(args, k) for k in keys}
    info["mix"] = args.mix.replace(",", " ")
    if args.init_from:
        info["init_from"] = Path(args.init_from).name
    if reached < args.steps:
        info["stopped_at"] = reached
    return info


def make_optimizer(model: ToyDLM, args, device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                             weight_decay=0.01, fused=device.type == "cuda")


def train_steps(model, opt, batches, steps, args, device, cfg: DataConfig, on_step=None):
    """Run the optimizer over (step, batch) pairs; on_step(step, loss) may stop the run by
    returning True."""
    masks = Masks(device)
    mask_id = Encoder().mask
    for step, batch in zip(steps, batches):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg.steps, args.lr, args.warmup)
        loss = batch_loss(model, batch, device, mask_id, masks, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if on_step is not None and on_step(step, batch.kind, loss.detach()):
            return step + 1
    return None


def new_model(args, device) -> ToyDLM:
    torch.manual_seed(args.seed)  # weights drawn on the CPU: the same start on every device
    return ToyDLM(shape_of(args)).to(device)


def train(args) -> tuple[ToyDLM, int]:
    """Train (or continue) per args; returns the model and the step reached."""
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = data_config(args)
    Encoder().check(eval_sets(3) + [make_batch_example(cfg, i) for i in range(50)])
    workers = args.workers
    start = 0
    ck = load_checkpoint(args.resume, args) if args.resume else None
    if ck is not None:
        start = ck["step"]
    stop = min(cfg.steps, args.stop_at or cfg.steps)
    batches = Batches(cfg, [(s,) for s in range(start, stop)], workers)  # before CUDA (fork)
    device = pick_device(args.device)
    model = new_model(args, device)
    opt = make_optimizer(model, args, device)
    elapsed0 = 0.0
    if ck is not None:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        set_rng_states(ck["rng"])
        elapsed0 = ck.get("elapsed", 0.0)
        print(f"resumed {args.resume} at step {start}", flush=True)
    elif args.init_from:
        init = init_weights(args.init_from, args)
        model.load_state_dict(init["model"])
        print(f"initialized from {args.init_from} (its step {init['step']})", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {asdict(model.s)}: {n_params / 1e6:.2f} M parameters, device {device}, "
          f"steps {start}..{stop} of {cfg.steps} ({cfg.ar_steps} autoregressive first, then "
          f"every {cfg.ar_every}th), curriculum {cfg.curriculum_steps} steps", flush=True)
    t0 = time.time()
    sums: dict[str, list] = {}
    state = {"reached": start}

    def on_step(step, kind, loss):
        acc = sums.setdefault(kind, [torch.zeros((), device=device), 0])
        acc[0] += loss
        acc[1] += 1
        state["reached"] = step + 1
        done = step + 1
        now = time.time() - t0
        if step % args.log_every == 0 or done == stop:
            rate = (done - start) / max(now, 1e-9)
            print(f"step {done:6d}/{cfg.steps} {now:6.0f}s {rate:6.2f} steps/s "
                  f"lr {lr_at(step, cfg.steps, args.lr, args.warmup):.2e} d "
                  f"{cfg.difficulty(step):.2f} " + " ".join(
                      f"{k} {float(v[0]) / v[1]:.4f}" for k, v in sorted(sums.items())),
                  flush=True)
            sums.clear()
        if args.checkpoint and args.checkpoint_every and done % args.checkpoint_every == 0:
            save_checkpoint(args.checkpoint, model, opt, done, args, device, elapsed0 + now)
        if args.export_every and done % args.export_every == 0 and done < stop:
            export_gguf(model, args.out, run_info(args, done))
            print(f"exported {args.out} at step {done}", flush=True)
        if args.time_budget and elapsed0 + now > args.time_budget and done < stop:
            print(f"time budget {args.time_budget} s spent at step {done} of {cfg.steps}: "
                  "stopping early (the file is NOT the full run)", flush=True)
            return True
        return False

    try:
        train_steps(model, opt, batches, range(start, stop), args, device, cfg, on_step)
    finally:
        batches.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    reached = state["reached"]
    if args.checkpoint:
        save_checkpoint(args.checkpoint, model, opt, reached, args, device,
                        elapsed0 + time.time() - t0)
        print(f"checkpoint {args.checkpoint} at step {reached}", flush=True)
    return model, reached


def probe(args) -> float:
    """Seconds per step at full difficulty, AR and diffusion steps mixed as the run mixes them;
    prints them and, with --fit-seconds, how many steps fit."""
    torch.set_num_threads(args.threads)
    cfg = data_config(args)
    k, warm = args.probe, 3
    frac_ar = args.ar_frac + (1 - args.ar_frac) / max(1, args.ar_every) if args.ar_every \
        else args.ar_frac
    jobs = [(i, "ar", 1.0) for i in range(warm + k)] + [(i, "dlm", 1.0) for i in range(warm + k)]
    batches = Batches(cfg, jobs, args.workers)
    device = pick_device(args.device)
    model = new_model(args, device)
    opt = make_optimizer(model, args, device)
    marks: list[float] = []

    def on_step(step, kind, loss):
        if device.type == "cuda":
            torch.cuda.synchronize()
        marks.append(time.time())
        return False

    try:
        t_start = time.time()
        train_steps(model, opt, batches, range(len(jobs)), args, device, cfg, on_step)
    finally:
        batches.close()
    n = warm + k
    t_ar = (marks[n - 1] - marks[warm - 1]) / k
    t_dlm = (marks[2 * n - 1] - marks[n + warm - 1]) / k
    per_step = frac_ar * t_ar + (1 - frac_ar) * t_dlm
    print(f"probe: {t_ar * 1e3:.1f} ms per AR step, {t_dlm * 1e3:.1f} ms per diffusion step "
          f"({1 / per_step:.2f} steps/s at {frac_ar:.2f} AR), device {device}, "
          f"probe wall {time.time() - t_start:.1f} s", flush=True)
    if args.fit_seconds:
        steps = max(1, int(args.fit_seconds / per_step * args.fit_margin))
        print(f"FIT_STEPS {steps}", flush=True)
    return per_step
