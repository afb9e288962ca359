"""`dlmnumba convert`: Hugging Face BitNet checkpoints (made here with transformers, nothing
downloaded) to GGUF, checked against transformers, llama.cpp and the HF tokenizer.

Tolerance against transformers (same per-token int8 activation scheme as ours): the logits of
the whole sequence have cosine >= 0.9999, and the top-1 token is the same on every row computed
from the same int8 activations, ~95% elsewhere.  Int8 activation quantization is discontinuous:
a value within float32 noise of a rounding tie (k + 0.5) may round one way here and the other
in torch, and that row and every later one (causal attention) then differ by ~1e-2 relative
(tests/test_parity.py measures the same); rows before such a flip agree to ~1e-6.  A tie in the
last layer moves its own row only.  Measured on eight 48-token runs (token seeds 0-7, 2-core AMD
EPYC): cosine >= 0.99996, rows from the same codes 3e-7, 4 to 48 of 48 rows before the first
flip (the test's seed: 47, a last-layer tie at row 0), top-1 >= 0.979; transformers' own
BitLinear (packed) and AutoBitLinear (master) forwards of the same weights differ the same way
on the same row.  The checkpoints keep their norm weights in float32
and their projections' absmean exactly 2^-5 (hf_checkpoints.make_bitnet says why); the absmean
recipe on ordinary Gaussian bf16 weights is checked weight by weight.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import dlmnumba  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from dlmnumba.cli import main  # noqa: E402
from dlmnumba.gguf import quants  # noqa: E402
from dlmnumba.gguf.ggml_types import TERNARY  # noqa: E402
from dlmnumba.gguf.reader import GGUFFile  # noqa: E402
from dlmnumba.gguf.tokenizer import Tokenizer  # noqa: E402
from hf_checkpoints import (CORPUS, make_bitnet, pack_checkpoint, hf_logits,  # noqa: E402
                            hf_model)

QTYPES = ("TQ1_0", "TQ2_0", "I2_S")
N_TOKENS = 48
COS_MIN = 0.9999
EXACT_ROW = 1e-4  # a row this close to the reference was computed from the same int8 codes
TOP1_MIN = 0.95
EXACT_SHARE = 0.5  # rows computed from the same int8 codes (seed 0 here: 47 of 48)


def convert(*args: str):
    return CliRunner().invoke(main, ["convert", *map(str, args)], catch_exceptions=False)


def converted(src: Path, out: Path, *opts: str) -> Path:
    r = convert(src, out, *opts)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out} ") and r.stdout.count("\n") == 1, r.stdout
    return out


def tokens(n: int = N_TOKENS, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(0, 360, n).tolist()


def compare(ours: np.ndarray, ref: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(flattened cosine, per-row relative error, per-row top-1 agreement)."""
    cos = float((ours * ref).sum() / np.linalg.norm(ours) / np.linalg.norm(ref))
    rows = np.linalg.norm(ours - ref, axis=1) / np.linalg.norm(ref, axis=1)
    return cos, rows, ours.argmax(1) == ref.argmax(1)


def assert_matches(ours: np.ndarray, ref: np.ndarray) -> None:
    cos, rows, same = compare(ours, ref)
    assert cos >= COS_MIN, cos
    exact = rows < EXACT_ROW
    assert exact.mean() >= EXACT_SHARE and same[exact].all(), (rows, same)
    assert same.mean() >= TOP1_MIN, same.mean()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Checkpoints made once: name -> directory (each in its own parent, named `ckpt`, so that
    general.name, which is the directory's name, is the same for all)."""
    root = tmp_path_factory.mktemp("hf")
    made = {}

    def get(name: str, **kw) -> Path:
        if name not in made:
            made[name] = (pack_checkpoint(get(kw.pop("packed_from")), root / name / "ckpt")
                          if "packed_from" in kw else make_bitnet(root / name / "ckpt", **kw))
        return made[name]

    return get


def test_master_weights_logits_match_transformers(ckpts, tmp_path):
    """bf16 master weights, each qtype: dlmnumba on the GGUF vs transformers' BitNetForCausalLM
    (AutoBitLinear, online absmean ternarization) on the checkpoint."""
    ck = ckpts("exact", exact_scales=True)
    toks = tokens()
    ref = hf_logits(ck, toks)
    for qtype in QTYPES:
        out = converted(ck, tmp_path / f"{qtype}.gguf", "--qtype", qtype)
        m = dlmnumba.load_model(str(out))
        assert m.spec.arch == "bitnet-b1.58" and m.spec.activation == "relu2"
        kinds = {t.qtype for n, t in GGUFFile(str(out)).tensors.items() if n.startswith("blk.")
                 and n.endswith(("_q.weight", "_down.weight"))}
        assert kinds == {TERNARY[qtype]}
        assert_matches(m.logits(toks), ref)


def test_absmean_ternarization_matches_transformers(ckpts, tmp_path):
    """Gaussian bf16 weights: every projection in the GGUF has transformers' WeightQuant(W)
    codes and scale: I2_S's f32 scale to 2 ulp (torch sums mean|W| in float32, we in float64),
    TQ2_0's to its f16 rounding."""
    import torch
    from transformers.integrations.bitnet import WeightQuant

    ck = ckpts("gauss", exact_scales=False)
    model = hf_model(ck)
    files = {q: GGUFFile(str(converted(ck, tmp_path / f"{q}.gguf", "--qtype", q)))
             for q in ("I2_S", "TQ2_0")}
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    for i, layer in enumerate(model.model.layers):
        for part, name in names.items():
            lin = getattr(layer.self_attn if name.startswith("attn") else layer.mlp, part)
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                want = WeightQuant.apply(lin.weight).numpy()
            d = np.abs(want).max()
            for qtype, f in files.items():
                t = f.tensors[f"blk.{i}.{name}.weight"]
                got = quants.dequantize(t.qtype, f.data(t.name), tuple(t.shape))
                assert np.array_equal(np.sign(got), np.sign(want)), (qtype, t.name)
                tol = 2 * np.spacing(np.float32(d)) if qtype == "I2_S" else d * 2 ** -11
                assert np.abs(np.abs(got).max() - d) <= tol, (qtype, t.name)
    cos, rows, same = compare(dlmnumba.load_model(files["I2_S"].path).logits(tokens()),
                              hf_logits(ck, tokens()))
    assert cos >= COS_MIN and same.mean() >= TOP1_MIN, (cos, same.mean())


def test_packed_form_converts_to_the_same_file(ckpts, tmp_path):
    """Microsoft's packed form of the same weights (transformers' pack_weights, weight_scale in
    bf16) gives byte-identical GGUFs; transformers' BitLinear on it is the oracle."""
    master = ckpts("exact", exact_scales=True)
    packed = ckpts("exact-packed", packed_from="exact")
    assert json.loads((packed / "config.json").read_text())["quantization_config"][
        "quant_method"] == "bitnet"
    toks = tokens()
    ref = hf_logits(packed, toks)
    # the same model in transformers (BitLinear's int8 matmul vs AutoBitLinear's float one
    # round the odd near-tie apart, as ours does)
    assert_matches(hf_logits(master, toks), ref)
    for qtype in QTYPES:
        a = converted(master, tmp_path / f"master-{qtype}.gguf", "--qtype", qtype)
        b = converted(packed, tmp_path / f"packed-{qtype}.gguf", "--qtype", qtype)
        assert a.read_bytes() == b.read_bytes(), qtype
    assert_matches(dlmnumba.load_model(str(b)).logits(toks), ref)


def test_llamacpp_loads_the_bitnet_arch_output_of_a_silu_checkpoint(ckpts, tmp_path):
    """SiLU -> arch `bitnet` by default; llama.cpp's logits on that TQ2_0 file agree with ours.
    hidden = intermediate = 256, so each matmul input row is one Q8_K block and llama.cpp's
    activation quantization is our per-token one (test_decode.py's seed replay does the same);
    its F16 LM head and its rounding of ties differ, so tolerances as in test_parity.py."""
    pytest.importorskip("llama_cpp")
    from oracles import llamacpp_logits

    ck = ckpts("silu", hidden_act="silu", ff=256, exact_scales=True)
    out = converted(ck, tmp_path / "silu.gguf", "--qtype", "TQ2_0")
    m = dlmnumba.load_model(str(out))
    assert m.spec.arch == "bitnet" and m.spec.activation == "silu"
    toks = tokens()
    ours = m.logits(toks)
    cos, rows, same = compare(ours, llamacpp_logits(str(out), toks))
    assert cos >= COS_MIN and rows.max() < 0.05 and same.mean() >= 0.9, (cos, rows.max(),
                                                                          same.mean())
    assert_matches(ours, hf_logits(ck, toks))


def test_sharded_checkpoint(ckpts, tmp_path):
    """A sharded set with its index (all bf16, norms too) converts to the same file as one
    safetensors file of the same weights."""
    sharded = ckpts("sharded", f32_norms=False, tie_free=False, shard_size="100KB")
    single = ckpts("single", f32_norms=False, tie_free=False)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 3
    a = converted(sharded, tmp_path / "a.gguf", "--qtype", "I2_S")
    b = converted(single, tmp_path / "b.gguf", "--qtype", "I2_S")
    assert a.read_bytes() == b.read_bytes()
    # all-bf16 checkpoints meet rounding ties early: the parity tolerance of test_parity.py
    _, rows, same = compare(dlmnumba.load_model(str(a)).logits(tokens()),
                            hf_logits(sharded, tokens()))
    assert rows.max() < 0.03 and same.mean() >= 0.9, (rows.max(), same.mean())


def corpus_texts() -> list[str]:
    """Corpus paragraphs with the special and added tokens spliced in."""
    from hf_checkpoints import ADDED, SPECIALS

    paras = [p for p in CORPUS.read_text(encoding="utf-8").split("\n\n") if p.strip()][:60]
    extra = SPECIALS + ADDED
    return [p[:len(p) // 2] + extra[i % len(extra)] + p[len(p) // 2:] + ("\n" * (i % 3))
            for i, p in enumerate(paras)] + ["", " ", "Größe 🎉 x1y22", "<|eot_id|><tool_call>"]


def test_tokenizer_round_trip(ckpts, tmp_path):
    """The GGUF's tokenizer encodes and decodes like the HF tokenizer, special and added tokens
    included; special ids, BOS handling and the chat template carried over."""
    from transformers import AutoTokenizer

    ck = ckpts("exact", exact_scales=True)
    f = GGUFFile(str(converted(ck, tmp_path / "t.gguf")))
    ours = Tokenizer.from_metadata(f.metadata, f.path)
    hf = AutoTokenizer.from_pretrained(ck)
    n_rows = f.tensors["token_embd.weight"].shape[0]
    assert ours.n_vocab == n_rows == len(hf) + 8  # spare rows: [PADn] UNUSED tokens
    assert ours.token_text(n_rows - 1) == f"[PAD{n_rows - 1}]"
    assert (ours.bos_id, ours.eos_id) == (hf.bos_token_id, hf.eos_token_id)
    assert ours.eot_id == hf.convert_tokens_to_ids("<|eot_id|>") and ours.add_bos
    assert f.metadata["tokenizer.chat_template"] == hf.chat_template
    assert f.metadata["tokenizer.ggml.pre"] == "llama-bpe"
    texts = corpus_texts()
    for text in texts:
        ids = hf(text)["input_ids"]  # BOS by the post-processor
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special=False) == hf.decode(ids), text
    assert sum(len(hf(t)["input_ids"]) for t in texts) > 3000


def test_mask_token(ckpts, tmp_path):
    """The tokenizer's own mask token; one added on the checkpoint's spare embedding row (with
    the recommended decode settings); refused when no row is spare."""
    from transformers import AutoTokenizer

    own = ckpts("own-mask", mask="|<MASK>|")
    hf_id = json.loads((own / "tokenizer.json").read_text())
    hf_id = next(t["id"] for t in hf_id["added_tokens"] if t["content"] == "|<MASK>|")
    m = dlmnumba.load_model(str(converted(own, tmp_path / "own.gguf", "--mask-token",
                                          "|<MASK>|")))
    assert m.spec.mask_id == hf_id

    ck = ckpts("exact", exact_scales=True)
    out = converted(ck, tmp_path / "added.gguf", "--mask-token", "|<MASK>|", "--mode",
                    "iterative", "--block-size", "32", "--small-block-size", "8",
                    "--threshold", "0.9", "--no-shift-logits")
    f = GGUFFile(str(out))
    md = f.metadata
    mask = md["tokenizer.ggml.mask_token_id"]
    assert mask == len(AutoTokenizer.from_pretrained(ck))  # the first spare row
    assert md["tokenizer.ggml.tokens"][mask] == "|<MASK>|"
    assert md["tokenizer.ggml.token_type"][mask] == 3  # CONTROL
    assert (md["diffusion.decode_mode"], md["diffusion.block_size"],
            md["diffusion.small_block_size"]) == ("iterative", 32, 8)
    assert md["diffusion.shift_logits"] is False
    assert abs(md["diffusion.threshold"] - 0.9) < 1e-6
    row = hf_model(ck).model.embed_tokens.weight[mask].detach().numpy()
    assert np.array_equal(f.array("token_embd.weight")[mask], row.astype(np.float16))
    assert dlmnumba.load_model(str(out)).spec.mask_id == mask

    full = ckpts("no-spare", spare_rows=0)
    bad = tmp_path / "none.gguf"
    r = convert(full, bad, "--mask-token", "|<MASK>|")
    assert r.exit_code == 2 and "no spare row" in r.stderr and r.stderr.count("\n") == 1
    assert not bad.exists() and not list(tmp_path.glob("*.part"))


def _rewrite(ck: Path, edit) -> None:
    """Apply edit(state dict of torch tensors) to the checkpoint's one safetensors file."""
    from safetensors.torch import load_file, save_file

    f = ck / "model.safetensors"
    state = load_file(f)
    edit(state)
    save_file(state, f, metadata={"format": "pt"})


def _config(ck: Path, **changes) -> None:
    c = json.loads((ck / "config.json").read_text())
    c.update(changes)
    (ck / "config.json").write_text(json.dumps(c))


def _truncate(ck: Path) -> None:
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])


def _retype(state):
    import torch

    state[K] = state[K].to(torch.int32)


def _transpose(state):
    state[K] = state[K].T.contiguous()


def _nan(state):
    state[DOWN][3, 5] = float("nan")


K = "model.layers.0.self_attn.k_proj.weight"
DOWN = "model.layers.1.mlp.down_proj.weight"  # the last projection written: fails mid-file
BAD_INPUTS = {  # case -> (corrupt the copy, options, what the message must say)
    "another architecture": (lambda ck: _config(ck, architectures=["LlamaForCausalLM"]), (),
                             "'architectures' is ['LlamaForCausalLM']; expected"),
    "another quantization": (lambda ck: _config(ck, quantization_config={"quant_method": "gptq"}),
                             (), "quant_method' is 'gptq'; expected"),
    "unexpected dtype": (lambda ck: _rewrite(ck, _retype), (),
                         f"tensor '{K}' is I32 [128, 256]; expected BF16/F16/F32 [128, 256]"),
    "unexpected shape": (lambda ck: _rewrite(ck, _transpose), (),
                         f"tensor '{K}' is BF16 [256, 128]; expected BF16/F16/F32 [128, 256]"),
    "missing tensor": (lambda ck: _rewrite(ck, lambda s: s.pop(K)), (), f"missing tensor '{K}'"),
    "truncated file": (_truncate, (), "not a valid safetensors file"),
    "activation vs arch": (lambda ck: None, ("--arch", "bitnet"),
                           "--arch bitnet computes a silu FFN but"),
    "non-finite weight": (lambda ck: _rewrite(ck, _nan), (),
                          f"tensor '{DOWN}': non-finite value nan at index [3, 5]"),
    "missing tokenizer": (lambda ck: (ck / "tokenizer.json").unlink(), (),
                          "tokenizer.json: missing"),
    "TQ row length": (lambda ck: None, ("--qtype", "TQ2_0"),
                      "needs rows of a multiple of 256 values"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_leaves_no_file(ckpts, tmp_path, case):
    corrupt, opts, expected = BAD_INPUTS[case]
    # 384-wide FFN rows are no whole TQ blocks
    src = ckpts("ff384", ff=384) if case == "TQ row length" else ckpts("gauss", exact_scales=False)
    ck = tmp_path / "ckpt"
    shutil.copytree(src, ck)
    corrupt(ck)
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    r = convert(ck, out, *opts)
    assert r.exit_code == 2, (r.exit_code, r.stdout, r.stderr)
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert expected in r.stderr, r.stderr
    assert not list(out.parent.iterdir())  # neither the file nor its .part


def test_interrupted_conversion_leaves_no_file(ckpts, tmp_path, monkeypatch):
    """Ctrl-C (KeyboardInterrupt) while the last projection is converted: the .part file, by
    then holding every earlier tensor, is removed and nothing is left under the output name."""
    from dlmnumba.convert import weights
    from dlmnumba.convert.writer import convert as convert_checkpoint

    ck, real, seen = ckpts("gauss", exact_scales=False), weights.absmean_ternary, []

    def interrupted(w, where):
        seen.append(where)
        if where.endswith(f"'{DOWN}'"):
            assert (tmp_path / "m.gguf.part").stat().st_size > 0
            raise KeyboardInterrupt
        return real(w, where)

    monkeypatch.setattr(weights, "absmean_ternary", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(ck, tmp_path / "m.gguf", qtype="I2_S")
    assert len(seen) == 14 and not list(tmp_path.iterdir())
