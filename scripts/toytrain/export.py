"""GGUF export of the torch model (I2_S projections, its recommended decode settings), and
back: the torch model of a toy GGUF file and its logits, the oracle of the parity tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dlmnumba.gguf import quants
from dlmnumba.synth.models import add_i2s_tensor, add_shape_metadata, write_atomically
from dlmnumba.synth.vocab import add_tokenizer_metadata, build_char_vocab, seed_chat_template

from .model import ARCH, Shape, ToyDLM, block_mask, ternarize

__all__ = ["DEFAULT_DECODE", "export_gguf", "load_gguf", "torch_logits"]

# Decode settings the export records when no evaluation chose others.
DEFAULT_DECODE = {"decode_mode": "iterative", "block_size": 32, "small_block_size": 8,
                  "threshold": 0.9}


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
