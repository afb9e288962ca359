"""Time `dlmnumba convert` on a BitNet b1.58 2B-4T-shaped bf16 checkpoint: wall time and peak
resident memory of the converting process, for each qtype.

    python bench/convert.py                       # 2B-4T shape (~4.8 GB bf16), I2_S and TQ2_0
    python bench/convert.py --preset small        # a few seconds, to check the script
    python bench/convert.py --qtypes I2_S --keep /tmp/ckpt --json out.json

The checkpoint is written to a temporary directory (or --keep DIR, reused when it is already
there): config.json as Microsoft's (relu2, tied embeddings, rope 500000), random bf16 master
weights (N(0, 0.02) projections and embedding, norms near 1) in --shards safetensors files with
their index, and a Llama-3-layout tokenizer.json of the full vocabulary (128,000 byte-level BPE
tokens with one synthetic merge each, 256 special tokens from id 128000) plus
tokenizer_config.json with a chat template.  Each conversion runs `python -m dlmnumba convert`
as a child process; its peak RSS is the child's ru_maxrss (os.wait4), its wall time includes
start-up (imports, numba's cached kernels).  Targets (issue 27): under 3 minutes on 2 cores,
peak RSS under 1.5 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlmnumba.gguf.tokenizer import LLAMA3_REGEX, bytes_to_unicode  # noqa: E402
from dlmnumba.synth.vocab import LLAMA3_STYLE_CHAT_TEMPLATE, control_tokens  # noqa: E402

PRESETS = {  # vocab = BPE tokens + 256 specials
    "2b4t": dict(n_bpe=128000, hidden=2560, ff=6912, layers=30, heads=20, kv_heads=5),
    "small": dict(n_bpe=7936, hidden=512, ff=1536, layers=4, heads=8, kv_heads=2),
}
N_SPECIAL = 256
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def tensor_shapes(p: dict) -> dict[str, tuple[int, ...]]:
    """HF name -> shape of every tensor of the checkpoint, in the order they are written."""
    e, f, kv = p["hidden"], p["ff"], p["hidden"] // p["heads"] * p["kv_heads"]
    shapes = {"model.embed_tokens.weight": (p["n_bpe"] + N_SPECIAL, e), "model.norm.weight": (e,)}
    dims = {"q_proj": (e, e), "k_proj": (kv, e), "v_proj": (kv, e), "o_proj": (e, e),
            "gate_proj": (f, e), "up_proj": (f, e), "down_proj": (e, f)}
    for i in range(p["layers"]):
        pre = f"model.layers.{i}."
        for lin in LINEARS:
            shapes[pre + lin + ".weight"] = dims[lin.rsplit(".", 1)[1]]
        for norm, n in (("input_layernorm", e), ("post_attention_layernorm", e),
                        ("self_attn.attn_sub_norm", e), ("mlp.ffn_sub_norm", f)):
            shapes[pre + norm + ".weight"] = (n,)
    return shapes


def bf16_random(rng: np.random.Generator, n: int, scale: float, offset: float) -> np.ndarray:
    """n bf16 values (as uint16 bits) of offset + scale * N(0, 1)."""
    x = rng.standard_normal(n, dtype=np.float32)
    x *= scale
    x += offset
    return (x.view(np.uint32) >> 16).astype(np.uint16)


def write_shard(path: Path, shapes: dict[str, tuple[int, ...]], rng: np.random.Generator) -> None:
    """A safetensors file of bf16 tensors, written tensor by tensor (chunks of 16M values)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            norm = name.endswith("norm.weight")
            left = int(np.prod(shape))
            while left:
                n = min(left, 1 << 24)
                bf16_random(rng, n, 0.1 if norm else 0.02, 1.0 if norm else 0.0).tofile(fh)
                left -= n


def write_tokenizer(out: Path, n_bpe: int, rng: np.random.Generator) -> None:
    """tokenizer.json (Llama-3 layout: byte-level BPE, its pre-tokenizer, specials from id
    n_bpe) and tokenizer_config.json.  The merges are synthetic: each new token joins an
    earlier one and a byte, so every merge is valid and the vocabulary is full size."""
    alphabet = [bytes_to_unicode()[b] for b in range(256)]
    vocab, merges = {t: i for i, t in enumerate(alphabet)}, []
    tokens = list(alphabet)
    while len(tokens) < n_bpe:
        a, b = tokens[int(rng.integers(len(tokens)))], alphabet[int(rng.integers(256))]
        if len(a) < 10 and a + b not in vocab:
            vocab[a + b] = len(tokens)
            tokens.append(a + b)
            merges.append([a, b])
    specials = control_tokens(N_SPECIAL)[:-1]  # Llama-3's 256, without the mask token
    bos, eot = specials[0], specials[9]
    spec = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": n_bpe + i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i, t in enumerate(specials)],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_REGEX}, "behavior": "Isolated",
             "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                      {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                                    {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}},
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [n_bpe],
                                                    "tokens": [bos]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": merges},
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eot, "chat_template": LLAMA3_STYLE_CHAT_TEMPLATE,
         "tokenizer_class": "PreTrainedTokenizerFast"}), encoding="utf-8")


def write_checkpoint(out: Path, p: dict, shards: int, seed: int = 0) -> None:
    """The whole checkpoint directory."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    n_vocab = p["n_bpe"] + N_SPECIAL
    config = {"architectures": ["BitNetForCausalLM"], "model_type": "bitnet",
              "hidden_act": "relu2", "hidden_size": p["hidden"], "intermediate_size": p["ff"],
              "num_hidden_layers": p["layers"], "num_attention_heads": p["heads"],
              "num_key_value_heads": p["kv_heads"], "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": True,
              "vocab_size": n_vocab, "bos_token_id": p["n_bpe"], "eos_token_id": p["n_bpe"] + 1,
              "torch_dtype": "bfloat16"}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(out, p["n_bpe"], rng)
    shapes = tensor_shapes(p)
    names = list(shapes)
    sizes = np.cumsum([np.prod(shapes[n]) for n in names])
    cut = np.searchsorted(sizes, sizes[-1] * np.arange(1, shards) / shards)
    groups = np.split(np.arange(len(names)), cut)
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    weight_map = {}
    for file, group in zip(files, groups):
        part = {names[i]: shapes[names[i]] for i in group}
        write_shard(out / file, part, rng)
        weight_map.update({n: file for n in part})
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": int(sizes[-1]) * 2}, "weight_map": weight_map}, indent=2))


def timed_convert(ckpt: Path, out: Path, qtype: str) -> dict:
    """Run `dlmnumba convert` in a child; its wall time, peak RSS and output size."""
    cmd = [sys.executable, "-m", "dlmnumba", "convert", str(ckpt), str(out), "--qtype", qtype]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as so, tempfile.TemporaryFile() as se:  # no pipe to fill
        child = subprocess.Popen(cmd, cwd=ROOT, stdout=so, stderr=se)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - t0
        so.seek(0), se.seek(0)
        stdout, stderr = so.read().decode(), se.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"convert failed: {stderr.strip()}")
    return {"qtype": qtype, "wall_s": round(wall, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024),
            "out_mib": round(out.stat().st_size / 2**20, 1), "summary": stdout.strip()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", choices=list(PRESETS), default="2b4t")
    ap.add_argument("--qtypes", default="I2_S,TQ2_0")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the checkpoint here")
    ap.add_argument("--json", type=Path, help="write the results as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="dlmnumba-convert-") as tmp:
        ckpt = args.keep or Path(tmp) / "ckpt"
        if not (ckpt / "model.safetensors.index.json").exists():
            t0 = time.perf_counter()
            write_checkpoint(ckpt, PRESETS[args.preset], args.shards)
            print(f"wrote the checkpoint in {time.perf_counter() - t0:.1f} s", flush=True)
        size = sum(f.stat().st_size for f in ckpt.iterdir()) / 2**30
        print(f"checkpoint {ckpt}: preset {args.preset}, {size:.2f} GiB", flush=True)
        results = []
        for qtype in args.qtypes.split(","):
            r = timed_convert(ckpt, Path(tmp) / f"out-{qtype}.gguf", qtype)
            results.append(r)
            print(f"{qtype}: {r['wall_s']:.1f} s wall, peak RSS {r['peak_rss_mib']} MiB, "
                  f"output {r['out_mib']} MiB", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "checkpoint_gib": size,
                                         "cpu_count": os.cpu_count(), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
