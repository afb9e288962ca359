"""The toy model in torch: BitNet b1.58 exactly as dlmnumba runs it (arch `bitnet-b1.58`), with
quantization-aware BitLinear projections, and the attention masks of its two streams."""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from dlmnumba.synth.models import Preset

__all__ = ["ARCH", "TOY_SHAPE", "Shape", "rmsnorm", "quantize_act", "ternarize", "BitLinear",
           "Layer", "ToyDLM", "block_mask", "noisy_clean_mask"]

ARCH = "bitnet-b1.58"

# The toy model's shape; Shape(**changes) gives variants (tests use smaller ones).
TOY_SHAPE = Preset(n_vocab=274, n_embd=512, n_layer=6, n_head=8, n_head_kv=4, n_ff=1024,
                   n_ctx=256, rope_base=10000.0, rms_eps=1e-5)


def Shape(**changes) -> Preset:  # noqa: N802 (reads as the constructor it replaces)
    return dataclasses.replace(TOY_SHAPE, **changes)


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

