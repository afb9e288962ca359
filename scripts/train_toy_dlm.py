#!/usr/bin/env python3
"""Train the bundled toy ternary block-diffusion model and export it as GGUF (I2_S).

    python scripts/train_toy_dlm.py --out dlmnumba/data/toy-dlm.gguf          # the shipped model
    python scripts/train_toy_dlm.py --out /tmp/t.gguf --ar-steps 50 --dlm-steps 50  # a smoke run

Architecture exactly as dlmnumba runs it (arch `bitnet-b1.58`): tied embedding, per layer
RMSNorm -> BitLinear q,k,v -> NEOX RoPE -> attention (GQA) -> sub-norm -> BitLinear o, then
RMSNorm -> BitLinear gate, up -> relu(gate)^2 * up -> sub-norm -> BitLinear down; final RMSNorm
and the embedding as LM head.  BitLinear is quantization-aware: weights ternary with one absmean
scale per tensor, activations int8 absmax per token, straight-through gradients.

Training (Fast-dLLM v2, reference.md section 3), on dlmnumba.tasks' synthetic tasks in the seed's
chat form, held-out prompts excluded:
1. `--ar-steps` of autoregressive training (causal attention, next-token loss on the answer);
2. `--dlm-steps` of block-diffusion adaptation: the input is [noisy ; clean], noisy positions
   attend bidirectionally inside their block and to the clean stream of earlier blocks, clean
   positions attend block-causally to the clean stream; answer positions of a block are masked
   with a per-block ratio t ~ U(0, 1), and every example also appears with the complementary mask;
   token shift: the token at position i is predicted from the noisy row i-1, or from the clean
   row i-1 when i starts a block (what the engine's first pass of a block computes).  The block
   size is drawn per step from --block-sizes, so the model decodes at 8, 16, 32 and 64.  Every
   `--ar-every`-th step is an autoregressive step, so `--mode ar` keeps working.

torch is a development dependency only; the engine never imports it.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
import dataclasses
from dataclasses import asdict
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


# The toy model's shape; Shape(**changes) gives variants (tests use smaller ones).
TOY_SHAPE = Preset(n_vocab=274, n_embd=192, n_layer=4, n_head=4, n_head_kv=2, n_ff=512,
                   n_ctx=256, rope_base=10000.0, rms_eps=1e-5)


def Shape(**changes) -> Preset:  # noqa: N802 (reads as the constructor it replaces)
    return dataclasses.replace(TOY_SHAPE, **changes)


chat = seed_chat  # the prompt form the model is trained on (its chat template renders it)


# ---------------------------------------------------------------------------------------------
# The model

def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def quant_act(x: torch.Tensor) -> torch.Tensor:
    """Per-token absmax int8 (round half to even, as the engine), straight-through."""
    s = 127.0 / x.detach().abs().amax(-1, keepdim=True).clamp(min=1e-5)
    return x + ((x * s).round().clamp(-128, 127) / s - x).detach()


def ternarize(w: torch.Tensor, scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in {-1, 0, 1}, scale) of a weight tensor: the absmean scale unless one is given
    (a model loaded from GGUF keeps the file's scale)."""
    if scale is None:
        scale = w.detach().abs().mean().clamp(min=1e-5)
    else:
        scale = torch.tensor(scale, dtype=w.dtype)
    return (w.detach() / scale).round().clamp(-1, 1), scale


class BitLinear(nn.Module):
    def __init__(self, k: int, n: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, k) * (1.0 / math.sqrt(k)))
        self.scale: float | None = None  # fixed ternary scale (set when loaded from a file)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = ternarize(self.weight, self.scale)
        w = self.weight + (codes * scale - self.weight).detach()
        return F.linear(quant_act(x), w)


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

    def hidden(self, ids: torch.Tensor, pos: torch.Tensor, allow: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, E]; allow[B or 1, T, T] True where i may attend j."""
        s = self.s
        b, t = ids.shape
        hd = s.n_embd // s.n_head
        inv = s.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)
        ang = pos.to(torch.float64)[..., None] * inv  # [B, T, hd/2]
        cos, sin = ang.cos().float()[:, None], ang.sin().float()[:, None]  # [B, 1, T, hd/2]

        def rope(x):  # x [B, H, T, hd], NEOX pairs (i, i + hd/2)
            x1, x2 = x[..., :hd // 2], x[..., hd // 2:]
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

        x = self.embd[ids]
        mask = allow[:, None]
        for L in self.layers:
            h = rmsnorm(x, L.attn_norm, s.rms_eps)
            q = L.q(h).view(b, t, s.n_head, hd).transpose(1, 2)
            k = L.k(h).view(b, t, s.n_head_kv, hd).transpose(1, 2)
            v = L.v(h).view(b, t, s.n_head_kv, hd).transpose(1, 2)
            q, k = rope(q), rope(k)
            rep = s.n_head // s.n_head_kv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            a = a.transpose(1, 2).reshape(b, t, s.n_embd)
            x = x + L.o(rmsnorm(a, L.attn_sub_norm, s.rms_eps))
            h = rmsnorm(x, L.ffn_norm, s.rms_eps)
            g = F.relu(L.gate(h)).pow(2) * L.up(h)
            x = x + L.down(rmsnorm(g, L.ffn_sub_norm, s.rms_eps))
        return rmsnorm(x, self.output_norm, s.rms_eps)

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
# Data

class Batcher:
    """Tokenized training examples from dlmnumba.tasks' stream, in batches of similar length
    (a pool of POOL batches is sorted by length and dealt out in random order: less padding)."""

    POOL = 8

    def __init__(self, seed: int, weights=None):
        self.vocab = build_char_vocab()
        self.tok = vocab_tokenizer(self.vocab)
        self.stream = T.training_stream(seed, T.TASKS, weights)
        self.rng = random.Random(seed + 1)
        self.eot = self.vocab.eot_id
        self.mask = self.vocab.mask_id
        self.ready: dict[int, list] = {}

    def _encode(self) -> tuple[list[int], int]:
        ex = next(self.stream)
        p = self.tok.encode(chat(ex.prompt))
        a = self.tok.encode(" " + ex.answer, add_bos=False) + [self.eot]
        return p + a, len(p)

    def examples(self, n: int) -> list[tuple[list[int], int]]:
        """A batch of n (ids through the final EOT, prompt length) pairs of similar length."""
        queue = self.ready.setdefault(n, [])
        if not queue:
            pool = sorted((self._encode() for _ in range(n * self.POOL)), key=lambda e: len(e[0]))
            queue += [pool[i:i + n] for i in range(0, len(pool), n)]
            self.rng.shuffle(queue)
        return queue.pop()

    def pad(self, exs, multiple: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """ids [B, T] (EOT padding), prompt lengths [B], answer ends (exclusive) [B]."""
        t = max(len(ids) for ids, _ in exs)
        t = -(-t // multiple) * multiple
        ids = torch.full((len(exs), t), self.eot, dtype=torch.long)
        for i, (x, _) in enumerate(exs):
            ids[i, :len(x)] = torch.tensor(x)
        plen = torch.tensor([p for _, p in exs])
        end = torch.tensor([len(x) for x, _ in exs])
        return ids, plen, end


def ar_loss(model: ToyDLM, ids, plen, end) -> torch.Tensor:
    """Next-token loss on the answer (and its EOT), causal attention."""
    b, t = ids.shape
    pos = torch.arange(t)
    h = model.hidden(ids, pos.expand(b, t), block_mask(pos, None)[None])
    tgt_pos = pos[None, 1:]
    keep = (tgt_pos >= plen[:, None]) & (tgt_pos < end[:, None])
    logits = model.logits(h[:, :-1][keep])
    return F.cross_entropy(logits, ids[:, 1:][keep])


def dlm_loss(model: ToyDLM, ids, plen, end, block: int, gen: torch.Generator,
             mask_id: int) -> torch.Tensor:
    """Block-diffusion loss with complementary masks and token shift."""
    b, t = ids.shape
    pos = torch.arange(t)
    nblk = t // block
    ratio = torch.rand(b, nblk, generator=gen).repeat_interleave(block, 1)
    m = torch.rand(b, t, generator=gen) < ratio
    answer = pos[None] >= plen[:, None]
    # score positions through the end of the block holding the final EOT; later ones are padding
    last = ((end - 1) // block + 1) * block
    scored = answer & (pos[None] < last[:, None])
    masks = torch.cat([m & answer, ~m & answer])  # complementary pair
    ids2, plen2, scored2 = ids.repeat(2, 1), plen.repeat(2), scored.repeat(2, 1)
    noisy = torch.where(masks, torch.full_like(ids2, mask_id), ids2)
    inp = torch.cat([noisy, ids2], 1)
    pos2 = torch.cat([pos, pos])
    h = model.hidden(inp, pos2.expand(2 * b, 2 * t), noisy_clean_mask(t, block)[None])
    # target i (1..t-1): row i-1 of the noisy stream, or of the clean stream when i starts a block
    tgt = pos[1:]
    src = torch.where(tgt % block == 0, t + tgt - 1, tgt - 1)
    keep = masks[:, 1:] & scored2[:, 1:]
    rows = h[:, src][keep]
    return F.cross_entropy(model.logits(rows), ids2[:, 1:][keep])


# ---------------------------------------------------------------------------------------------
# Export

def export_gguf(model: ToyDLM, path: Path, info: dict) -> Path:
    """Write the model as a bitnet-b1.58 GGUF with I2_S projections and an F32 embedding."""
    import gguf

    s = model.s
    vocab = build_char_vocab()
    assert vocab.vocab_size == s.n_vocab
    w = gguf.GGUFWriter(None, ARCH)
    w.add_name("dlmnumba toy DLM (trained ternary block-diffusion model, synthetic tasks)")
    w.add_description("Trained by scripts/train_toy_dlm.py: " +
                      ", ".join(f"{k}={v}" for k, v in info.items()))
    add_shape_metadata(w, s)
    w.add_uint32("diffusion.block_size", int(info.get("block", 16)))
    add_tokenizer_metadata(w, vocab, seed_chat_template(vocab))  # what the model was trained on
    w.add_tensor("token_embd.weight", model.embd.detach().float().numpy())
    w.add_tensor("output_norm.weight", model.output_norm.detach().float().numpy())
    for i, L in enumerate(model.layers):
        for name, lin in L.projections():
            codes, scale = ternarize(lin.weight, lin.scale)
            add_i2s_tensor(w, f"blk.{i}.{name}.weight", (codes + 1).to(torch.uint8).numpy(),
                           float(scale))
        for name in L.NORMS:
            w.add_tensor(f"blk.{i}.{name}.weight", getattr(L, name).detach().float().numpy())
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
    pos = torch.arange(len(ids))
    allow = block_mask(pos, None if attention == "causal" else block)
    with torch.no_grad():
        h = model.hidden(torch.tensor([ids]), pos[None], allow[None])
        return model.logits(h)[0].numpy()


# ---------------------------------------------------------------------------------------------

def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    frac = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def train(args) -> ToyDLM:
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    shape = Shape(n_embd=args.n_embd, n_layer=args.n_layer, n_ff=args.n_ff)
    model = ToyDLM(shape)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model {asdict(shape)}: {n_params / 1e6:.2f} M parameters", flush=True)
    weights = [float(x) for x in args.task_weights.split(",")]
    data = Batcher(args.seed, weights)
    sizes = [int(b) for b in args.block_sizes.split(",")]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                            weight_decay=0.01)
    total = args.ar_steps + args.dlm_steps
    rng = random.Random(args.seed)
    t0 = time.time()
    ema: dict[str, float] = {}
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, args.lr, args.warmup)
        stage_ar = step < args.ar_steps or (args.ar_every and step % args.ar_every == 0)
        if stage_ar:
            ids, plen, end = data.pad(data.examples(args.batch), 1)
            loss, kind = ar_loss(model, ids, plen, end), "ar"
        else:
            block = rng.choice(sizes)
            ids, plen, end = data.pad(data.examples(args.batch // 2), block)
            loss, kind = dlm_loss(model, ids, plen, end, block, gen, data.mask), "dlm"
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema[kind] = loss.item() if kind not in ema else 0.98 * ema[kind] + 0.02 * loss.item()
        if args.checkpoint_every and args.save_torch and step % args.checkpoint_every == 0:
            torch.save(model.state_dict(), args.save_torch)
        if step % args.log_every == 0 or step == total - 1:
            print(f"step {step:6d}/{total} {time.time() - t0:7.0f}s lr {opt.param_groups[0]['lr']:.2e} "
                  + " ".join(f"{k} {v:.4f}" for k, v in sorted(ema.items())), flush=True)
    return model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "dlmnumba" / "data" / "toy-dlm.gguf")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ar-steps", type=int, default=2000)
    ap.add_argument("--dlm-steps", type=int, default=1500)
    ap.add_argument("--ar-every", type=int, default=3, help="every Nth adaptation step is AR (0: none)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--block-sizes", default="8,16,16,32,64")
    ap.add_argument("--task-weights", default="2,2,1,1,1,2",
                    help="sampling weights of " + ",".join(T.TASKS))
    ap.add_argument("--checkpoint-every", type=int, default=0,
                    help="save the state dict to --save-torch every N steps")
    ap.add_argument("--n-embd", type=int, default=192)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-ff", type=int, default=512)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--save-torch", type=Path, help="also save the torch state dict here")
    ap.add_argument("--export-only", type=Path, metavar="STATE",
                    help="skip training: export a state dict saved by --save-torch")
    args = ap.parse_args(argv)
    if args.export_only:
        model = ToyDLM(Shape(n_embd=args.n_embd, n_layer=args.n_layer, n_ff=args.n_ff))
        model.load_state_dict(torch.load(args.export_only))
    else:
        model = train(args)
    info = {"seed": args.seed, "ar_steps": args.ar_steps, "dlm_steps": args.dlm_steps,
            "ar_every": args.ar_every, "batch": args.batch, "lr": args.lr,
            "block_sizes": args.block_sizes, "task_weights": args.task_weights, "block": 16}
    if args.save_torch:
        torch.save(model.state_dict(), args.save_torch)
    print(f"wrote {export_gguf(model, args.out, info)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
