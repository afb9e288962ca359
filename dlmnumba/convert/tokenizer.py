"""tokenizer.json + tokenizer_config.json -> the GGUF vocabulary our reader and llama.cpp need.

Byte-level BPE only (Llama-3 / BitNet b1.58 2B-4T, GPT-2 style).  Token types follow
llama.cpp's converter: BPE vocabulary NORMAL, added tokens CONTROL (special) or USER_DEFINED,
embedding rows without a token UNUSED `[PADn]`.  The pre-tokenizer is recognised by what it
does (its splits of a probe text equal one of ours), and before anything is written the
vocabulary is checked end to end: our Tokenizer built from it encodes the probe text and every
added token exactly as the Hugging Face tokenizer does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import TokenType

from ..errors import CheckpointError
from ..gguf.spec import EOT_TEXT, MASK_TOKEN_TEXT
from ..gguf.tokenizer import PRE_TOKENIZERS, build_pre_tokenizer, bytes_to_unicode
from ..synth.vocab import SynthVocab, vocab_tokenizer

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves the template
PAD_TEXT = "[PAD{}]"  # llama.cpp's converter's text for embedding rows without a token
CANDIDATE_PRES = ("llama-bpe", "gpt-2")  # GGUF pre-tokenizer names we can recognise
# Text whose pre-tokenization tells the regexes apart (contractions, digit runs, scripts,
# whitespace runs, punctuation next to letters and newlines).
PROBE = ("Hello, world!  It's  I'M they'll we'd   123 4567 89012 3.14159 -42 x1y22z333\n\n\n"
         "\t tabs\tand  \r\n crlf  Größe déjà-vu 中文字符 日本語 한국어 Русский العربية 🎉🥳\n"
         "def f(x):\n    return x**2  # (a && b) || c[i] <<= 2;  'quoted' \"double\" ... !!!\n"
         "   trailing   ")


@dataclass(frozen=True)
class HFVocab:
    """A checkpoint's vocabulary in GGUF form."""

    vocab: SynthVocab  # tokens (one per embedding row), types, merges, special ids
    pre: str  # tokenizer.ggml.pre
    add_bos: bool  # tokenizer.ggml.add_bos_token
    chat_template: str | None
    mask_added: bool  # the mask token was added by --mask-token (it was not in the tokenizer)


def _fail(where: Path | str, problem: str) -> CheckpointError:
    return CheckpointError(f"{where}: {problem}")


def read_vocab(root: Path, n_rows: int, bos_id: int | None, eos_id: int | None,
               mask_token: str | None = None) -> HFVocab:
    """The vocabulary of the checkpoint at root for an embedding of n_rows rows; bos_id and
    eos_id (config.json's) apply when tokenizer_config.json names no such token."""
    from tokenizers import Tokenizer as HFTokenizer

    path = root / TOKENIZER_JSON
    if not path.is_file():
        raise _fail(path, "missing; expected the Hugging Face tokenizer (tokenizer.json)")
    try:
        text = path.read_text(encoding="utf-8")
        spec, hf = json.loads(text), HFTokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise _fail(path, f"not a Hugging Face tokenizer file ({str(e)[:120]})") from None
    tconf = _tokenizer_config(root)
    model = spec.get("model") or {}
    _check_byte_level_bpe(spec, model, path)
    pre = _recognise_pre(hf, path)

    tokens: list[str | None] = [None] * n_rows
    types = [int(TokenType.UNUSED)] * n_rows

    def put(i: int, text: str, kind: TokenType, what: str) -> None:
        if not (isinstance(i, int) and 0 <= i < n_rows):
            raise _fail(path, f"{what} {text!r} has id {i}; the checkpoint's embedding has "
                        f"{n_rows} rows (ids 0..{n_rows - 1})")
        if tokens[i] is not None and tokens[i] != text:
            raise _fail(path, f"id {i} is both {tokens[i]!r} and {text!r}")
        tokens[i], types[i] = text, int(kind)

    for text, i in model["vocab"].items():
        put(i, text, TokenType.NORMAL, "token")
    added = spec.get("added_tokens") or []
    for tok in added:
        if tok.get("lstrip") or tok.get("rstrip") or tok.get("single_word"):
            raise _fail(path, f"added token {tok.get('content')!r} sets lstrip, rstrip or "
                        "single_word; expected none (GGUF vocabularies cannot carry them)")
        put(tok.get("id"), tok.get("content"),
            TokenType.CONTROL if tok.get("special") else TokenType.USER_DEFINED, "added token")
    n_tok = max((i for i, t in enumerate(tokens) if t is not None), default=-1) + 1
    ids = {t: i for i, t in enumerate(tokens) if t is not None}
    b2u = bytes_to_unicode()

    def id_of(text: str) -> int | None:  # added tokens by text, BPE tokens by byte-level form
        found = ids.get(text)
        if found is None or types[found] == int(TokenType.NORMAL):
            found = ids.get("".join(b2u[b] for b in text.encode("utf-8")))
        return found

    def named(key: str, fallback: int | None) -> int | None:
        text = _token_text(tconf.get(key))
        if text is None:
            return fallback if fallback is not None and 0 <= fallback < n_tok else None
        found = id_of(text)
        if found is None:
            raise _fail(root / TOKENIZER_CONFIG, f"'{key}' {text!r} is not a token of "
                        f"{TOKENIZER_JSON}")
        return found

    bos, eos = named("bos_token", bos_id), named("eos_token", eos_id)
    eot = id_of(EOT_TEXT) if EOT_TEXT in ids else None
    mask_text = mask_token or _token_text(tconf.get("mask_token"))
    mask, mask_added = (id_of(mask_text) if mask_text else None), False
    if mask_text and mask is None:
        if mask_token is None:
            raise _fail(root / TOKENIZER_CONFIG, f"'mask_token' {mask_text!r} is not a token "
                        f"of {TOKENIZER_JSON}")
        if n_tok >= n_rows:
            raise CheckpointError(
                f"--mask-token {mask_token!r}: the tokenizer has no such token and the "
                f"checkpoint's embedding has no spare row for it ({n_rows} rows, all taken by "
                "tokens); expected a checkpoint fine-tuned with its mask token")
        mask, mask_added = n_tok, True  # the first row without a token: the fine-tune's row
        tokens[mask], types[mask] = mask_token, int(TokenType.CONTROL)
    elif mask is None and MASK_TOKEN_TEXT in ids:
        mask = ids[MASK_TOKEN_TEXT]
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = PAD_TEXT.format(i)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    vocab = SynthVocab(tokens, types, merges, bos, eos, eot, mask)
    out = HFVocab(vocab, pre, _add_bos(tconf, spec, tokens, bos), _chat_template(root, tconf),
                  mask_added)
    _check_round_trip(out, hf, added, path)
    return out


def _tokenizer_config(root: Path) -> dict[str, Any]:
    path = root / TOKENIZER_CONFIG
    if not path.is_file():
        raise _fail(path, "missing; expected the tokenizer's settings (BOS/EOS, chat template)")
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(path, f"not valid JSON ({e})") from None
    if not isinstance(conf, dict):
        raise _fail(path, "expected a JSON object")
    return conf


def _check_byte_level_bpe(spec: dict, model: dict, path: Path) -> None:
    """Refuse what a GGUF `gpt2` vocabulary cannot express."""
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"model type {model.get('type')!r} (expected BPE)")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or \
            model.get("end_of_word_suffix"):
        problems.append("byte_fallback, continuing_subword_prefix or end_of_word_suffix set")
    if not isinstance(model.get("vocab"), dict):
        problems.append("no model.vocab")
    if spec.get("normalizer") is not None:
        problems.append(f"a normalizer ({spec['normalizer'].get('type')})")
    if (spec.get("decoder") or {}).get("type") != "ByteLevel":
        problems.append(f"decoder {(spec.get('decoder') or {}).get('type')!r} (expected "
                        "ByteLevel)")
    if problems:
        raise _fail(path, "not a byte-level BPE tokenizer: " + "; ".join(problems) +
                    "; expected one like Llama-3's (BitNet b1.58 2B-4T) or GPT-2's")


def _recognise_pre(hf, path: Path) -> str:
    """The GGUF pre-tokenizer name whose splits of PROBE equal the tokenizer's own."""
    if hf.pre_tokenizer is None:
        raise _fail(path, "has no pre_tokenizer; expected Llama-3's or GPT-2's byte-level one")
    theirs = [p for p, _ in hf.pre_tokenizer.pre_tokenize_str(PROBE)]
    for name in CANDIDATE_PRES:
        ours = build_pre_tokenizer(PRE_TOKENIZERS[name]).pre_tokenize_str(PROBE)
        if [p for p, _ in ours] == theirs:
            return name
    raise _fail(path, "its pre_tokenizer splits text unlike Llama-3's (llama-bpe) or GPT-2's "
                "(gpt-2); expected one of those")


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json token entry: a string or {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _add_bos(tconf: dict, spec: dict, tokens: list[str], bos: int | None) -> bool:
    """tokenizer_config.json's add_bos_token, else whether the post-processor's template for
    one sequence starts with the BOS token (as Llama-3's TemplateProcessing does)."""
    if isinstance(tconf.get("add_bos_token"), bool):
        return tconf["add_bos_token"] and bos is not None
    if bos is None:
        return False
    stack = [spec.get("post_processor") or {}]
    while stack:
        proc = stack.pop()
        if proc.get("type") == "Sequence":
            stack.extend(proc.get("processors") or [])
        elif proc.get("type") == "TemplateProcessing":
            first = (proc.get("single") or [{}])[0]
            return (first.get("SpecialToken") or {}).get("id") == tokens[bos]
    return False


def _chat_template(root: Path, tconf: dict) -> str | None:
    """chat_template.jinja, else tokenizer_config.json's chat_template (a string, or a list of
    named templates: the one named "default")."""
    file = root / CHAT_TEMPLATE_FILE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    value = tconf.get("chat_template")
    if isinstance(value, list):
        value = next((t.get("template") for t in value
                      if isinstance(t, dict) and t.get("name") == "default"), None)
    return value if isinstance(value, str) and value else None


def _check_round_trip(v: HFVocab, hf, added: list[dict], path: Path) -> None:
    """Our Tokenizer on this vocabulary must encode like the Hugging Face tokenizer."""
    try:
        ours = vocab_tokenizer(v.vocab, v.pre, add_bos=False)
    except Exception as e:  # noqa: BLE001 - e.g. a merge naming a token the vocab lacks
        raise _fail(path, f"its vocabulary and merges do not form a BPE model ({e})") from None
    texts = [PROBE] + [f"a{t['content']}b {t['content']} " for t in added]
    for text in texts:
        want = hf.encode(text, add_special_tokens=False).ids
        got = ours.encode(text, add_bos=False)
        if got != want:
            raise _fail(path, f"dlmnumba's tokenizer would encode {text[:40]!r} as "
                        f"{got[:8]}..., the Hugging Face tokenizer as {want[:8]}...; "
                        "this tokenizer is not supported")
