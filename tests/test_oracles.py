"""Cross-checks of the reference oracles (tests/oracles.py) against each other.

numpy_logits (float64, per-token int8 activations) must match Hugging Face's BitNet and
llama.cpp (Q8_K activations per 256 values, F16 LM head) within tolerances that still catch real
architecture mistakes. Int8 activation quantization makes the forward discontinuous: one
rounding tie that float32 and float64 round differently, in an early row's K/V, moves every
later row by about one quantization step, so agreement is either ~1e-7 or ~1e-2, never between.
Measured on the `tiny` preset (2 layers, E=256, n_ff=768), 2 model seeds x 6 token seeds,
T=48 and 128, relative Frobenius error ||a - b|| / ||b||:
- numpy vs HF (BitLinear or AutoBitLinear): median 2.5e-7 (T=48) / 5e-3 (T=128), max 1.2e-2.
- numpy vs llama.cpp: per-token 2.0e-2..2.15e-2; with act_quant_group=256 (Q8_K) median 2e-4
  (T=48) / 5e-3 (T=128), max 1.2e-2.
- deliberately wrong numpy oracles vs llama.cpp / HF: GPT-J RoPE ~0.7, attn sub-norm after
  Wo ~0.18-0.24, ffn sub-norm after Wdown ~0.17, relu2 <-> silu ~0.3, GQA head map h % n_kv ~1.1,
  RoPE base x2 ~0.2, per-tensor activation scale ~0.045, no activation quantization ~0.02.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf_edit import rewrite

import oracles as O
from dlmnumba.synth.models import write_synthetic

T = 48
HF_REL_TOL = 0.03          # measured max 1.2e-2 (one rounding-tie cascade); bugs give > 0.15
LLAMA_REL_TOL = 0.05       # per-token numpy vs Q8_K llama.cpp, measured ~0.021; bugs give > 0.15
LLAMA_Q8K_REL_TOL = 0.03   # numpy with 256-value activation groups vs llama.cpp, max 1.2e-2
MIN_TOP1 = 0.9           # tiny's logits have small top-2 gaps; measured >= 0.958 when correct


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(a - ref) / np.linalg.norm(ref))


def top1(a: np.ndarray, ref: np.ndarray) -> float:
    return float((a.argmax(-1) == ref.argmax(-1)).mean())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """tiny synthetic models {(arch, qtype): path}; 'scaled' adds .scale tensors, 'partial' n_rot=D/2."""
    d = tmp_path_factory.mktemp("oracle_models")
    out = {}
    for arch, qtype in [("bitnet-b1.58", "TQ2_0"), ("bitnet", "TQ1_0"), ("bitnet", "TQ2_0")]:
        out[arch, qtype] = write_synthetic(d / f"{arch}_{qtype}.gguf", "tiny", qtype, arch, seed=1)
    hp, _ = O.load_gguf_weights(out["bitnet", "TQ2_0"])
    rng = np.random.default_rng(7)
    scales = {f"blk.{i}.{n}.scale": np.array([0.5 + rng.random()], np.float32)
              for i in range(hp["n_layer"]) for n in O.PROJECTIONS}
    for arch in ("bitnet", "bitnet-b1.58"):
        out[arch, "scaled"] = rewrite(out[arch, "TQ2_0"], d / f"{arch}_scaled.gguf", extra=scales)
    out["bitnet", "partial"] = rewrite(out["bitnet", "TQ1_0"], d / "bitnet_partial.gguf",
                                       metadata={"bitnet.rope.dimension_count": hp["head_dim"] // 2})
    return out


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(0).integers(0, 1024, T)


# --------------------------------------------------------------------------- numpy oracle alone

def test_load_gguf_weights_orientation_and_hparams(models):
    hp, w = O.load_gguf_weights(models["bitnet-b1.58", "TQ2_0"])
    E, F, kv = hp["n_embd"], hp["n_ff"], hp["n_head_kv"] * hp["head_dim"]
    assert hp["activation"] == "relu2" and O.load_gguf_weights(models["bitnet", "TQ1_0"])[0]["activation"] == "silu"
    assert hp["n_rot"] == hp["head_dim"] == E // hp["n_head"]
    assert w["token_embd.weight"].shape == (hp["vocab"], E)
    assert w["blk.0.attn_k.weight"].shape == (kv, E)
    assert w["blk.0.ffn_up.weight"].shape == (F, E)
    assert w["blk.0.ffn_down.weight"].shape == (E, F)
    assert w["blk.1.ffn_sub_norm.weight"].shape == (F,)
    mags = np.unique(np.abs(w["blk.0.attn_q.weight"]))
    assert len(mags) == 2 and mags[0] == 0  # ternary times one scale


def test_quantize_activations_rounding_and_clamp():
    x = np.array([[127.0, 0.5, 1.5, -0.5, -2.5, -127.0], [0.0] * 6])
    q, s = O.quantize_activations(x)
    assert s[0, 0] == 1.0 and s[1, 0] == 127.0 / O.ACT_QUANT_EPS
    np.testing.assert_array_equal(q[0], [127, 0, 2, -0, -2, -127])  # half to even
    np.testing.assert_array_equal(q[1], 0)
    qg, sg = O.quantize_activations(np.arange(512.0)[None, :] - 256, group=256)
    assert qg.shape == (1, 2, 256) and sg[0, 0, 0] == 127 / 256 and sg[0, 1, 0] == 127 / 255


def test_attention_masks():
    blk = O.attention_mask(8, "block", 4)
    assert blk[0, 3] and not blk[3, 4] and blk[5, 7] and blk[7, 0]
    causal = O.attention_mask(8)
    assert causal[3, 3] and not causal[3, 4]
    with pytest.raises(ValueError):
        O.attention_mask(8, "block")


def test_block_attention_is_causal_across_blocks(models, tokens):
    """Logits of earlier blocks do not depend on tokens of later blocks."""
    hp, w = O.load_gguf_weights(models["bitnet-b1.58", "TQ2_0"])
    a = O.numpy_logits(hp, w, tokens[:16], "block", 8)
    b = O.numpy_logits(hp, w, np.concatenate([tokens[:8], tokens[16:24]]), "block", 8)
    np.testing.assert_array_equal(a[:8], b[:8])
    assert rel_err(a[8:], b[8:]) > 0.05
    assert rel_err(a, O.numpy_logits(hp, w, tokens[:16], "causal")) > 0.05


# --------------------------------------------------------------------------- numpy vs Hugging Face

@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("kind", ["TQ2_0", "scaled"])
def test_numpy_matches_hf(models, tokens, linear_class, kind):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    path = models["bitnet-b1.58", kind]
    hp, w = O.load_gguf_weights(path)
    ref = O.numpy_logits(hp, w, tokens)
    hf = O.hf_logits(path, tokens, linear_class)
    err = rel_err(hf, ref)
    assert err < HF_REL_TOL, f"numpy vs HF {linear_class}: rel {err:.2e}, max abs {np.abs(hf - ref).max():.3g}"
    assert top1(hf, ref) >= MIN_TOP1


# --------------------------------------------------------------------------- numpy vs llama.cpp

@pytest.mark.parametrize("kind", ["TQ1_0", "TQ2_0", "scaled", "partial"])
def test_numpy_matches_llamacpp(models, tokens, kind):
    pytest.importorskip("llama_cpp")
    path = models["bitnet", kind]
    hp, w = O.load_gguf_weights(path)
    lc = O.llamacpp_logits(path, tokens)
    ref = O.numpy_logits(hp, w, tokens)
    err = rel_err(lc, ref)
    assert err < LLAMA_REL_TOL, f"numpy vs llama.cpp: rel {err:.3g}, max abs {np.abs(lc - ref).max():.3g}"
    assert top1(lc, ref) >= MIN_TOP1
    err_q8k = rel_err(lc, O.numpy_logits(hp, w, tokens, act_quant_group=256))
    assert err_q8k < LLAMA_Q8K_REL_TOL, f"numpy(Q8_K groups) vs llama.cpp: rel {err_q8k:.3g}"
    if kind == "partial":  # only the first n_rot dims of each head rotate
        assert hp["n_rot"] == hp["head_dim"] // 2
        assert rel_err(lc, O.numpy_logits(dict(hp, n_rot=hp["head_dim"]), w, tokens)) > 2 * LLAMA_REL_TOL


def test_llamacpp_tolerance_catches_wrong_activation(models, tokens):
    """The llama.cpp tolerance is tight enough to fail on relu2 in place of silu."""
    pytest.importorskip("llama_cpp")
    path = models["bitnet", "TQ2_0"]
    hp, w = O.load_gguf_weights(path)
    lc = O.llamacpp_logits(path, tokens)
    wrong = O.numpy_logits(dict(hp, activation="relu2"), w, tokens)
    assert rel_err(lc, wrong) > 2 * LLAMA_REL_TOL


def test_numpy_block_attention_matches_llamacpp(models, tokens):
    """Block-causal: prefix written block by block non-causally, then one bidirectional block."""
    pytest.importorskip("llama_cpp")
    B = 8
    path = models["bitnet", "TQ2_0"]
    hp, w = O.load_gguf_weights(path)
    seq = tokens[:4 * B]
    lc = O.llamacpp_block_logits(path, seq[:3 * B], seq[3 * B:], block_size=B)
    ref = O.numpy_logits(hp, w, seq, "block", B)[3 * B:]
    assert rel_err(lc, ref) < LLAMA_REL_TOL
    assert top1(lc, ref) >= MIN_TOP1
    ref_q8k = O.numpy_logits(hp, w, seq, "block", B, act_quant_group=256)[3 * B:]
    assert rel_err(lc, ref_q8k) < LLAMA_Q8K_REL_TOL
    causal = O.numpy_logits(hp, w, seq, "causal", act_quant_group=256)[3 * B:]
    assert rel_err(lc, causal) > 4 * LLAMA_Q8K_REL_TOL  # the mask really differs


def test_numpy_custom_mask_matches_llamacpp_causal_prefix(models, tokens):
    """Causal prefix in the cache, then a batch that sees the prefix and all of itself."""
    pytest.importorskip("llama_cpp")
    P, B = 20, 8
    path = models["bitnet", "TQ1_0"]
    hp, w = O.load_gguf_weights(path)
    seq = tokens[:P + B]
    mask = O.attention_mask(P + B, "causal")
    mask[P:, P:] = True
    lc = O.llamacpp_block_logits(path, seq[:P], seq[P:])
    ref = O.numpy_logits(hp, w, seq, mask, act_quant_group=256)[P:]
    assert rel_err(lc, ref) < LLAMA_Q8K_REL_TOL


def test_hf_matches_llamacpp_on_silu_model(models, tokens):
    """The two external oracles agree with each other too (arch bitnet, SiLU)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    path = models["bitnet", "scaled"]
    err = rel_err(O.hf_logits(path, tokens, "autobitlinear"), O.llamacpp_logits(path, tokens))
    assert err < LLAMA_REL_TOL
