"""Tokenizer and synthetic-vocabulary tests.

Oracles: the `gguf` package (file round trip), Hugging Face `tokenizers` (byte-level alphabet and
decoder), hand-checked regex splits, and llama.cpp's own tokenizer via llama-cpp-python.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tokenizers import decoders, pre_tokenizers

from dlmnumba.errors import ConfigError, ModelFormatError
from dlmnumba.gguf.tokenizer import (
    PRE_TOKENIZERS,
    Tokenizer,
    build_pre_tokenizer,
    bytes_to_unicode,
)
from dlmnumba.synth.vocab import (
    LLAMA3_STYLE_CHAT_TEMPLATE,
    SynthVocab,
    add_tokenizer_metadata,
    build_synth_vocab,
    chat_template_for,
    min_vocab_size,
)

ROUND_TRIP_TEXTS = [
    "",
    "Hello, world!",
    "What is the meaning of life?",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends\r\n",
    "Deutsch: Größe, Straße, Äpfel. Français : « déjà vu » à l'œil.",
    "Español: ¿Qué tal? ¡Muy bien! Русский: съешь же ещё этих булок.",
    "中文：你好，世界。日本語：こんにちは、世界！한국어: 안녕하세요",
    "العربية: مرحبا بالعالم. हिन्दी: नमस्ते दुनिया। עברית: שלום",
    "Thai (not in the corpus): สวัสดีครับ, Georgian: გამარჯობა",
    "emoji 🎉🥳 family 👨‍👩‍👧‍👦 flags 🇩🇪🇯🇵 skin 👋🏽 keycap 1️⃣",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F 1,000,000",
    "def f(x):\n    return x ** 2  # square\n\n\tif (a && b) { c[i] <<= 2; }",
    "it's they'll we'd I'M YOU'RE shouldn't've",
    "odd\u200bspace\u00a0nbsp \u3000ideographic\x00nul\x7fdel",
]


def write_gguf(path: Path, vocab: SynthVocab, arch: str = "bitnet",
               pre: str | None = None) -> Path:
    """A minimal GGUF file (synthetic vocab, a few hparams, one dummy F32 tensor)."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(256)
    writer.add_embedding_length(64)
    writer.add_block_count(1)
    writer.add_feed_forward_length(128)
    writer.add_head_count(4)
    writer.add_head_count_kv(4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(vocab.vocab_size)
    add_tokenizer_metadata(writer, vocab)
    if pre is not None:
        # GGUFWriter keeps its key/values in a per-shard dict; replace the pre-tokenizer name.
        writer.kv_data[0][gguf.Keys.Tokenizer.PRE] = gguf.GGUFValue(pre, gguf.GGUFValueType.STRING)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read_metadata(path: Path) -> dict[str, object]:
    """GGUF key/values as a plain dict (str, int, float, bool, lists), read with gguf's reader."""
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def synth_metadata(vocab: SynthVocab) -> dict[str, object]:
    """The metadata dict `add_tokenizer_metadata` would write, without a file."""
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "llama-bpe",
        "tokenizer.ggml.tokens": list(vocab.tokens),
        "tokenizer.ggml.token_type": np.array(vocab.token_types, dtype=np.int32),
        "tokenizer.ggml.merges": list(vocab.merges),
        "tokenizer.ggml.bos_token_id": np.uint32(vocab.bos_id),
        "tokenizer.ggml.eos_token_id": vocab.eos_id,
        "tokenizer.ggml.eot_token_id": vocab.eot_id,
        "tokenizer.ggml.mask_token_id": vocab.mask_id,
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.fixture(scope="module")
def vocab1024() -> SynthVocab:
    return build_synth_vocab(1024)


@pytest.fixture(scope="module")
def gguf1024(tmp_path_factory: pytest.TempPathFactory, vocab1024: SynthVocab) -> Path:
    return write_gguf(tmp_path_factory.mktemp("tok") / "synth1024.gguf", vocab1024)


@pytest.fixture(scope="module")
def tok1024(gguf1024: Path) -> Tokenizer:
    return Tokenizer.from_metadata(read_metadata(gguf1024), str(gguf1024))


# --- file round trip and text round trip -------------------------------------------------


def test_gguf_metadata_round_trip(gguf1024: Path, vocab1024: SynthVocab) -> None:
    meta = read_metadata(gguf1024)
    assert meta["tokenizer.ggml.tokens"] == vocab1024.tokens
    assert meta["tokenizer.ggml.token_type"] == vocab1024.token_types
    assert meta["tokenizer.ggml.merges"] == vocab1024.merges
    assert meta["tokenizer.ggml.mask_token_id"] == vocab1024.mask_id
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == LLAMA3_STYLE_CHAT_TEMPLATE


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_round_trip(tok1024: Tokenizer, text: str) -> None:
    ids = tok1024.encode(text, add_bos=False)
    assert all(0 <= i < tok1024.n_vocab and not tok1024.is_special(i) for i in ids)
    assert tok1024.decode(ids) == text
    with_bos = tok1024.encode(text)
    assert with_bos == [tok1024.bos_id, *ids]
    assert tok1024.decode(with_bos) == text


def test_bpe_actually_merges(tok1024: Tokenizer) -> None:
    text = "Afterwards the children felt happy."
    ids = tok1024.encode(text, add_bos=False)
    # Byte tokens alone would need one id per byte; trained merges must shorten common prose.
    assert len(ids) < len(text.encode()) // 2


def test_byte_alphabet_matches_tokenizers() -> None:
    assert sorted(bytes_to_unicode().values()) == sorted(pre_tokenizers.ByteLevel.alphabet())


def test_token_bytes_match_hf_byte_level_decoder(tok1024: Tokenizer) -> None:
    decoder = decoders.ByteLevel()
    checked = 0
    for i in range(tok1024.n_vocab):
        if tok1024.is_special(i):
            continue
        raw = tok1024.token_bytes(i)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # partial UTF-8 sequence; the HF decoder would substitute U+FFFD
        assert decoder.decode([tok1024.token_text(i)]) == text, i
        checked += 1
    assert checked > 700


def test_stream_decoder_holds_back_split_characters(tok1024: Tokenizer) -> None:
    text = "emoji 🎉 and 日本語 done"
    ids = tok1024.encode(text, add_bos=False)
    stream = tok1024.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    # Byte tokens of the emoji arrive one at a time: some pushes must yield nothing yet.
    assert "" in pieces
    pieces.append(stream.flush())
    assert "".join(pieces) == text
    special = tok1024.stream_decoder()
    assert special.push(tok1024.eot_id) == ""
    assert tok1024.stream_decoder(skip_special=False).push(tok1024.eot_id) == "<|eot_id|>"


# --- special tokens, BOS ---------------------------------------------------------------


def test_special_tokens_are_single_tokens(tok1024: Tokenizer, vocab1024: SynthVocab) -> None:
    prompt = "USER: What is the meaning of life?<|eot_id|>ASSISTANT:"
    ids = tok1024.encode(prompt, add_bos=False)
    assert ids.count(vocab1024.eot_id) == 1
    before, after = prompt.split("<|eot_id|>")
    assert ids == (tok1024.encode(before, add_bos=False) + [vocab1024.eot_id]
                   + tok1024.encode(after, add_bos=False))
    assert tok1024.encode("|<MASK>||<MASK>|", add_bos=False) == [vocab1024.mask_id] * 2
    assert tok1024.encode("<|begin_of_text|>", add_bos=False) == [vocab1024.bos_id]
    header = tok1024.encode("<|start_header_id|>user<|end_header_id|>", add_bos=False)
    assert header[0] == tok1024.id_of("<|start_header_id|>")
    assert header[-1] == tok1024.id_of("<|end_header_id|>")
    # An unfinished special token is ordinary text.
    assert vocab1024.eot_id not in tok1024.encode("<|eot_id", add_bos=False)


def test_decode_drops_special_tokens_by_default(tok1024: Tokenizer) -> None:
    text = "hi<|eot_id|> there |<MASK>|!"
    ids = tok1024.encode(text)
    assert tok1024.decode(ids) == "hi there !"
    assert tok1024.decode(ids, skip_special=False) == "<|begin_of_text|>" + text


def test_ids_and_eog(tok1024: Tokenizer, vocab1024: SynthVocab) -> None:
    assert (tok1024.bos_id, tok1024.eos_id, tok1024.eot_id, tok1024.mask_id) == (
        1007, 1008, 1016, 1023)
    assert tok1024.n_vocab == 1024
    assert tok1024.eog_ids == {1008, 1016}
    assert tok1024.token_text(1023) == "|<MASK>|"
    assert tok1024.id_of("|<MASK>|") == 1023
    assert tok1024.id_of("no such token") is None
    assert tok1024.token_type(1023) == gguf.TokenType.CONTROL
    assert tok1024.token_type(0) == gguf.TokenType.NORMAL


def test_eot_falls_back_to_token_text(vocab1024: SynthVocab) -> None:
    meta = synth_metadata(vocab1024)
    del meta["tokenizer.ggml.eot_token_id"]
    del meta["tokenizer.ggml.mask_token_id"]
    tok = Tokenizer.from_metadata(meta, "mem.gguf")
    assert tok.eot_id == vocab1024.eot_id
    assert tok.mask_id is None


def test_add_bos_follows_metadata(vocab1024: SynthVocab) -> None:
    meta = synth_metadata(vocab1024)
    assert Tokenizer.from_metadata(meta, "a.gguf").encode("hi")[0] == vocab1024.bos_id
    meta["tokenizer.ggml.add_bos_token"] = False
    tok = Tokenizer.from_metadata(meta, "b.gguf")
    assert vocab1024.bos_id not in tok.encode("hi")
    assert tok.encode("hi", add_bos=True)[0] == vocab1024.bos_id
    # Key absent: llama.cpp's default, BOS for the Llama-3 pre-tokenizer, none for GPT-2's.
    del meta["tokenizer.ggml.add_bos_token"]
    assert Tokenizer.from_metadata(meta, "c.gguf").add_bos is True
    meta["tokenizer.ggml.pre"] = "gpt-2"
    assert Tokenizer.from_metadata(meta, "d.gguf").add_bos is False


# --- pre-tokenizers ----------------------------------------------------------------------


def _pieces(pre: str, text: str) -> list[str]:
    return [p for p, _ in build_pre_tokenizer(PRE_TOKENIZERS[pre]).pre_tokenize_str(text)]


@pytest.mark.parametrize("text, expected", [
    ("12345", ["123", "45"]),
    ("1234567", ["123", "456", "7"]),
    ("I'm here, they'll GO'S", ["I", "'m", "Ġhere", ",", "Ġthey", "'ll", "ĠGO", "'S"]),
    ("hello   world", ["hello", "ĠĠ", "Ġworld"]),
    ("a\n\nb", ["a", "ĊĊ", "b"]),
    ("(hello) $100", ["(hello", ")", "Ġ$", "100"]),
    ("x=1+2;", ["x", "=", "1", "+", "2", ";"]),
])
def test_llama3_pretokenizer_splits(text: str, expected: list[str]) -> None:
    assert _pieces("llama-bpe", text) == expected


def test_gpt2_and_default_pretokenizers_differ_from_llama3() -> None:
    assert _pieces("gpt-2", "12345 (hello)") == ["12345", "Ġ(", "hello", ")"]
    assert _pieces("default", "12345") == ["123", "45"]


def _tiny_metadata(pre: str) -> dict[str, object]:
    """Byte alphabet plus 'ab', 'bc' (with merges) and 'abc' (no merge leads to it)."""
    tokens = [*sorted(pre_tokenizers.ByteLevel.alphabet()), "bc", "ab", "abc", "<|begin_of_text|>"]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * (len(tokens) - 1) + [3],
        "tokenizer.ggml.merges": ["b c", "a b"],
        "tokenizer.ggml.bos_token_id": len(tokens) - 1,
    }


@pytest.mark.parametrize("pre, expected", [("llama-bpe", ["abc"]), ("gpt-2", ["a", "bc"])])
def test_ignore_merges_only_for_llama3(pre: str, expected: list[str]) -> None:
    # Merge ranks alone split "abc" into a|bc; Llama-3 (ignore_merges) first looks the whole
    # piece up in the vocabulary.
    tok = Tokenizer.from_metadata(_tiny_metadata(pre), "tiny.gguf")
    ids = tok.encode("abc", add_bos=False)
    assert [tok.token_text(i) for i in ids] == expected


# --- synthetic vocabulary ------------------------------------------------------------------


def test_synth_vocab_layout_matches_bitnet_dlm() -> None:
    v = build_synth_vocab(128257)
    assert (v.bos_id, v.eos_id, v.eot_id, v.mask_id) == (128000, 128001, 128009, 128256)
    assert v.tokens[128000:128010] == [
        "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
        "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
        "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
        "<|reserved_special_token_4|>", "<|eot_id|>"]
    assert v.tokens[128255] == "<|reserved_special_token_250|>"
    assert v.tokens[128256] == "|<MASK>|"
    assert set(v.token_types[128000:]) == {gguf.TokenType.CONTROL}
    n_trained = 256 + len(v.merges)
    assert set(v.token_types[:n_trained]) == {gguf.TokenType.NORMAL}
    assert set(v.token_types[n_trained:128000]) == {gguf.TokenType.UNUSED}
    tok = Tokenizer.from_metadata(synth_metadata(v), "big.gguf")  # validates every merge
    ids = tok.encode("What is the meaning of life?<|eot_id|>|<MASK>|")
    assert ids[0] == 128000 and ids[-2:] == [128009, 128256]
    assert max(ids[1:-2]) < n_trained


@pytest.mark.parametrize("size", [min_vocab_size(), 512, 4096, 20000])
def test_synth_vocab_sizes(size: int) -> None:
    v = build_synth_vocab(size)
    assert v.vocab_size == len(v.token_types) == size
    assert len(set(v.tokens)) == size
    assert v.mask_id == size - 1 and v.tokens[-1] == "|<MASK>|"
    assert v.eot_id == v.bos_id + 9 and v.eos_id == v.bos_id + 1
    assert len(v.merges) >= 32
    tok = Tokenizer.from_metadata(synth_metadata(v), f"synth{size}.gguf")
    text = "Good morning! Coffee is ready ☕ 12345"
    assert tok.decode(tok.encode(text)) == text


def test_synth_vocab_too_small() -> None:
    with pytest.raises(ConfigError, match="too small"):
        build_synth_vocab(min_vocab_size() - 1)


def _vocab_digest(v: SynthVocab) -> str:
    return hashlib.sha256(json.dumps([v.tokens, v.token_types, v.merges]).encode()).hexdigest()


def test_synth_vocab_is_deterministic(vocab1024: SynthVocab) -> None:
    again = build_synth_vocab(1024)
    assert again == vocab1024
    again.tokens[0] = "mutated"  # callers get their own lists, not the cached ones
    assert build_synth_vocab(1024) == vocab1024
    # A fresh process (new hash seeds, no cache) must train the very same vocabulary.
    code = ("import hashlib, json; from dlmnumba.synth.vocab import build_synth_vocab; "
            "v = build_synth_vocab(1024); "
            "print(hashlib.sha256(json.dumps([v.tokens, v.token_types, v.merges]).encode())"
            ".hexdigest())")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root, env=env)
    assert out.stdout.strip() == _vocab_digest(vocab1024)


def test_chat_templates(vocab1024: SynthVocab) -> None:
    jinja2 = pytest.importorskip("jinja2")
    messages = [{"role": "user", "content": " What is the meaning of life? "}]
    env = jinja2.Environment()
    text = env.from_string(chat_template_for(vocab1024)).render(
        messages=messages, bos_token="<|begin_of_text|>", add_generation_prompt=True)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                    "What is the meaning of life?<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    no_headers = SynthVocab([t.replace("header", "x") for t in vocab1024.tokens],
                            vocab1024.token_types, vocab1024.merges, vocab1024.bos_id,
                            vocab1024.eos_id, vocab1024.eot_id, vocab1024.mask_id)
    text = env.from_string(chat_template_for(no_headers)).render(
        messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert text == "USER: hi<|eot_id|>ASSISTANT:"


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("key, value, match", [
    ("tokenizer.ggml.model", "llama", "tokenizer.ggml.model.*'llama'.*gpt2"),
    ("tokenizer.ggml.pre", "qwen2", "tokenizer.ggml.pre.*'qwen2'.*llama-bpe"),
    ("tokenizer.ggml.token_type", [1, 1, 1], "tokenizer.ggml.token_type.*3 entries.*1024"),
    ("tokenizer.ggml.token_type", [9] * 1024, "tokenizer.ggml.token_type.*unknown type 9"),
    ("tokenizer.ggml.merges", ["Ġ t", "zz qq"], "tokenizer.ggml.merges.*entry 1 'zz qq'"),
    ("tokenizer.ggml.merges", ["nospace"], "tokenizer.ggml.merges.*'left right'"),
    ("tokenizer.ggml.merges", None, "tokenizer.ggml.merges.*missing"),
    ("tokenizer.ggml.tokens", [], "tokenizer.ggml.tokens.*empty"),
    ("tokenizer.ggml.bos_token_id", 5000, "tokenizer.ggml.bos_token_id.*5000.*outside"),
])
def test_bad_metadata_names_file_and_key(vocab1024: SynthVocab, key: str, value: object,
                                         match: str) -> None:
    meta = synth_metadata(vocab1024)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    with pytest.raises(ModelFormatError, match=match) as err:
        Tokenizer.from_metadata(meta, "/models/broken.gguf")
    assert "/models/broken.gguf" in str(err.value)


def test_add_bos_without_bos_id(vocab1024: SynthVocab) -> None:
    meta = synth_metadata(vocab1024)
    del meta["tokenizer.ggml.bos_token_id"]
    with pytest.raises(ModelFormatError, match="add_bos_token.*bos_token_id"):
        Tokenizer.from_metadata(meta, "x.gguf")
    del meta["tokenizer.ggml.add_bos_token"]  # a mere default does not fail: no BOS is added
    assert Tokenizer.from_metadata(meta, "x.gguf").encode("hi") == \
        Tokenizer.from_metadata(meta, "x.gguf").encode("hi", add_bos=False)


# --- llama.cpp as the oracle ---------------------------------------------------------------

ORACLE_TEXTS = [*ROUND_TRIP_TEXTS, "USER: What is the meaning of life?<|eot_id|>ASSISTANT:",
                "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
                "mask |<MASK>||<MASK>| tail", "<|eot_id", "   \n  \n\n x  ", "'s 'S's ''ll"]


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")


def _llama_vocab(llama_cpp, path: Path):
    model = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return model, model._model.vocab


def _piece(llama_cpp, vocab, token: int, special: bool) -> bytes:
    import ctypes
    buf = ctypes.create_string_buffer(256)
    n = llama_cpp.llama_token_to_piece(vocab, token, buf, len(buf), 0, special)
    assert n >= 0
    return buf.raw[:n]


@pytest.mark.parametrize("size, pre", [(1024, "llama-bpe"), (1024, "gpt-2"), (1024, "default"),
                                       (4096, "llama-bpe"), (128257, "llama-bpe")])
def test_llama_cpp_tokenizes_identically(llama_cpp, tmp_path: Path, size: int, pre: str) -> None:
    vocab = build_synth_vocab(size)
    path = write_gguf(tmp_path / f"synth{size}.gguf", vocab, pre=pre)
    ours = Tokenizer.from_metadata(read_metadata(path), str(path))
    model, _ = _llama_vocab(llama_cpp, path)
    assert model.n_vocab() == ours.n_vocab
    assert (model.token_bos(), model.token_eos()) == (ours.bos_id, ours.eos_id)
    for text in ORACLE_TEXTS:
        # llama.cpp's add_bos=True means "add the specials the file asks for".
        assert model.tokenize(text.encode(), add_bos=True, special=True) == ours.encode(text), text
        assert model.tokenize(text.encode(), add_bos=False, special=True) == \
            ours.encode(text, add_bos=False), text


def test_llama_cpp_pieces_and_eog(llama_cpp, tmp_path: Path) -> None:
    # 4096 tokens: the corpus runs out of merges, so UNUSED padding tokens are covered too.
    vocab = build_synth_vocab(4096)
    path = write_gguf(tmp_path / "synth4096.gguf", vocab)
    ours = Tokenizer.from_metadata(read_metadata(path), str(path))
    assert gguf.TokenType.UNUSED in vocab.token_types
    _, lvocab = _llama_vocab(llama_cpp, path)
    assert llama_cpp.llama_vocab_eot(lvocab) == ours.eot_id
    eog = {i for i in range(ours.n_vocab) if llama_cpp.llama_vocab_is_eog(lvocab, i)}
    assert eog == ours.eog_ids
    for i in range(ours.n_vocab):
        kind = ours.token_type(i)
        assert _piece(llama_cpp, lvocab, i, special=True) == ours.token_bytes(i), i
        expected = ours.token_bytes(i) if kind == gguf.TokenType.NORMAL else b""
        assert _piece(llama_cpp, lvocab, i, special=False) == expected, i
    ids = ours.encode(ROUND_TRIP_TEXTS[10] + "<|eot_id|>")
    assert ours.decode(ids, skip_special=False).encode() == b"".join(
        _piece(llama_cpp, lvocab, i, special=True) for i in ids)


def test_llama_cpp_ignore_merges(llama_cpp, tmp_path: Path) -> None:
    for pre in ("llama-bpe", "gpt-2"):
        meta = _tiny_metadata(pre)
        path = tmp_path / f"tiny-{pre}.gguf"
        writer = gguf.GGUFWriter(str(path), "bitnet")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(meta["tokenizer.ggml.tokens"])
        writer.add_token_types(meta["tokenizer.ggml.token_type"])
        writer.add_token_merges(meta["tokenizer.ggml.merges"])
        writer.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
        writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        ours = Tokenizer.from_metadata(read_metadata(path), str(path))
        model, _ = _llama_vocab(llama_cpp, path)
        for text in ("abc", "xabc abc", "abcabc"):
            assert model.tokenize(text.encode(), add_bos=True, special=True) == ours.encode(text)
