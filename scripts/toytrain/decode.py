"""Torch-side decoding and evaluation: the engine's decoding modes (ar, greedy, iterative) on a
batch, the held-out scores, and the choice of the recommended decode settings.

Not the library's decoder: dlmnumba's Requests decode one sequence per KV cache with numba on
the CPU from a GGUF file; training evaluates hundreds of sequences at once on the torch model
(on the GPU) by recomputing whole sequences each pass, which the engine's cached passes equal
(tests/test_trainer.py checks they decode the same).
"""
from __future__ import annotations

import torch

from dlmnumba import tasks as T

from .data import Encoder
from .model import ToyDLM, block_mask

__all__ = ["torch_decode", "eval_sets", "torch_eval", "CANDIDATES", "choose_decode",
           "format_eval"]


@torch.no_grad()
def torch_decode(model: ToyDLM, prompts: list[list[int]], mode: str, block: int = 32,
                 small: int = 8, threshold: float = 0.9, max_tokens: int = 48,
                 max_iterations: int = 10, enc: Encoder | None = None,
                 chunk: int = 512) -> tuple[list[list[int]], list[int]]:
    """(generated ids through the first stop token, forward passes) per prompt, as the engine
    decodes them in `mode` (ar, greedy or iterative; greedy sampling): every pass recomputes the
    whole sequence with the mode's attention, which equals the engine's cached passes."""
    outs, passes = [], []
    for i in range(0, len(prompts), chunk):
        o, p = _decode_chunk(model, prompts[i:i + chunk], mode, block, small, threshold,
                             max_tokens, max_iterations, enc or Encoder())
        outs += o
        passes += p
    return outs, passes


def _decode_chunk(model, prompts, mode, block, small, threshold, max_tokens, max_iterations,
                  enc):
    dev = next(model.parameters()).device
    n = len(prompts)
    plen = torch.tensor([len(p) for p in prompts], device=dev)
    limit = plen + max_tokens
    unit = 1 if mode == "ar" else block
    t = int(-(-int(limit.max()) // unit) * unit)
    pos = torch.arange(t, device=dev)
    canvas = torch.full((n, t), enc.mask, dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        canvas[i, :len(p)] = torch.tensor(p)
    decided = pos[None] < plen[:, None]
    valid = pos[None] < limit[:, None]
    allow = block_mask(pos, None if mode == "ar" else block)[None]
    stop = torch.zeros(model.s.n_vocab, dtype=torch.bool, device=dev)
    stop[[enc.eot, enc.eos]] = True
    done = torch.zeros(n, dtype=torch.bool, device=dev)
    n_pass = torch.zeros(n, dtype=torch.long, device=dev)
    blk_pass = torch.zeros(n, dtype=torch.long, device=dev)
    cur_blk = torch.full((n,), -1, dtype=torch.long, device=dev)
    best_tok = torch.zeros(n, t, dtype=torch.long, device=dev)
    best_conf = torch.full((n, t), -1.0, device=dev)
    big = torch.tensor(t + 1, device=dev)
    while not bool(done.all()):
        act = (~done).nonzero()[:, 0]
        c = canvas[act]
        logits = model.logits(model.hidden(c, pos.expand(len(act), t), allow)).float()
        logits[..., enc.mask] = -float("inf")
        prob = logits.softmax(-1)
        conf, tok = prob.max(-1)  # row i predicts position i + 1
        conf = torch.cat([torch.full_like(conf[:, :1], -1.0), conf[:, :-1]], 1)
        tok = torch.cat([tok[:, :1], tok[:, :-1]], 1)
        undec = ~decided[act] & valid[act]
        first = torch.where(undec, pos[None], big).min(1).values  # first undecided position
        n_pass[act] += 1
        if mode == "ar":
            commit = pos[None] == first[:, None]
        else:
            start = first // block * block
            inblk = undec & (pos[None] >= start[:, None]) & (pos[None] < start[:, None] + block)
            new_blk = start != cur_blk[act]
            blk_pass[act] = torch.where(new_blk, 1, blk_pass[act] + 1)
            cur_blk[act] = start
            better = inblk & (conf > best_conf[act])
            best_tok[act] = torch.where(better, tok, best_tok[act])
            best_conf[act] = torch.where(better, conf, best_conf[act])
            if mode == "greedy":
                commit = inblk
            else:
                sub = (pos[None] - start[:, None]) // small
                cur_sub = torch.where(inblk, sub, big).min(1).values
                cur = inblk & (sub == cur_sub[:, None])
                commit = cur & (conf > threshold)
                top = torch.where(cur, conf, -2.0).argmax(1)
                none = ~commit.any(1) & cur.any(1)
                commit[none, top[none]] = True
        canvas[act] = torch.where(commit, tok, c)
        dec = decided[act] | commit
        decided[act] = dec
        undec = ~dec & valid[act]
        first = torch.where(undec, pos[None], big).min(1).values
        is_stop = dec & stop[canvas[act]] & (pos[None] >= plen[act, None])
        first_stop = torch.where(is_stop, pos[None], big).min(1).values
        finished = (first_stop < first) | (first == big)
        if mode == "iterative":  # the pass cap: the rest of the block takes its best guess
            rest = undec & inblk  # the current block's masks left after this pass
            capped = ~finished & rest.any(1) & (blk_pass[act] >= max_iterations)
            if bool(capped.any()):
                rest &= capped[:, None]
                canvas[act] = torch.where(rest, best_tok[act], canvas[act])
                decided[act] = decided[act] | rest
                dec = decided[act]
                first = torch.where(~dec & valid[act], pos[None], big).min(1).values
                is_stop = dec & stop[canvas[act]] & (pos[None] >= plen[act, None])
                first_stop = torch.where(is_stop, pos[None], big).min(1).values
                finished = (first_stop < first) | (first == big)
        done[act] = finished
    outs = []
    for i in range(n):
        row = canvas[i, int(plen[i]):int(limit[i])].tolist()
        cut = next((j for j, x in enumerate(row) if x in (enc.eot, enc.eos)), None)
        outs.append(row if cut is None else row[:cut + 1])
    return outs, n_pass.tolist()


def eval_sets(n: int) -> list[T.Example]:
    """The first n held-out examples of every task and of the fresh two-digit sets."""
    return [ex for t in T.TASKS + T.FRESH_TASKS for ex in T.heldout(t, n)]


def torch_eval(model: ToyDLM, examples: list[T.Example], settings: dict,
               max_tokens: int = 48) -> dict:
    """Accuracy per task, overall, and generated tokens per pass, under decode settings."""
    enc = Encoder()
    outs, passes = torch_decode(model, [enc.prompt(ex.prompt) for ex in examples],
                                settings["decode_mode"], settings.get("block_size", 32),
                                settings.get("small_block_size", 8),
                                settings.get("threshold", 0.9), max_tokens, enc=enc)
    right: dict[str, list[bool]] = {}
    for ex, out in zip(examples, outs):
        right.setdefault(ex.task, []).append(T.is_correct(ex, enc.decode(out)))
    acc = {t: sum(v) / len(v) for t, v in right.items()}
    table = [t for t in acc if t in T.TASKS]
    return {"settings": settings, "accuracy": acc,
            "table": sum(acc[t] for t in table) / max(1, len(table)),
            "tokens_per_pass": sum(map(len, outs)) / max(1, sum(passes))}


# Candidates for the recommended settings, most parallel first.
CANDIDATES = [
    {"decode_mode": "greedy", "block_size": 32, "small_block_size": 8, "threshold": 0.9},
    {"decode_mode": "iterative", "block_size": 32, "small_block_size": 8, "threshold": 0.7},
    {"decode_mode": "iterative", "block_size": 32, "small_block_size": 8, "threshold": 0.9},
]


def choose_decode(results: list[dict]) -> dict:
    """The candidate with the most tokens per pass among those scoring >= 92% on the fresh
    two-digit sets and >= 90% (issue 16's bar) on every held-out task; else the one with the
    best worst task."""
    def worst(r):
        return min(r["accuracy"].values())

    ok = [r for r in results if all(r["accuracy"].get(t, 0) >= 0.92 for t in T.FRESH_TASKS)
          and all(r["accuracy"].get(t, 0) >= 0.90 for t in T.TASKS)]
    best = max(ok, key=lambda r: r["tokens_per_pass"]) if ok else max(results, key=worst)
    return dict(best["settings"])


def format_eval(r: dict) -> str:
    s = r["settings"]
    name = s["decode_mode"] + ("" if s["decode_mode"] == "ar" else
                               f" {s['block_size']}/{s['small_block_size']}"
                               + (f" @{s['threshold']}" if s["decode_mode"] == "iterative"
                                  else ""))
    cols = " ".join(f"{t} {100 * a:5.1f}" for t, a in r["accuracy"].items())
    return (f"{name:<22} {cols} | table {100 * r['table']:5.1f} "
            f"tok/pass {r['tokens_per_pass']:.2f}")
