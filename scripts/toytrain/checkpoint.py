"""Checkpoints: model, optimizer, step and every RNG state (a resumed run continues bit for bit
on the CPU), and the weights that start a new stage (--init-from), KV heads grown by copies."""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
import torch

__all__ = ["CHECKPOINT_VERSION", "SHAPE_ARGS", "MODEL_ARGS", "rng_states", "set_rng_states",
           "save_checkpoint", "load_checkpoint", "init_weights", "grow_kv_heads"]

CHECKPOINT_VERSION = 1

# Arguments that define the trained model (a checkpoint must agree on them to be resumed).
SHAPE_ARGS = ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff")
MODEL_ARGS = ("seed", "steps", "ar_frac", "ar_every", "batch", "lr", "warmup", "block_sizes",
              "mix", "curriculum", *SHAPE_ARGS, "init_from", "recall_weight", "recall_head",
              "key_head")


def rng_states(device: torch.device) -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_states(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: Path, model, opt, step: int, args, device, elapsed: float) -> None:
    """Atomically: model, optimizer, next step (= data position), RNG states, arguments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ck = {"version": CHECKPOINT_VERSION, "step": step, "data_position": step,
          "model": model.state_dict(), "opt": opt.state_dict(), "rng": rng_states(device),
          "args": {k: getattr(args, k) for k in MODEL_ARGS}, "elapsed": elapsed}
    tmp = path.with_name(path.name + ".part")
    torch.save(ck, tmp)
    tmp.replace(path)


def _read_checkpoint(path: Path, args, keys, mismatch: str, ck: dict | None = None) -> dict:
    """Checkpoint `path` (version checked; ck: already loaded from it); SystemExit `mismatch`
    when it disagrees with args on one of `keys` (None: every argument it records)."""
    if ck is None:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("version") != CHECKPOINT_VERSION:
        raise SystemExit(f"{path}: checkpoint version {ck.get('version')}, "
                         f"expected {CHECKPOINT_VERSION}")
    diff = [f"{k}={ck['args'].get(k)!r} (now {getattr(args, k)!r})"
            for k in (ck["args"] if keys is None else keys)
            if ck["args"].get(k) != getattr(args, k)]
    if diff:
        raise SystemExit(f"{mismatch}: " + ", ".join(diff))
    return ck


def load_checkpoint(path: Path, args) -> dict:
    """The checkpoint to resume: trained with exactly this run's arguments."""
    return _read_checkpoint(path, args, None,
                            f"{path}: the checkpoint was trained with other arguments")


def init_weights(path: Path, args) -> dict:
    """The model weights that start a new stage (--init-from): the checkpoint's shape must be
    this run's, except that --n-head-kv may be a multiple of the checkpoint's (its key and value
    heads are then copied, see grow_kv_heads); its optimizer, step and RNG states are not used."""
    ck = torch.load(path, map_location="cpu", weights_only=False)
    old_kv, new_kv = ck.get("args", {}).get("n_head_kv"), args.n_head_kv
    grow = (isinstance(old_kv, int) and new_kv != old_kv and new_kv % old_kv == 0
            and args.n_head % new_kv == 0)
    same = argparse.Namespace(**{**vars(args), "n_head_kv": old_kv}) if grow else args
    ck = _read_checkpoint(path, same, SHAPE_ARGS,
                          f"--init-from {path}: the checkpoint's model has another shape", ck)
    if grow:
        ck["model"] = grow_kv_heads(ck["model"], args.n_embd // args.n_head, old_kv, new_kv)
    return ck


def grow_kv_heads(state: dict, head_dim: int, old_kv: int, new_kv: int) -> dict:
    """The same model with new_kv key/value heads instead of old_kv (a multiple): query head h
    read KV head h // (n_head/old_kv); each of those is copied new_kv/old_kv times, in order, so
    it still does.  A copied tensor keeps its ternary codes and its absmean scale (up to the last
    bit of the float sum): the grown model computes what the old one did, and the copies are free
    to part in training."""
    out = dict(state)
    for name, w in state.items():
        if name.endswith((".k.weight", ".v.weight")):
            out[name] = (w.view(old_kv, head_dim, -1).repeat_interleave(new_kv // old_kv, 0)
                         .reshape(new_kv * head_dim, -1).clone())
    return out
