"""Tiny Hugging Face BitNet checkpoints made in the tests, and transformers running them.

Nothing here imports dlmnumba: the checkpoints are written with transformers (BitNetConfig,
BitNetForCausalLM.save_pretrained), tokenizers and PreTrainedTokenizerFast; Microsoft's packed
form with transformers' own `pack_weights`; and the oracle is transformers' BitNetForCausalLM
with its BitNet layers (`replace_with_bitnet_linear`, which is what from_pretrained's BitNet
quantizer does before loading; from_pretrained itself would need `accelerate`).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

CORPUS = Path(__file__).resolve().parents[1] / "dlmnumba" / "data" / "corpus.txt"
# Llama-3's pre-tokenizer regex as its tokenizer.json spells it
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|reserved_special_token_0|>"]
ADDED = ["<tool_call>", "</tool_call>"]  # non-special added tokens (USER_DEFINED)
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                 "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PACKED_QUANT = {"quant_method": "bitnet", "linear_class": "bitlinear",
                "quantization_mode": "offline"}


def make_tokenizer(out: Path, n_bpe: int = 360, mask: str | None = None):
    """A Llama-3-style byte-level BPE tokenizer trained on the project's corpus, with special
    and added tokens, BOS added by its post-processor, and a chat template; saved to out."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS.read_text(encoding="utf-8")], trainer=trainer)
    specials = SPECIALS + ([mask] if mask else [])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED])
    bos = SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="<|eot_id|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_bitnet(out: Path, *, hidden_act: str = "relu2", hidden: int = 256, ff: int = 512,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, spare_rows: int = 8,
                seed: int = 0, exact_scales: bool = False, shard_size: str | None = None,
                mask: str | None = None, f32_norms: bool = True,
                tie_free: bool = True) -> Path:
    """A random BitNet checkpoint directory (bf16 master weights, tied embeddings) and its
    tokenizer; the embedding has spare_rows rows beyond the tokenizer's tokens.

    exact_scales: each projection's absmean is exactly 2^-5 and every weight a multiple of
    2^-7, so its ternary scale (1/32) is exact in bf16 and f16 too: the packed form of these
    weights (weight_scale 32 in bf16) and TQ1_0/TQ2_0's f16 block scales then describe the
    very same ternary tensor as transformers' online ternarization.

    f32_norms: the norm weights stay float32 (as many checkpoints keep them; the rest is bf16).
    BitNet's activations are integer sums times one scale, so with 8-bit (bf16) norm weights
    the int8 quantization's 127 x / max|x| lands exactly on k + 0.5 in a few percent of rows,
    and two float32 implementations round such ties differently (the last bit of RMSNorm
    decides), moving all later rows by ~1e-2; float32 norm weights make ties improbable."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = len(make_tokenizer(out, mask=mask)) + spare_rows
    config = BitNetConfig(
        vocab_size=n_vocab, hidden_size=hidden, intermediate_size=ff, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, hidden_act=hidden_act,
        max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = BitNetForCausalLM(config)
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight":
            continue  # tied to the embedding
        if name.endswith("embed_tokens.weight"):
            v = (_grid_embedding(rng, p.shape) if tie_free
                 else rng.standard_normal(p.shape) * 2 / np.sqrt(hidden))
        elif name == "model.layers.0.input_layernorm.weight" and tie_free:
            v = np.ones(p.shape)  # keeps the grid embedding's codes integral
        elif "norm" in name:
            v = 1 + 0.1 * rng.standard_normal(p.shape)
        elif exact_scales:
            v = _exact_scale_weights(rng, p.shape)
        else:
            v = 0.02 * rng.standard_normal(p.shape)
        state[name] = torch.from_numpy(v.astype(np.float32))
    model.load_state_dict(state, strict=False)
    model.to(torch.bfloat16)
    if f32_norms:
        for name, mod in model.named_modules():
            if name.endswith("norm"):
                mod.weight.data = state[name + ".weight"]  # the float32 values drawn above
    model.save_pretrained(out, **({"max_shard_size": shard_size} if shard_size else {}))
    return out


def _grid_embedding(rng: np.random.Generator, shape) -> np.ndarray:
    """Rows x = M k / 127 (random integers k, one of them +-127, M in [0.3, 0.5]): the first
    int8 activation codes round(127 x / max|x|) are then within 0.25 of an integer (after
    bf16 rounding), far from any rounding tie, in every implementation."""
    rows, cols = shape
    k = rng.integers(-127, 128, shape)
    k[np.arange(rows), rng.integers(0, cols, rows)] = rng.choice([-127, 127], rows)
    return (0.3 + 0.2 * rng.random((rows, 1))) * k / 127


def _exact_scale_weights(rng: np.random.Generator, shape) -> np.ndarray:
    """Random-signed weights whose mean |w| is exactly 2^-5: magnitudes in pairs summing to
    2 units (0 + 2, 0.25 + 1.75, 0.75 + 1.25, 1 + 1), shuffled; they round to 0 or +-1."""
    n = int(np.prod(shape))
    pairs = np.array([[0, 2], [0.25, 1.75], [0.75, 1.25], [1, 1]])[rng.integers(0, 4, n // 2)]
    mags = rng.permutation(pairs.reshape(-1))
    return (mags * rng.choice([-1, 1], n) / 32).reshape(shape)


def ternarize(w):
    """transformers' WeightQuant recipe in float32 -> (ternary int tensor, s = 1/mean|w|)."""
    import torch

    w = w.float()
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return (w * s).round().clamp(-1, 1), s


def pack_checkpoint(src: Path, dst: Path) -> Path:
    """The checkpoint at src in Microsoft's packed form: every projection ternarized, packed by
    transformers' `pack_weights` (uint8 [out/4, in]) with weight_scale = s in bf16, and the
    bitnet quantization_config; one safetensors file."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers.integrations.bitnet import pack_weights

    dst.mkdir(parents=True, exist_ok=True)
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_file(f))
    packed = {}
    for name, t in state.items():
        if name.rsplit(".", 2)[-2] in LINEARS:
            q, s = ternarize(t)
            packed[name] = pack_weights(q.to(torch.int8))
            packed[name.replace(".weight", ".weight_scale")] = s.reshape(1).to(torch.bfloat16)
        else:
            packed[name] = t
    save_file(packed, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = PACKED_QUANT
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
            shutil.copy(f, dst / f.name)
    return dst


def hf_model(ckpt: Path):
    """transformers' BitNetForCausalLM (float32, eager attention) on the checkpoint: BitLinear
    for the packed form, AutoBitLinear in online mode (absmean ternarization in the forward)
    for master weights; activations quantized per token, to int8, in both."""
    import torch
    from safetensors.torch import load_file
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import replace_with_bitnet_linear
    from transformers.utils.quantization_config import BitNetQuantConfig

    config = BitNetConfig.from_pretrained(ckpt)
    config._attn_implementation = "eager"
    raw = json.loads((ckpt / "config.json").read_text()).get("quantization_config")
    model = BitNetForCausalLM(config).to(torch.float32)
    qc = (BitNetQuantConfig(linear_class="bitlinear", quantization_mode="offline") if raw
          else BitNetQuantConfig(linear_class="autobitlinear", quantization_mode="online"))
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=qc)
    state = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        for k, v in load_file(f).items():
            state[k] = v if v.dtype == torch.uint8 else v.float()
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.lm_head.weight = model.model.embed_tokens.weight  # tie_word_embeddings
    model.eval()
    return model


def hf_logits(ckpt: Path, tokens) -> np.ndarray:
    """Causal logits [T, vocab] of transformers on the checkpoint."""
    import torch

    model = hf_model(ckpt)
    ids = torch.tensor([list(tokens)])
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        return model(input_ids=ids, use_cache=False).logits[0].float().numpy()
