"""convert(): plan every tensor of a checkpoint (names, dtypes and shapes checked before the
output file is created), then stream them into the GGUF file one at a time."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CheckpointError, ConfigError
from ..gguf import quants
from ..gguf.ggml_types import I2_S, TERNARY
from ..synth.models import add_shape_metadata, add_ternary_tensor_info, write_atomically
from ..synth.vocab import add_vocab_metadata
from . import weights
from .checkpoint import FLOATS, PACKED, Checkpoint, TensorEntry
from .tokenizer import read_vocab

ARCHS = {"bitnet-b1.58": "relu2", "bitnet": "silu"}  # --arch -> the activation it computes
DEFAULT_ARCH = {act: arch for arch, act in ARCHS.items()}
# llama.cpp's LLAMA_FTYPE_MOSTLY_TQ1_0 / TQ2_0, bitnet.cpp's MOSTLY_I2_S (its official GGUF)
FILE_TYPES = {"TQ1_0": 36, "TQ2_0": 37, "I2_S": 40}
# Hugging Face name -> GGUF name; in a layer, "{}" is its index
GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                "lm_head.weight": "output"}
LAYER_NORMS = {"input_layernorm": "attn_norm", "self_attn.attn_sub_norm": "attn_sub_norm",
               "post_attention_layernorm": "ffn_norm", "mlp.ffn_sub_norm": "ffn_sub_norm"}
LAYER_LINEARS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down"}
IGNORED = (".rotary_emb.inv_freq",)  # buffers some checkpoints carry; recomputed by readers


RECOMMENDED = {  # decode-setting keys a file may carry, as the bundled toy model writes them
    "diffusion.block_size": "uint32", "diffusion.small_block_size": "uint32",
    "diffusion.threshold": "float32", "diffusion.decode_mode": "string"}


@dataclass(frozen=True)
class Job:
    """One output tensor: its GGUF name, shape and type, and what makes its bytes."""

    name: str
    shape: tuple[int, ...]  # numpy order ([rows, cols])
    ggml_type: int
    nbytes: int
    produce: Callable[[], Any]  # -> numpy array or weights.ChunkedTensor of nbytes bytes

    @property
    def ternary(self) -> bool:
        """Whether this is a ternary projection."""
        return self.ggml_type in TERNARY.values()

    def register(self, w) -> None:
        """Add the tensor's info (no data) to a gguf.GGUFWriter."""
        import gguf

        if self.ternary:
            add_ternary_tensor_info(w, self.name, *self.shape, self.ggml_type)
        elif self.ggml_type == gguf.GGMLQuantizationType.BF16:
            w.add_tensor_info(self.name, self.shape, np.dtype(np.float32), self.nbytes,
                              raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            dtype = np.float32 if self.ggml_type == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(self.name, self.shape, np.dtype(dtype), self.nbytes)


@dataclass(frozen=True)
class Converted:
    """What convert() wrote."""

    path: Path
    qtype: str
    arch: str
    form: str  # "master" (ternarized here) or "packed" (unpacked)
    n_tensors: int
    n_ternary: int  # ternary weights written
    mask_id: int | None
    mask_added: bool


def convert(src: str | os.PathLike, out: str | os.PathLike, qtype: str = "TQ2_0",
            arch: str | None = None, embd_type: str = "F16", mask_token: str | None = None,
            shift_logits: bool = True, recommended: Mapping[str, Any] | None = None,
            progress: bool = False) -> Converted:
    """Convert the Hugging Face BitNet checkpoint directory src to the GGUF file out.

    recommended: decode settings to store (`diffusion.block_size`, `.small_block_size`,
    `.threshold`, `.decode_mode`, already checked by the caller).  Every check that needs no
    tensor data runs before out is created; the file is written as out.part and renamed at
    the end, and removed on any error."""
    import gguf

    if qtype not in TERNARY:
        raise ConfigError(f"qtype {qtype!r}: expected one of {', '.join(TERNARY)}")
    if embd_type not in weights.EMBD_TYPES:
        raise ConfigError(f"embd_type {embd_type!r}: expected one of "
                          f"{', '.join(weights.EMBD_TYPES)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"{out}: is a directory; expected the path of the GGUF file to write")
    with Checkpoint(src) as ck:
        cfg = ck.config
        if arch is None:
            arch = DEFAULT_ARCH[cfg.activation]
        if arch not in ARCHS:
            raise ConfigError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
        if ARCHS[arch] != cfg.activation:
            raise ConfigError(f"--arch {arch} computes a {ARCHS[arch]} FFN but "
                              f"{ck.root / 'config.json'} has hidden_act {cfg.activation}; "
                              f"use --arch {DEFAULT_ARCH[cfg.activation]}")
        vocab = read_vocab(ck.root, cfg.shape.n_vocab, cfg.bos_id, cfg.eos_id, mask_token)
        jobs = _plan(ck, TERNARY[qtype], qtype, embd_type)

        w = gguf.GGUFWriter(str(out), arch)
        w.add_name(ck.root.name)
        w.add_file_type(FILE_TYPES[qtype])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_shape_metadata(w, cfg.shape, shift_logits)
        for key, value in (recommended or {}).items():
            _add_recommended(w, key, value)
        add_vocab_metadata(w, vocab.vocab, vocab.pre, vocab.add_bos)
        if vocab.chat_template:
            w.add_chat_template(vocab.chat_template)
        for job in jobs:
            job.register(w)
        write_atomically(w, out, data=_stream(jobs, progress))
    n_ternary = sum(r * c for j in jobs if j.ternary for r, c in [j.shape])
    return Converted(out, qtype, arch, cfg.form, len(jobs), n_ternary, vocab.vocab.mask_id,
                     vocab.mask_added)


def _add_recommended(w, key: str, value: Any) -> None:
    kind = RECOMMENDED.get(key)
    if kind is None:
        raise ConfigError(f"recommended setting {key!r}: expected one of {', '.join(RECOMMENDED)}")
    getattr(w, f"add_{kind}")(key, value)


def _stream(jobs: list[Job], progress: bool) -> Iterator[Any]:
    """Each tensor's bytes in order, made only when the writer asks for it."""
    from tqdm import tqdm

    bar = tqdm(jobs, desc="converting", unit="tensor", disable=not progress, leave=False)
    for job in bar:
        bar.set_postfix_str(job.name, refresh=False)
        yield job.produce()


def _plan(ck: Checkpoint, qt: int, qtype: str, embd_type: str) -> list[Job]:
    """Every output tensor, in llama.cpp's order; all missing, unexpected or misshapen
    checkpoint tensors are reported at once, before anything is written."""
    import gguf

    cfg, p = ck.config, ck.config.shape
    fmt = quants.ternary_format(qt)
    problems: list[str] = []
    used: set[str] = set()

    def entry(hf: str, shape: tuple[int, ...], dtypes: tuple[str, ...]) -> TensorEntry | None:
        e = ck.tensors.get(hf)
        used.add(hf)
        if e is None:
            problems.append(f"missing tensor '{hf}'")
        elif e.dtype not in dtypes or e.shape != shape:
            problems.append(f"tensor '{hf}' is {e.dtype} {list(e.shape)}; expected "
                            f"{'/'.join(dtypes)} {list(shape)}")
        else:
            return e
        return None

    embd_ggml = gguf.GGMLQuantizationType[embd_type]
    jobs: list[Job] = []

    def floats(hf: str, name: str, rows: int, cols: int) -> None:
        e = entry(hf, (rows, cols), FLOATS)
        nbytes = weights.float_nbytes(rows, cols, embd_type)
        where = _where(e, hf)
        jobs.append(Job(name, (rows, cols), embd_ggml, nbytes, lambda: weights.ChunkedTensor(
            nbytes, lambda: weights.float_chunks(lambda a, b: ck.read(hf, (a, b)), rows, cols,
                                                 embd_type, where))))

    def norm(hf: str, name: str, n: int) -> None:
        e = entry(hf, (n,), FLOATS)
        jobs.append(Job(name, (n,), gguf.GGMLQuantizationType.F32, 4 * n,
                        lambda: weights.norm_f32(ck.read(hf), _where(e, hf))))

    def linear(hf: str, name: str, rows: int, cols: int) -> None:
        if cfg.form == PACKED:
            e = entry(hf + ".weight", (rows // 4, cols), ("U8",))
            es = ck.tensors.get(hf + ".weight_scale")
            used.add(hf + ".weight_scale")
            if es is None or es.dtype not in FLOATS or es.shape not in ((1,), ()):
                problems.append(f"tensor '{hf}.weight_scale' is "
                                f"{'missing' if es is None else f'{es.dtype} {list(es.shape)}'}"
                                f"; expected {'/'.join(FLOATS)} [1]")

            def read():
                return weights.unpack_packed(ck.read(hf + ".weight"),
                                             ck.read(hf + ".weight_scale"),
                                             _where(e, hf + ".weight"))
        else:
            e = entry(hf + ".weight", (rows, cols), FLOATS)

            def read():
                return weights.absmean_ternary(ck.read(hf + ".weight"), _where(e, hf + ".weight"))

        def produce():
            codes, d = read()
            if qt == I2_S:
                return quants.encode_ternary(qt, codes, np.array([d], np.float32))
            weights.check_tq_scale(d, _where(e, hf + ".weight"), qtype)
            return quants.encode_ternary(qt, codes, np.full((rows, cols // quants.QK_K),
                                                            np.float16(d), np.float32))

        if cols % fmt.row_multiple or rows * cols % fmt.total_multiple:
            raise CheckpointError(
                f"{ck.root / 'config.json'}: '{hf}.weight' is [{rows}, {cols}]; {qtype} needs "
                f"rows of a multiple of {fmt.row_multiple} values and a multiple of "
                f"{fmt.total_multiple} in all" + ("; use --qtype I2_S" if qt != I2_S else ""))
        if cfg.form == PACKED and rows % 4:
            problems.append(f"'{hf}.weight' has {rows} output rows; the packed form needs a "
                            "multiple of 4")
        jobs.append(Job(f"{name}.weight", (rows, cols), qt,
                        quants.tensor_nbytes(qt, rows * cols), produce))

    kv = p.n_embd // p.n_head * p.n_head_kv
    dims = {"attn_q": (p.n_embd, p.n_embd), "attn_k": (kv, p.n_embd),
            "attn_v": (kv, p.n_embd), "attn_output": (p.n_embd, p.n_embd),
            "ffn_gate": (p.n_ff, p.n_embd), "ffn_up": (p.n_ff, p.n_embd),
            "ffn_down": (p.n_embd, p.n_ff)}
    floats("model.embed_tokens.weight", "token_embd.weight", p.n_vocab, p.n_embd)
    norm("model.norm.weight", "output_norm.weight", p.n_embd)
    # Tied: the embedding is the head (transformers ignores a stored lm_head then).  A
    # checkpoint without lm_head.weight is tied whatever config.json says, as bitnet.cpp's
    # converter assumes: an untied head that was never saved has no weights to convert.
    if cfg.tied or "lm_head.weight" not in ck.tensors:
        used.add("lm_head.weight")
    else:
        floats("lm_head.weight", "output.weight", p.n_vocab, p.n_embd)
    for i in range(p.n_layer):
        hf, gg = f"model.layers.{i}.", f"blk.{i}."
        for part, name in LAYER_NORMS.items():
            norm(hf + part + ".weight", gg + name + ".weight",
                 p.n_ff if name == "ffn_sub_norm" else p.n_embd)
        for part, name in LAYER_LINEARS.items():
            linear(hf + part, gg + name, *dims[name])
    extra = sorted(n for n in ck.tensors if n not in used and not n.endswith(IGNORED))
    problems += [f"unexpected tensor '{n}'" for n in extra]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{ck.root}: {'; '.join(problems[:3])}{more}; expected the "
                              f"tensors of a {cfg.form}-form BitNetForCausalLM of config.json's "
                              "shape")
    return jobs


def _where(e: TensorEntry | None, hf: str) -> str:
    """A tensor's place for messages: its file and name."""
    return f"{e.file if e is not None else '?'}: tensor '{hf}'"
