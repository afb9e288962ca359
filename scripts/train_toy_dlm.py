#!/usr/bin/env python3
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
decoding policies re-implemented here (`torch_decode`), and the best diffusion settings go into
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
import collections
import dataclasses
import json
import math
import multiprocessing
import os
import random
import re
import shlex
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dlmnumba import tasks as T  # noqa: E402
from dlmnumba.chat import seed_chat  # noqa: E402
from dlmnumba.synth.models import Preset, add_i2s_tensor, add_shape_metadata, write_atomically  # noqa: E402
from dlmnumba.gguf import quants  # noqa: E402
from dlmnumba.synth.vocab import (add_tokenizer_metadata, build_char_vocab,  # noqa: E402
                                 seed_chat_template, vocab_tokenizer)

ARCH = "bitnet-b1.58"
CHECKPOINT_VERSION = 1

# The toy model's shape; Shape(**changes) gives variants (tests use smaller ones).
TOY_SHAPE = Preset(n_vocab=274, n_embd=512, n_layer=6, n_head=8, n_head_kv=4, n_ff=1024,
                   n_ctx=256, rope_base=10000.0, rms_eps=1e-5)


def Shape(**changes) -> Preset:  # noqa: N802 (reads as the constructor it replaces)
    return dataclasses.replace(TOY_SHAPE, **changes)


chat = seed_chat  # the prompt form the model is trained on (its chat template renders it)

# Decode settings the export records when no evaluation chose others.
DEFAULT_DECODE = {"decode_mode": "iterative", "block_size": 32, "small_block_size": 8,
                  "threshold": 0.9}


# ---------------------------------------------------------------------------------------------
# The model

def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q, s): per-token absmax int8 codes (round half to even, as the engine) held in float,
    and the scale s with x ~ q / s."""
    s = 127.0 / x.abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return (x * s).round().clamp(-128, 127), s


def ternarize(w: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1}, scale) of a weight tensor: the absmean scale unless one is given
    (a model loaded from GGUF keeps the file's scale)."""
    if scale is None:
        scale = w.detach().abs().mean().clamp(min=1e-5)
    else:
        scale = torch.tensor(scale, dtype=w.dtype, device=w.device)
    return (w.detach() / scale).round().clamp(-1, 1), scale


class _BitMatmul(torch.autograd.Function):
    """y = (q @ codes^T) * (w_scale / s): the integer product, then the scales.  Backward is
    straight-through: dy/dx uses the dequantized weights, dy/dw the dequantized activations."""

    @staticmethod
    def forward(ctx, x, w, codes, scale):  # w: the float weights, only for its gradient
        q, s = quantize_act(x)
        ctx.save_for_backward(q, s, codes, scale)
        return F.linear(q, codes) * (scale / s)

    @staticmethod
    def backward(ctx, g):
        q, s, codes, scale = ctx.saved_tensors
        gx = g @ (codes * scale)
        gw = g.reshape(-1, g.shape[-1]).T @ (q / s).reshape(-1, q.shape[-1])
        return gx, gw, None, None


class BitLinear(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) * (1.0 / math.sqrt(k)))
        self.scale: float | None = None  # fixed ternary scale (set when loaded from a file)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = ternarize(self.weight, self.scale)
        return _BitMatmul.apply(x, self.weight, codes, scale)


class Layer(nn.Module):
    def __init__(self, s: Preset):
        super().__init__()
        hd = s.n_embd // s.n_head
        self.q = BitLinear(s.n_embd, s.n_embd)
        self.k = BitLinear(s.n_embd, hd * s.n_head_kv)
        self.v = BitLinear(s.n_embd, hd * s.n_head_kv)
        self.o = BitLinear(s.n_embd, s.n_embd)
        self.gate = BitLinear(s.n_embd, s.n_ff)
        self.up = BitLinear(s.n_embd, s.n_ff)
        self.down = BitLinear(s.n_ff, s.n_embd)
        self.attn_norm = nn.Parameter(torch.ones(s.n_embd))
        self.attn_sub_norm = nn.Parameter(torch.ones(s.n_embd))
        self.ffn_norm = nn.Parameter(torch.ones(s.n_embd))
        self.ffn_sub_norm = nn.Parameter(torch.ones(s.n_ff))

    NORMS = ("attn_norm", "attn_sub_norm", "ffn_norm", "ffn_sub_norm")

    def projections(self) -> list[tuple[str, BitLinear]]:
        """(GGUF tensor stem, module) of the ternary projections, in llama.cpp's order."""
        return [("attn_q", self.q), ("attn_k", self.k), ("attn_v", self.v),
                ("attn_output", self.o), ("ffn_gate", self.gate), ("ffn_up", self.up),
                ("ffn_down", self.down)]


class ToyDLM(nn.Module):
    """BitNet b1.58 transformer, the engine's forward pass in torch."""

    def __init__(self, s: Preset):
        super().__init__()
        self.s = s
        self.embd = nn.Parameter(torch.randn(s.n_vocab, s.n_embd) * 0.05)
        self.layers = nn.ModuleList(Layer(s) for _ in range(s.n_layer))
        self.output_norm = nn.Parameter(torch.ones(s.n_embd))

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, allow: torch.Tensor | None,
               probe: tuple[tuple[int, int], ...] = ()):
        """Final-normed hidden states [B, T, E]; allow[B or 1, T, T] True where i may attend j,
        None for causal attention.  probe ((layer, head), ...): also return those heads'
        attention log-probabilities, a list of [B, T, T] (causal attention only)."""
        s = self.s
        b, t = ids.shape
        hd = s.n_embd // s.n_head
        inv = s.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64, device=ids.device)
                              / hd)
        ang = pos.to(torch.float64)[..., None] * inv  # [B, T, hd/2]
        cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # [B, 1, T, hd/2]

        def rope(x):  # x [B, H, T, hd], NEOX pairs (i, i + hd/2)
            x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

        x = self.embd[ids]
        mask = None if allow is None else allow[:, None]
        rep = s.n_head // s.n_head_kv
        seen: dict[tuple[int, int], torch.Tensor] = {}
        hidden_pairs = ~block_mask(pos[0], None) if probe else None  # j after i
        for li, L in enumerate(self.layers):
            h = rmsnorm(x, L.attn_norm, s.rms_eps)
            q = L.q(h).view(b, t, s.n_head, hd).transpose(1, 2)
            k = L.k(h).view(b, t, s.n_head_kv, hd).transpose(1, 2)
            v = L.v(h).view(b, t, s.n_head_kv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            for layer, head in probe:
                if layer == li:
                    w = q[:, head] @ k[:, head].transpose(-1, -2) / math.sqrt(hd)
                    seen[layer, head] = w.masked_fill(hidden_pairs, float("-inf")).log_softmax(-1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
            a = a.transpose(1, 2).reshape(b, t, s.n_embd)
            x = x + L.o(rmsnorm(a, L.attn_sub_norm, s.rms_eps))
            h = rmsnorm(x, L.ffn_norm, s.rms_eps)
            g = F.relu(L.gate(h)).pow(2) * L.up(h)
            x = x + L.down(rmsnorm(g, L.ffn_sub_norm, s.rms_eps))
        out = rmsnorm(x, self.output_norm, s.rms_eps)
        return (out, [seen[lh] for lh in probe]) if probe else out

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.embd.T


def block_mask(pos: torch.Tensor, block: int | None) -> torch.Tensor:
    """allow[i, j] for one stream at positions pos [T]: causal (block None) or block-causal."""
    if block is None:
        return pos[None, :] <= pos[:, None]
    return (pos[None, :] // block) <= (pos[:, None] // block)


def noisy_clean_mask(n: int, block: int) -> torch.Tensor:
    """allow [2n, 2n] for the input [noisy(0..n-1) ; clean(0..n-1)]."""
    b = torch.arange(n) // block
    same = b[:, None] == b[None, :]
    earlier = b[None, :] < b[:, None]
    allow = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    allow[:n, :n] = same  # noisy -> its own block, bidirectionally
    allow[:n, n:] = earlier  # noisy -> clean stream of earlier blocks
    allow[n:, n:] = same | earlier  # clean -> block-causal clean
    return allow


# ---------------------------------------------------------------------------------------------
# Data: the batch of a step is a pure function of (seed, step)

# Training mix: what each entry draws at difficulty d (see the module docstring).
DEFAULT_MIX = ("add=1,add2=2,add_carry=1,sub=1,sub2=2,sub_borrow=1,copy=1.5,copy_long=1,"
               "reverse=1.5,reverse_long=1,sort=1.5,lookup=3")


def _operand(rng: random.Random, d: float, two_digit: bool) -> int:
    if rng.random() >= d:
        return rng.randint(0, 9)
    return rng.randint(10, 99) if two_digit else T.number(rng, 2)


def _span(lo: int, hi: int, d: float) -> int:
    return lo + round(d * (hi - lo))


def lookup_multi_example(pairs: dict[str, str], rng: random.Random) -> T.Example:
    """Training only: every key queried once, in random order, one lookup answer each
    (`Given o=903 q=949, find q o` -> `q=949 o=903`): several recalls per sequence."""
    keys = rng.sample(list(pairs), len(pairs))
    ex = T.lookup_example(pairs, keys[0])
    return T.Example("lookup", f"{ex.prompt} {' '.join(keys[1:])}".rstrip(),
                     " ".join(T.lookup_pair(pairs, k) for k in keys))


def _draw(rng: random.Random, entry: str, d: float) -> T.Example:
    """One example of a training-mix entry at difficulty d (before the held-out filter)."""
    if entry in ("add", "add2", "add_carry", "sub", "sub2", "sub_borrow"):
        two = entry != "add" and entry != "sub"
        for _ in range(1000):
            a, b = _operand(rng, d, two), _operand(rng, d, two)
            if entry == "sub_borrow":  # a borrow needs a two-digit minuend: 1x at first
                a = rng.randint(10, 99) if rng.random() < d else rng.randint(10, 19)
                if a < b or a % 10 >= b % 10:
                    continue
            if entry == "add_carry" and a % 10 + b % 10 < 10:
                continue
            return (T.add_example if entry.startswith("add") else T.sub_example)(a, b)
        raise RuntimeError(f"no {entry} example at difficulty {d}")
    if entry in ("copy", "copy_long"):
        hi = _span(4, 24, d)
        return T.copy_example(T.letters(rng, 2 if entry == "copy" else max(2, hi - 10), hi))
    if entry in ("reverse", "reverse_long"):
        hi = _span(4, 16, d)
        return T.reverse_example(T.letters(rng, 2 if entry == "reverse" else max(2, hi - 6), hi))
    if entry == "sort":
        n = rng.randint(2, _span(4, 12, d))
        return T.sort_example("".join(rng.choice("0123456789") for _ in range(n)))
    if entry in ("lookup", "lookup_value", "lookup_multi"):
        keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, _span(2, 5, d)))
        pairs = dict(zip(keys, (str(T.number(rng, _span(1, 3, d))) for _ in keys)))
        if entry == "lookup_multi":
            return lookup_multi_example(pairs, rng)
        ex = T.lookup_example(pairs, key := rng.choice(keys))
        # lookup_value: the bare value, the answer stages 1 and 2 of the bundled model trained on
        return ex if entry == "lookup" else dataclasses.replace(ex, answer=pairs[key])
    raise ValueError(f"unknown training-mix entry {entry!r}")


def parse_mix(text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """'add=1,sub2=2,...' -> (entries, weights), each entry checked."""
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    entries, weights = tuple(p[0].strip() for p in pairs), tuple(float(p[1]) for p in pairs)
    probe = random.Random(0)
    for e in entries:
        _draw(probe, e, 1.0)  # raises on an unknown entry
    return entries, weights


class Encoder:
    """Token ids of the chat-form prompt and of the answer, by table lookup: the char
    vocabulary maps every byte to its own id (checked against the real tokenizer at start)."""

    def __init__(self):
        vocab = build_char_vocab()
        self.eot, self.mask, self.bos, self.eos = (vocab.eot_id, vocab.mask_id, vocab.bos_id,
                                                   vocab.eos_id)
        head, tail = chat("\x00").split("\x00")
        self.head = [self.bos] + list(head.encode())
        self.tail = self._text(tail)

    def _text(self, text: str) -> list[int]:
        special = "<|eot_id|>"
        out: list[int] = []
        for i, part in enumerate(text.split(special)):
            if i:
                out.append(self.eot)
            out += part.encode()
        return out

    def prompt(self, text: str) -> list[int]:
        return self.head + list(text.encode()) + self.tail

    def answer(self, text: str) -> list[int]:
        return list((" " + text).encode()) + [self.eot]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def check(self, examples) -> None:
        """Raise unless the lookup encoding equals the tokenizer's on these examples."""
        tok = vocab_tokenizer(build_char_vocab())
        for ex in examples:
            if "  " in ex.prompt or "  " in ex.answer:
                raise ValueError(f"double space in {ex}: the char vocabulary merges it")
            want = tok.encode(chat(ex.prompt)), tok.encode(" " + ex.answer, add_bos=False)
            if (self.prompt(ex.prompt), self.answer(ex.answer)[:-1]) != want:
                raise AssertionError(f"fast encoding differs from the tokenizer on {ex}")


@dataclass(frozen=True)
class DataConfig:
    """Everything a batch depends on (picklable for worker processes)."""

    seed: int
    steps: int
    ar_steps: int
    ar_every: int
    batch: int
    block_sizes: tuple[int, ...]
    entries: tuple[str, ...]
    weights: tuple[float, ...]
    curriculum_steps: int
    recall_weight: float  # > 0: AR batches carry recall_sources (see --recall-weight)
    recall_head: tuple[int, int]  # (layer, head) taught the copy step
    key_head: tuple[int, int] | None  # (layer, head) taught the key step (None: none)

    def is_ar(self, step: int) -> bool:
        return step < self.ar_steps or bool(self.ar_every and step % self.ar_every == 0)

    def difficulty(self, step: int) -> float:
        return min(1.0, step / self.curriculum_steps) if self.curriculum_steps else 1.0


@dataclass
class Batch:
    """One step's data: ids [B, T] (EOT padding), prompt lengths, answer ends (exclusive);
    for diffusion steps the block size and the first mask of each complementary pair."""

    kind: str
    ids: np.ndarray
    plen: np.ndarray
    end: np.ndarray
    block: int = 0
    masked: np.ndarray | None = None
    recall: np.ndarray | None = None  # [B, 2, T]: see recall_sources (-1: none)


_PAIR = re.compile(r"([a-z])=(\d+)")


def recall_sources(enc: Encoder, ex: T.Example, plen: int, t: int) -> np.ndarray:
    """[2, t] attention targets of a lookup example (-1: none), the two steps of a recall:
    row 0 (copy): for the position whose next token is a digit of an answer's pair (`q=949`),
    the prompt position of that digit in the prompt's pair `q=949`; row 1 (key): for those
    positions, the answer's key `q`, and for each digit of a value in the prompt, its key.
    The char vocabulary puts character c of the prompt text at token len(enc.head) + c and
    character c of " " + answer at plen + c."""
    out = np.full((2, t), -1, np.int64)
    if ex.task != "lookup":
        return out
    head = len(enc.head)
    start = {}
    for m in _PAIR.finditer(ex.prompt):
        start[m.group(1)] = head + m.start(2)
        out[1, head + m.start(2):head + m.end(2)] = head + m.start(1)
    for m in _PAIR.finditer(" " + ex.answer):
        if m.group(1) in start:
            for j in range(len(m.group(2))):
                out[0, plen + m.start(2) + j - 1] = start[m.group(1)] + j
                out[1, plen + m.start(2) + j - 1] = plen + m.start(1)
    return out


_ENCODER: Encoder | None = None


def make_batch(cfg: DataConfig, step: int, kind: str | None = None,
               difficulty: float | None = None) -> Batch:
    """The batch of `step` (kind and difficulty overridable, for the probe)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = Encoder()
    enc, banned = _ENCODER, T.heldout_prompts()
    rng = random.Random(f"{cfg.seed}:batch:{step}")
    kind = kind or ("ar" if cfg.is_ar(step) else "dlm")
    d = cfg.difficulty(step) if difficulty is None else difficulty
    block = rng.choice(cfg.block_sizes) if kind == "dlm" else 1
    n = cfg.batch if kind == "ar" else max(1, cfg.batch // 2)
    seqs, plens, exs = [], [], []
    for entry in rng.choices(cfg.entries, cfg.weights, k=n):
        ex = _draw(rng, entry, d)
        for _ in range(1000):
            if ex.prompt not in banned:
                break
            ex = _draw(rng, entry, d)
        else:
            raise RuntimeError(f"{entry} at difficulty {d}: every draw is a held-out prompt")
        p = enc.prompt(ex.prompt)
        seqs.append(p + enc.answer(ex.answer))
        plens.append(len(p))
        exs.append(ex)
    t = -(-max(map(len, seqs)) // block) * block
    ids = np.full((n, t), enc.eot, np.int64)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = x
    out = Batch(kind, ids, np.array(plens, np.int64), np.array([len(x) for x in seqs], np.int64),
                block)
    if kind == "ar" and cfg.recall_weight:
        out.recall = np.stack([recall_sources(enc, ex, pl, t) for ex, pl in zip(exs, plens)])
    if kind == "dlm":
        nrng = np.random.default_rng([cfg.seed, step])
        ratio = np.repeat(nrng.random((n, t // block)), block, axis=1)
        out.masked = nrng.random((n, t)) < ratio
    return out


class Batches:
    """Batches of the given steps in order; with workers > 0 built ahead by a process pool
    (fork: started before CUDA), at most `ahead` batches in flight."""

    def __init__(self, cfg: DataConfig, jobs, workers: int = 0, ahead: int = 0):
        self.cfg, self.jobs, self.workers = cfg, list(jobs), workers
        self.ahead = ahead or 4 * workers
        self.pool = None
        if workers:
            T.heldout_prompts()  # computed once, inherited by the workers
            self.pool = multiprocessing.get_context("fork").Pool(workers)

    def __iter__(self):
        if self.pool is None:
            for job in self.jobs:
                yield make_batch(self.cfg, *job)
            return
        pending: collections.deque = collections.deque()
        it = iter(self.jobs)
        for job in it:
            pending.append(self.pool.apply_async(make_batch, (self.cfg, *job)))
            if len(pending) >= self.ahead:
                break
        while pending:
            res = pending.popleft().get()
            job = next(it, None)
            if job is not None:
                pending.append(self.pool.apply_async(make_batch, (self.cfg, *job)))
            yield res

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


# ---------------------------------------------------------------------------------------------
# Losses (no host synchronisation: masked means instead of boolean indexing)

class Masks:
    """Attention masks by (kind, length, block), built once per device."""

    def __init__(self, device):
        self.device, self.cache = device, {}

    def noisy_clean(self, t: int, block: int) -> torch.Tensor:
        key = ("nc", t, block)
        if key not in self.cache:
            self.cache[key] = noisy_clean_mask(t, block)[None].to(self.device)
        return self.cache[key]


def _masked_ce(logits: torch.Tensor, target: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                         reduction="none")
    keep = keep.reshape(-1).float()
    return (ce * keep).sum() / keep.sum().clamp(min=1)


def ar_loss(model: ToyDLM, ids, plen, end, recall=None, heads=(), weight: float = 0.0
            ) -> torch.Tensor:
    """Next-token loss on the answer (and its EOT), causal attention; with recall [B, 2, T] (see
    recall_sources) and heads (copy head, key head or None), plus weight x the mean negative log
    of the attention each head pays to its targets."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    taught = [] if recall is None else [(lh, recall[:, row]) for row, lh in enumerate(heads)
                                        if lh is not None]
    probe = tuple(lh for lh, _ in taught)
    h, logps = model.hidden(ids, pos.expand(b, t), None, probe=probe), []
    if probe:
        h, logps = h
    tgt_pos = pos[None, 1:]
    keep = (tgt_pos >= plen[:, None]) & (tgt_pos < end[:, None])
    loss = _masked_ce(model.logits(h[:, :-1]), ids[:, 1:], keep)
    for (_, target), logp in zip(taught, logps):
        on = target >= 0
        if bool(on.any()):
            paid = logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
            loss = loss - weight * paid[on].mean()
    return loss


def dlm_loss(model: ToyDLM, ids, plen, end, block: int, m: torch.Tensor, mask_id: int,
             masks: Masks) -> torch.Tensor:
    """Block-diffusion loss with complementary masks and token shift; m [B, T] is the first
    mask of each pair (the second is its complement on the answer)."""
    b, t = ids.shape
    pos = torch.arange(t, device=ids.device)
    answer = pos[None] >= plen[:, None]
    # score positions through the end of the block holding the final EOT; later ones are padding
    last = ((end - 1) // block + 1) * block
    scored = answer & (pos[None] < last[:, None])
    both = torch.cat([m & answer, ~m & answer])  # complementary pair
    ids2, scored2 = ids.repeat(2, 1), scored.repeat(2, 1)
    noisy = torch.where(both, torch.full_like(ids2, mask_id), ids2)
    inp = torch.cat([noisy, ids2], 1)
    pos2 = torch.cat([pos, pos])
    h = model.hidden(inp, pos2.expand(2 * b, 2 * t), masks.noisy_clean(t, block))
    # target i (1..t-1): row i-1 of the noisy stream, or of the clean stream when i starts a block
    tgt = pos[1:]
    src = torch.where(tgt % block == 0, t + tgt - 1, tgt - 1)
    keep = both[:, 1:] & scored2[:, 1:]
    return _masked_ce(model.logits(h[:, src]), ids2[:, 1:], keep)


def batch_loss(model: ToyDLM, batch: Batch, device, mask_id: int, masks: Masks,
               cfg: DataConfig) -> torch.Tensor:
    ids, plen, end = (torch.from_numpy(a).to(device, non_blocking=True)
                      for a in (batch.ids, batch.plen, batch.end))
    if batch.kind == "ar":
        if batch.recall is None:
            return ar_loss(model, ids, plen, end)
        recall = torch.from_numpy(batch.recall).to(device, non_blocking=True)
        return ar_loss(model, ids, plen, end, recall, (cfg.recall_head, cfg.key_head),
                       cfg.recall_weight)
    m = torch.from_numpy(batch.masked).to(device, non_blocking=True)
    return dlm_loss(model, ids, plen, end, batch.block, m, mask_id, masks)


# ---------------------------------------------------------------------------------------------
# Torch-side decoding: the engine's policies (dlmnumba/decode/scheduler.py) on a batch

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


# ---------------------------------------------------------------------------------------------
# Export

def export_gguf(model: ToyDLM, path: Path, info: dict, decode: dict | None = None) -> Path:
    """Write the model as a bitnet-b1.58 GGUF with I2_S projections and an F32 embedding, and
    its recommended decode settings (`diffusion.*`)."""
    import gguf

    s = model.s
    decode = {**DEFAULT_DECODE, **(decode or {})}
    vocab = build_char_vocab()
    assert vocab.vocab_size == s.n_vocab
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("dlmnumba toy DLM (trained ternary block-diffusion model, synthetic tasks)")
    w.add_description("Trained by scripts/train_toy_dlm.py: " +
                      ", ".join(f"{k}={v}" for k, v in info.items()))
    add_shape_metadata(w, s)
    w.add_uint32("diffusion.block_size", int(decode["block_size"]))
    w.add_uint32("diffusion.small_block_size", int(decode["small_block_size"]))
    w.add_float32("diffusion.threshold", float(decode["threshold"]))
    w.add_string("diffusion.decode_mode", str(decode["decode_mode"]))
    add_tokenizer_metadata(w, vocab, seed_chat_template(vocab))  # what the model was trained on
    w.add_tensor("token_embd.weight", model.embd.detach().float().cpu().numpy())
    w.add_tensor("output_norm.weight", model.output_norm.detach().float().cpu().numpy())
    for i, L in enumerate(model.layers):
        for name, lin in L.projections():
            codes, scale = ternarize(lin.weight, lin.scale)
            add_i2s_tensor(w, f"blk.{i}.{name}.weight",
                           (codes + 1).to(torch.uint8).cpu().numpy(), float(scale))
        for name in L.NORMS:
            w.add_tensor(f"blk.{i}.{name}.weight",
                         getattr(L, name).detach().float().cpu().numpy())
    return write_atomically(w, Path(path))


def load_gguf(path: str | Path) -> ToyDLM:
    """The torch model holding a toy GGUF's weights (dequantized): the oracle for parity tests."""
    from dlmnumba.gguf.reader import GGUFFile
    from dlmnumba.gguf.spec import ModelSpec

    f = GGUFFile(str(path))
    sp = ModelSpec.from_metadata(f.metadata, str(path))
    s = Shape(n_vocab=sp.n_vocab, n_embd=sp.n_embd, n_layer=sp.n_layer, n_head=sp.n_head,
              n_head_kv=sp.n_head_kv, n_ff=sp.n_ff, n_ctx=sp.n_ctx_train, rope_base=sp.rope_base,
              rms_eps=sp.rms_eps)
    m = ToyDLM(s)

    scales: dict[str, float] = {}

    def arr(name):
        ti = f.tensors[name]
        if ti.qtype in quants.TERNARY_TYPES:
            codes, sc = quants.decode_ternary(ti.qtype, f.data(name), tuple(ti.shape))
            if np.any(sc != sc.flat[0]):
                raise ValueError(f"{path}: {name} has more than one scale; toy models have one")
            scales[name] = float(sc.flat[0])
            return torch.from_numpy((codes.astype(np.float32) - 1) * sc[:, :1])
        return torch.from_numpy(np.array(f.array(name), dtype=np.float32))

    with torch.no_grad():
        m.embd.copy_(arr("token_embd.weight"))
        m.output_norm.copy_(arr("output_norm.weight"))
        for i, L in enumerate(m.layers):
            for name, lin in L.projections():
                lin.weight.copy_(arr(f"blk.{i}.{name}.weight"))
                lin.scale = scales[f"blk.{i}.{name}.weight"]
            for name in L.NORMS:
                getattr(L, name).copy_(arr(f"blk.{i}.{name}.weight"))
    return m


def torch_logits(model: ToyDLM, ids: list[int], attention: str = "causal",
                 block: int | None = None) -> np.ndarray:
    """Logits [T, V] of a fresh sequence, as Model.logits computes them."""
    dev = next(model.parameters()).device
    pos = torch.arange(len(ids), device=dev)
    allow = block_mask(pos, None if attention == "causal" else block)
    with torch.no_grad():
        h = model.hidden(torch.tensor([ids], device=dev), pos[None], allow[None])
        return model.logits(h)[0].cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Training

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


# Arguments that define the trained model (a checkpoint must agree on them to be resumed).
SHAPE_ARGS = ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff")
MODEL_ARGS = ("seed", "steps", "ar_frac", "ar_every", "batch", "lr", "warmup", "block_sizes",
              "mix", "curriculum", *SHAPE_ARGS, "init_from", "recall_weight", "recall_head",
              "key_head")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        # exact for the integer products (see the docstring); attention and head in TF32
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


def make_batch_example(cfg: DataConfig, i: int) -> T.Example:
    """A training example of the mix (for the encoder check)."""
    rng = random.Random(f"{cfg.seed}:check:{i}")
    return _draw(rng, cfg.entries[i % len(cfg.entries)], 1.0)


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


def run_info(args, reached: int) -> dict:
    keys = ("seed", "steps", "ar_frac", "ar_every", "batch", "lr", "warmup", "block_sizes",
            "curriculum", "n_embd", "n_layer", "n_ff")
    info = {k: getattr(args, k) for k in keys}
    info["mix"] = args.mix.replace(",", " ")
    if args.init_from:
        info["init_from"] = Path(args.init_from).name
    if reached < args.steps:
        info["stopped_at"] = reached
    return info


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


if __name__ == "__main__":
    sys.exit(main())
