"""Independent reference implementations ("oracles") of the BitNet b1.58 forward pass.

The tests use these to check dlmnumba's logits. They deliberately import nothing from
`dlmnumba`: GGUF files are read with the `gguf` package only, and the forward passes are
written from docs/reference.md section 1 and the public sources, not from our engine.

Three oracles, each returning logits [T, vocab] as float32 numpy arrays:

- `numpy_logits`: a plain numpy forward in float64, exactly the reference numerics
  (per-token absmax int8 activation quantization, round half to even). Also does
  block-causal or arbitrary attention masks.
- `hf_logits`: Hugging Face transformers `BitNetForCausalLM` (float32, CPU, eager attention)
  with its linear layers swapped for transformers' own BitNet quantized layers
  (`transformers.integrations.bitnet.BitLinear` with packed ternary weights, or
  `AutoBitLinear` in offline mode) via `replace_with_bitnet_linear`. Causal only.
- `llamacpp_logits` / `llamacpp_block_logits`: llama.cpp through llama-cpp-python's
  low-level API (llama_batch / llama_decode / llama_get_logits_ith / llama_set_causal_attn),
  arch `bitnet` only (always SiLU in the vendored llama.cpp), TQ1_0/TQ2_0, F32 KV cache,
  flash attention off. Its TQ kernels quantize activations per 256 values (Q8_K) and its LM
  head multiplies in F16, so it agrees with the others only to a tolerance;
  `numpy_logits(..., act_quant_group=256)` reproduces the Q8_K grouping.

Int8 activation quantization makes the forward discontinuous: a rounding tie that two
implementations round differently moves later rows by about one quantization step (~1e-2
relative). Compare logits with relative tolerances of that order, not float epsilons.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import numpy as np
import gguf

ARCH_ACTIVATION = {"bitnet": "silu", "bitnet-b1.58": "relu2", "bitnet-25": "relu2"}
ACTIVATION_ALIASES = {
    "silu": "silu", "swish": "silu", "swiglu": "silu",
    "relu2": "relu2", "relu_squared": "relu2", "squared_relu": "relu2", "relu_sqr": "relu2",
}
PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
ACT_QUANT_EPS = 1e-5  # floor of max|x| in the per-token activation scale 127 / max|x|


# --------------------------------------------------------------------------- GGUF reading

def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
        raise KeyError(f"GGUF metadata key {key!r} missing")
    return field.contents()


def load_gguf_weights(path: str | Path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read hparams and all tensors (dequantized to float32, numpy [n_out, n_in]) of a GGUF."""
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    weights: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        # t.shape is ggml's ne (fastest dimension first); numpy wants it reversed: [n_out, n_in]
        shape = tuple(int(n) for n in reversed(t.shape))
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        weights[t.name] = values.astype(np.float32).reshape(shape)  # a copy, not the memmap
    n_embd = int(_field(reader, f"{arch}.embedding_length"))
    n_head = int(_field(reader, f"{arch}.attention.head_count"))
    head_dim = n_embd // n_head
    activation = ARCH_ACTIVATION.get(arch)
    override = reader.fields.get(f"{arch}.hidden_activation")
    if override is not None:
        activation = ACTIVATION_ALIASES[override.contents().lower()]
    if activation is None:
        raise ValueError(f"{path}: unknown architecture {arch!r} and no {arch}.hidden_activation")
    hparams = {
        "arch": arch,
        "n_embd": n_embd,
        "n_layer": int(_field(reader, f"{arch}.block_count")),
        "n_ff": int(_field(reader, f"{arch}.feed_forward_length")),
        "n_head": n_head,
        "n_head_kv": int(_field(reader, f"{arch}.attention.head_count_kv")),
        "head_dim": head_dim,
        "n_rot": int(_field(reader, f"{arch}.rope.dimension_count", head_dim)),
        "rope_base": float(_field(reader, f"{arch}.rope.freq_base")),
        "rms_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        "n_ctx": int(_field(reader, f"{arch}.context_length")),
        "vocab": weights["token_embd.weight"].shape[0],
        "activation": activation,
    }
    return hparams, weights


# --------------------------------------------------------------------------- numpy oracle

def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm over the last axis, times the norm weight."""
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def quantize_activations(x: np.ndarray, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-row absmax int8: q = clip(rint(x*s), -128, 127), s = 127 / max(|x|, 1e-5).

    group=None: one scale per row (the reference). group=256: one scale per 256 values, which
    is what llama.cpp's Q8_K does for TQ1_0/TQ2_0 (s then has shape [T, K/group, 1]).
    """
    if group is not None:
        x = x.reshape(*x.shape[:-1], x.shape[-1] // group, group)
    s = 127.0 / np.maximum(np.abs(x).max(axis=-1, keepdims=True), ACT_QUANT_EPS)
    q = np.clip(np.rint(x * s), -128, 127)  # np.rint rounds half to even, like torch.round
    return q, s


def bitlinear(q: np.ndarray, s: np.ndarray, weights: dict, name: str) -> np.ndarray:
    """y = (W_deq @ q) / s, times the optional per-projection `.scale` tensor."""
    w = weights[name + ".weight"].astype(np.float64)
    if s.ndim == 3:  # grouped scales: dequantize first, (q/s) @ W^T
        y = (q / s).reshape(q.shape[0], -1) @ w.T
    else:
        y = (q @ w.T) / s
    scale = weights.get(name + ".scale")
    if scale is not None:
        y = y * float(scale.reshape(-1)[0])
    return y


def rope_neox(x: np.ndarray, pos: np.ndarray, n_rot: int, base: float) -> np.ndarray:
    """NEOX ("rotate-half") RoPE on x[T, H, D]: pairs (i, i + n_rot/2), dims >= n_rot untouched."""
    half = n_rot // 2
    inv_freq = base ** (-2.0 * np.arange(half) / n_rot)
    ang = pos[:, None].astype(np.float64) * inv_freq[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:n_rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., n_rot:]], axis=-1)


def activation_fn(name: str, g: np.ndarray) -> np.ndarray:
    """relu(g)^2 or silu(g)."""
    if name == "relu2":
        return np.square(np.maximum(g, 0.0))
    if name == "silu":
        return g / (1.0 + np.exp(-g))
    raise ValueError(f"unknown activation {name!r}")


def attention_mask(n: int, attention="causal", block_size: int | None = None) -> np.ndarray:
    """allowed[i, j]: query i may see key j. 'causal', 'block' (j//B <= i//B) or a bool array."""
    if isinstance(attention, np.ndarray):
        assert attention.shape == (n, n), attention.shape
        return attention.astype(bool)
    i = np.arange(n)[:, None]
    j = np.arange(n)[None, :]
    if attention == "causal":
        return j <= i
    if attention == "block":
        if not block_size:
            raise ValueError("attention='block' needs block_size")
        return j // block_size <= i // block_size
    raise ValueError(f"unknown attention {attention!r}")


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """GQA softmax attention, q[T, H, D], k/v[T, Hkv, D] -> [T, H*D]; scale 1/sqrt(D)."""
    T, H, D = q.shape
    n_rep = H // k.shape[1]
    out = np.empty((T, H, D))
    for h in range(H):
        kv = h // n_rep  # HF repeat_kv / ggml broadcast: query head h reads kv head h // n_rep
        scores = (q[:, h, :] @ k[:, kv, :].T) / np.sqrt(D)
        scores = np.where(allowed, scores, -np.inf)
        scores -= scores.max(axis=-1, keepdims=True)
        p = np.exp(scores)
        p /= p.sum(axis=-1, keepdims=True)
        out[:, h, :] = p @ v[:, kv, :]
    return out.reshape(T, H * D)


def numpy_logits(hparams: dict, weights: dict, tokens, attention="causal",
                 block_size: int | None = None, act_quant_group: int | None = None) -> np.ndarray:
    """Reference forward of a fresh sequence at positions 0..T-1; returns logits [T, vocab].

    act_quant_group=256 quantizes activations per 256 values like llama.cpp's Q8_K (to compare
    with llama.cpp tightly); the default None is the reference per-token quantization.
    """
    hp = hparams
    tokens = np.asarray(tokens, dtype=np.int64)
    T = len(tokens)
    pos = np.arange(T)
    allowed = attention_mask(T, attention, block_size)
    eps = hp["rms_eps"]
    D = hp["head_dim"]
    x = weights["token_embd.weight"][tokens].astype(np.float64)
    for il in range(hp["n_layer"]):
        p = f"blk.{il}."
        # attention: q, k, v share one quantized input
        a = rms_norm(x, weights[p + "attn_norm.weight"], eps)
        qa, sa = quantize_activations(a, act_quant_group)
        q = bitlinear(qa, sa, weights, p + "attn_q").reshape(T, hp["n_head"], D)
        k = bitlinear(qa, sa, weights, p + "attn_k").reshape(T, hp["n_head_kv"], D)
        v = bitlinear(qa, sa, weights, p + "attn_v").reshape(T, hp["n_head_kv"], D)
        q = rope_neox(q, pos, hp["n_rot"], hp["rope_base"])
        k = rope_neox(k, pos, hp["n_rot"], hp["rope_base"])
        o = attend(q, k, v, allowed)
        o = rms_norm(o, weights[p + "attn_sub_norm.weight"], eps)  # sub-norm BEFORE Wo
        qo, so = quantize_activations(o, act_quant_group)
        x = x + bitlinear(qo, so, weights, p + "attn_output")
        # feed-forward: gate and up share one quantized input
        f = rms_norm(x, weights[p + "ffn_norm.weight"], eps)
        qf, sf = quantize_activations(f, act_quant_group)
        g = bitlinear(qf, sf, weights, p + "ffn_gate")
        u = bitlinear(qf, sf, weights, p + "ffn_up")
        m = rms_norm(activation_fn(hp["activation"], g) * u, weights[p + "ffn_sub_norm.weight"], eps)
        qm, sm = quantize_activations(m, act_quant_group)
        x = x + bitlinear(qm, sm, weights, p + "ffn_down")
    h = rms_norm(x, weights["output_norm.weight"], eps)
    lm_head = weights.get("output.weight", weights["token_embd.weight"])
    return (h @ lm_head.astype(np.float64).T).astype(np.float32)


# --------------------------------------------------------------------------- Hugging Face oracle

def _ternary_and_scale(w: np.ndarray, name: str) -> tuple[np.ndarray, float]:
    """Split W_deq into ternary values and its one per-tensor scale (BitLinear needs that)."""
    mags = np.unique(np.abs(w[w != 0]))
    if len(mags) > 1:
        raise ValueError(f"{name}: blocks have different scales {mags[:4]}; use linear_class='autobitlinear'")
    d = float(mags[0]) if len(mags) else 1.0
    return np.sign(w), d


def build_hf_model(path: str | Path, linear_class: str = "bitlinear"):
    """Build transformers' BitNetForCausalLM (float32, eager) holding the GGUF's weights.

    Every decoder nn.Linear is replaced by `transformers.integrations.bitnet.replace_with_bitnet_linear`
    with `BitNetQuantConfig(linear_class=..., quantization_mode="offline")`; lm_head stays a plain
    float nn.Linear (tied to the embedding unless the file has output.weight). Scale conventions:
    - "bitlinear": `BitLinear` holds 2-bit packed ternary weights (`pack_weights`) and computes
      y = (W_t @ q) / (s_x * weight_scale), so weight_scale = 1 / (d * proj_scale).
    - "autobitlinear": `AutoBitLinear(online_quant=False)` computes
      y = (ActQuant(x) @ W^T) * weight_scale with W = W_deq, weight_scale = proj_scale.
    """
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import AutoBitLinear, BitLinear, pack_weights, replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    hp, w = load_gguf_weights(path)
    if hp["n_rot"] != hp["head_dim"]:
        raise ValueError("HF BitNet has no partial rotary: rope.dimension_count must equal head_dim")
    hidden_act = {"relu2": "relu2", "silu": "silu"}[hp["activation"]]
    tied = "output.weight" not in w
    config = BitNetConfig(
        vocab_size=hp["vocab"], hidden_size=hp["n_embd"], intermediate_size=hp["n_ff"],
        num_hidden_layers=hp["n_layer"], num_attention_heads=hp["n_head"],
        num_key_value_heads=hp["n_head_kv"], hidden_act=hidden_act,
        max_position_embeddings=hp["n_ctx"], rms_norm_eps=hp["rms_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": hp["rope_base"]},
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = BitNetForCausalLM(config).to(torch.float32)
    qcfg = BitNetQuantConfig(linear_class=linear_class, quantization_mode="offline")
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qcfg)

    def t(a):
        return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy

    def set_linear(module, name):
        wd = w[name + ".weight"]
        proj_scale = float(w[name + ".scale"].reshape(-1)[0]) if name + ".scale" in w else 1.0
        if isinstance(module, BitLinear):
            tern, d = _ternary_and_scale(wd, name)
            module.weight = pack_weights(torch.from_numpy(tern.astype(np.int8)).to(torch.int16))
            module.weight_scale = torch.tensor([1.0 / (d * proj_scale)], dtype=torch.float32)
        elif isinstance(module, AutoBitLinear):
            module.weight = torch.nn.Parameter(t(wd), requires_grad=False)
            module.weight_scale = torch.tensor([proj_scale], dtype=torch.float32)
        else:
            raise TypeError(f"{name}: expected a BitNet linear, got {type(module).__name__}")

    def set_norm(module, name):
        module.weight = torch.nn.Parameter(t(w[name]), requires_grad=False)

    m = model.model
    m.embed_tokens.weight = torch.nn.Parameter(t(w["token_embd.weight"]), requires_grad=False)
    set_norm(m.norm, "output_norm.weight")
    for il, layer in enumerate(m.layers):
        p = f"blk.{il}."
        set_norm(layer.input_layernorm, p + "attn_norm.weight")
        set_norm(layer.post_attention_layernorm, p + "ffn_norm.weight")
        set_norm(layer.self_attn.attn_sub_norm, p + "attn_sub_norm.weight")
        set_norm(layer.mlp.ffn_sub_norm, p + "ffn_sub_norm.weight")
        for hf_name, gg in (("q_proj", "attn_q"), ("k_proj", "attn_k"), ("v_proj", "attn_v"),
                            ("o_proj", "attn_output")):
            set_linear(getattr(layer.self_attn, hf_name), p + gg)
        for hf_name, gg in (("gate_proj", "ffn_gate"), ("up_proj", "ffn_up"), ("down_proj", "ffn_down")):
            set_linear(getattr(layer.mlp, hf_name), p + gg)
    if tied:
        model.lm_head.weight = m.embed_tokens.weight
    else:
        model.lm_head.weight = torch.nn.Parameter(t(w["output.weight"]), requires_grad=False)
    for name, buf in list(model.named_buffers()) + list(model.named_parameters()):
        if buf.is_meta:
            raise RuntimeError(f"HF model tensor {name} was not loaded")
    model.eval()
    return model


def hf_logits(path: str | Path, tokens, linear_class: str = "bitlinear", model=None) -> np.ndarray:
    """Logits [T, vocab] of transformers' BitNetForCausalLM on the GGUF's weights (causal)."""
    import torch

    if model is None:
        model = build_hf_model(path, linear_class)
    ids = torch.tensor(np.asarray(tokens, dtype=np.int64))[None, :]
    # BitLinear / ActQuant are wrapped in @torch.compile; run them eagerly (no inductor build).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        out = model(input_ids=ids, use_cache=False)
    return out.logits[0].float().numpy()


# --------------------------------------------------------------------------- llama.cpp oracle

def _llamacpp(path: str | Path, n_ctx: int, n_threads: int):
    """bench/llamacpp.py's runner in exact mode: F32 KV cache, no (F16) flash attention, and
    n_ubatch = n_batch = n_ctx since a non-causal decode needs the whole batch in one ubatch."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:  # last: bench/kernels.py must not shadow HF's `kernels` package
        sys.path.append(bench)
    from llamacpp import LlamaCpp

    return contextlib.closing(LlamaCpp(str(path), n_ctx=n_ctx, n_threads=n_threads,
                                       n_batch=n_ctx, exact=True))


def llamacpp_logits(path: str | Path, tokens, n_threads: int = 2) -> np.ndarray:
    """Causal logits [T, vocab] from llama.cpp (one decode of the whole sequence at 0..T-1)."""
    tokens = list(tokens)
    with _llamacpp(path, max(len(tokens), 16), n_threads) as lc:
        return lc.decode(tokens, 0, logits_rows="all")


def llamacpp_block_logits(path: str | Path, prefix_tokens, batch_tokens,
                          block_size: int | None = None, n_threads: int = 2) -> np.ndarray:
    """Logits [len(batch), vocab] of a batch decoded non-causally after a cached prefix.

    The prefix goes into the KV cache causally (block_size None) or block by block, each block
    non-causal (block_size B: exact block-causal attention when len(prefix) % B == 0). Then
    `llama_set_causal_attn(ctx, False)` and the batch is decoded at positions len(prefix)..,
    seeing every cached prefix key and all of itself.
    """
    prefix, batch = list(prefix_tokens), list(batch_tokens)
    n_ctx = max(len(prefix) + len(batch), 16)
    with _llamacpp(path, n_ctx, n_threads) as lc:
        if prefix and block_size is None:
            lc.decode(prefix, 0)
        elif prefix:
            lc.set_causal(False)
            for b0 in range(0, len(prefix), block_size):
                lc.decode(prefix[b0:b0 + block_size], b0)
        lc.set_causal(False)
        return lc.decode(batch, len(prefix), logits_rows="all")
