"""Byte-level BPE tokenizer built from GGUF metadata, on top of Hugging Face `tokenizers`.

It reproduces llama.cpp's tokenizer for `tokenizer.ggml.model == "gpt2"` vocabularies
(src/llama-vocab.cpp): the same pre-tokenizer regexes per `tokenizer.ggml.pre`, the same
`ignore_merges` and `add_bos` defaults, and CONTROL / USER_DEFINED tokens recognised in prompt
text as single tokens. Decoding is lossless (no llama.cpp-style `clean_spaces` rewriting), so
decode(encode(s)) == s for any text without special tokens. Decoding maps vocabulary characters
back to bytes with GPT-2's byte table (checked against `tokenizers`' ByteLevel decoder in the
tests), so it can also stream token by token without splitting multi-byte characters.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from dlmnumba.errors import ModelFormatError

K = Keys.Tokenizer

# Pre-tokenizer regexes exactly as llama.cpp uses them (llm_tokenizer_bpe in llama-vocab.cpp).
# Llama-3: llama.cpp spells the case-insensitive contractions `(?i:'s|...)` of tokenizer.json
# out as character classes; the two forms split identically.
LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# llama.cpp's LLAMA_VOCAB_PRE_TYPE_DEFAULT: four regexes applied one after the other, each
# splitting the pieces of the previous one (unmatched stretches stay pieces of their own).
DEFAULT_REGEXES = (
    r"[\p{P}\$\+<=>\^~\|]+",
    GPT2_REGEX,
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How one `tokenizer.ggml.pre` value tokenizes, mirroring llama.cpp's vocab loader."""

    regexes: tuple[str, ...]  # applied in order, each with "isolated" split behaviour
    ignore_merges: bool  # a pre-token that is itself in the vocab becomes one token
    add_bos: bool  # default for `tokenizer.ggml.add_bos_token` when the key is absent


_LLAMA3 = PreTokenizerSpec((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_GPT2 = PreTokenizerSpec((GPT2_REGEX,), ignore_merges=False, add_bos=False)
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "llama-bpe": _LLAMA3,
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "default": PreTokenizerSpec(DEFAULT_REGEXES, ignore_merges=False, add_bos=False),
    "gpt-2": _GPT2,
    # llama.cpp only knows the spelling "gpt-2" and would treat "gpt2" as "default"; we accept
    # it as an alias because converters outside llama.cpp do write it.
    "gpt2": _GPT2,
}
# llama.cpp falls back to "default" (with a warning) when the key is missing.
MISSING_PRE = "default"
SUPPORTED_MODELS = ("gpt2",)

from .spec import (EOG_TEXTS, EOG_TOKEN_TYPES, EOT_TEXT,  # one list for the spec and us
                   meta_ints, meta_scalar, meta_strings)

# How tokens print, as in llama.cpp's token_to_piece for BPE vocabularies: these types as
# their raw text (no byte-level decoding) ...
_RAW_TYPES = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN})
# ... and these as nothing at all.
_SILENT_TYPES = frozenset({TokenType.UNUSED, TokenType.BYTE})
# Token types that `decode(skip_special=True)` drops. USER_DEFINED is dropped too (llama.cpp
# prints it) because the DLM mask token `|<MASK>|` can be USER_DEFINED and must not leak.
_SPECIAL_TYPES = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED, TokenType.UNKNOWN,
                            TokenType.UNUSED, TokenType.BYTE})
# Types parsed out of prompt text as single tokens (llama.cpp tokenizer_st_partition).
_ADDED_TYPES = frozenset({TokenType.CONTROL, TokenType.USER_DEFINED})


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by byte-level BPE vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def build_pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    """Regex splits followed by the byte-level mapping, as a `tokenizers` pre-tokenizer."""
    steps = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in spec.regexes]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _fail(source: str, key: str, problem: str) -> ModelFormatError:
    return ModelFormatError(f"{source}: metadata key '{key}': {problem}")


def _optional_id(meta: Mapping[str, object], key: str, n_vocab: int, source: str) -> int | None:
    token_id = meta_scalar(meta, key, int, source, None)
    if token_id is None:
        return None
    if not 0 <= token_id < n_vocab:
        raise _fail(source, key, f"token id {token_id} is outside the vocabulary [0, {n_vocab})")
    return token_id


class Tokenizer:
    """Text <-> token ids for a GGUF byte-level BPE vocabulary (llama.cpp-compatible)."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[tuple[str, str]],
        pre: str,
        *,
        bos_id: int | None,
        eos_id: int | None,
        eot_id: int | None,
        mask_id: int | None,
        add_bos: bool,
        source: str = "<memory>",
    ) -> None:
        """Build from validated parts; use `from_metadata` for GGUF metadata."""
        self._tokens = list(tokens)
        self._types = [int(t) for t in token_types]
        self._pre = pre
        self._source = source
        self._bos_id, self._eos_id, self._eot_id, self._mask_id = bos_id, eos_id, eot_id, mask_id
        self._add_bos = add_bos
        # Later duplicates win, as in llama.cpp's token_to_id map.
        self._id_of = {text: i for i, text in enumerate(self._tokens)}
        self._bytes: list[bytes | None] = [None] * len(self._tokens)

        spec = PRE_TOKENIZERS[pre]
        model = models.BPE(vocab=self._id_of, merges=list(merges), ignore_merges=spec.ignore_merges)
        hf = HFTokenizer(model)
        hf.pre_tokenizer = build_pre_tokenizer(spec)
        added = [
            AddedToken(text, special=True, normalized=False, single_word=False,
                       lstrip=False, rstrip=False)
            for text, kind in zip(self._tokens, self._types)
            if kind in _ADDED_TYPES and text
        ]
        hf.add_special_tokens(added)
        self._hf = hf

        eog = {i for i in (eos_id, eot_id) if i is not None}
        for text in EOG_TEXTS:
            i = self._id_of.get(text)
            if i is not None and self._types[i] in EOG_TOKEN_TYPES:
                eog.add(i)
        self._eog_ids = frozenset(eog)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, object], source: str) -> Tokenizer:
        """Validate the `tokenizer.*` keys of a GGUF file and build the tokenizer."""
        if K.MODEL not in metadata:
            raise _fail(source, K.MODEL, "missing; this file has no tokenizer")
        model = meta_scalar(metadata, K.MODEL, str, source)
        if model not in SUPPORTED_MODELS:
            raise _fail(source, K.MODEL, f"unsupported tokenizer model {model!r}; "
                        f"supported: {', '.join(SUPPORTED_MODELS)} (byte-level BPE)")
        pre = meta_scalar(metadata, K.PRE, str, source, MISSING_PRE)
        if pre not in PRE_TOKENIZERS:
            raise _fail(source, K.PRE, f"unsupported pre-tokenizer {pre!r}; "
                        f"supported: {', '.join(PRE_TOKENIZERS)}")

        tokens = meta_strings(metadata, K.LIST, source)
        if tokens is None:
            raise _fail(source, K.LIST, "missing; expected a list of token strings")
        if not tokens:
            raise _fail(source, K.LIST, "is empty; expected a list of token strings")
        n_vocab = len(tokens)

        token_types = meta_ints(metadata, K.TOKEN_TYPE, source, n_vocab, K.LIST)
        if token_types is None:
            token_types = [int(TokenType.NORMAL)] * n_vocab  # llama.cpp: absent means NORMAL
        else:
            valid = {int(t) for t in TokenType}
            bad = next((i for i, t in enumerate(token_types) if t not in valid), None)
            if bad is not None:
                raise _fail(source, K.TOKEN_TYPE, f"token {bad} has unknown type "
                            f"{token_types[bad]}; expected one of {sorted(valid)}")

        merges = _parse_merges(meta_strings(metadata, K.MERGES, source), tokens, source)

        bos_id = _optional_id(metadata, K.BOS_ID, n_vocab, source)
        eos_id = _optional_id(metadata, K.EOS_ID, n_vocab, source)
        eot_id = _optional_id(metadata, K.EOT_ID, n_vocab, source)
        if eot_id is None and EOT_TEXT in tokens:
            eot_id = len(tokens) - 1 - tokens[::-1].index(EOT_TEXT)
        mask_id = _optional_id(metadata, K.MASK_ID, n_vocab, source)

        add_bos_value = meta_scalar(metadata, K.ADD_BOS, bool, source, None)
        # llama.cpp's default: BPE vocabularies add no BOS, except the Llama-3 pre-tokenizer family.
        add_bos = PRE_TOKENIZERS[pre].add_bos if add_bos_value is None else add_bos_value
        if add_bos and bos_id is None:
            if add_bos_value is not None:
                raise _fail(source, K.ADD_BOS, f"is true but '{K.BOS_ID}' is missing")
            add_bos = False  # a default cannot ask for a token the file does not have

        return cls(tokens, token_types, merges, pre, bos_id=bos_id, eos_id=eos_id,
                   eot_id=eot_id, mask_id=mask_id, add_bos=add_bos, source=source)

    # --- encoding / decoding -------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text` (special-token texts become single ids), BOS per add_bos_token.

        Text that cannot be UTF-8 encoded (lone surrogates, e.g. from undecodable bytes read
        with errors="surrogateescape") is a ValueError naming the first bad character."""
        if not isinstance(text, str):
            raise TypeError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text to encode is not valid Unicode: the character at index "
                             f"{e.start}, {text[e.start]!r}, is a lone surrogate (from undecodable "
                             "input bytes?); expected text that encodes as UTF-8") from None
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if self._add_bos if add_bos is None else add_bos:
            if self._bos_id is None:
                raise ValueError(f"{self._source}: cannot add BOS, the vocabulary has no BOS token")
            ids.insert(0, self._bos_id)
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` prints as (raw UTF-8 for special tokens, none for unused)."""
        cached = self._bytes[token_id]
        if cached is None:
            text = self._tokens[token_id]
            kind = self._types[token_id]
            if kind in _SILENT_TYPES:
                cached = b""
            elif kind in _RAW_TYPES:
                cached = text.encode("utf-8")
            else:
                # A character outside the byte alphabet means a malformed vocab entry: keep its
                # UTF-8 text rather than losing it.
                cached = b"".join(
                    bytes((_UNICODE_TO_BYTE[c],)) if c in _UNICODE_TO_BYTE else c.encode("utf-8")
                    for c in text
                )
            self._bytes[token_id] = cached
        return cached

    def is_special(self, token_id: int) -> bool:
        """True for tokens that `decode(skip_special=True)` drops (every type but NORMAL)."""
        return self._types[token_id] in _SPECIAL_TYPES

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless skip_special is False."""
        n = len(self._tokens)
        parts = []
        for i in ids:
            i = int(i)
            if not 0 <= i < n:
                raise ValueError(f"{self._source}: token id {i} is outside the vocabulary [0, {n})")
            if skip_special and self._types[i] in _SPECIAL_TYPES:
                continue
            parts.append(self.token_bytes(i))
        return b"".join(parts).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special: bool = True) -> StreamDecoder:
        """An incremental decoder: push ids one at a time, get text; split UTF-8 is held back."""
        return StreamDecoder(self, skip_special)

    # --- vocabulary facts ----------------------------------------------------------------

    @property
    def n_vocab(self) -> int:
        """Number of tokens in the vocabulary."""
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        """Beginning-of-sequence token id, if the file names one."""
        return self._bos_id

    @property
    def eos_id(self) -> int | None:
        """End-of-sequence token id, if the file names one."""
        return self._eos_id

    @property
    def eot_id(self) -> int | None:
        """End-of-turn token id: the file's eot_token_id, else the id of `<|eot_id|>`, else None."""
        return self._eot_id

    @property
    def mask_id(self) -> int | None:
        """Mask token id from `tokenizer.ggml.mask_token_id`, else None (no auto-detection here)."""
        return self._mask_id

    @property
    def eog_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS, EOT and special tokens such as `<|eom_id|>`."""
        return self._eog_ids

    @property
    def add_bos(self) -> bool:
        """Whether `encode` prepends BOS by default."""
        return self._add_bos

    @property
    def pre(self) -> str:
        """The `tokenizer.ggml.pre` value in use."""
        return self._pre

    def token_text(self, token_id: int) -> str:
        """The raw vocabulary string of a token (byte-level form for normal tokens)."""
        return self._tokens[token_id]

    def token_type(self, token_id: int) -> TokenType:
        """The GGUF token type of a token."""
        return TokenType(self._types[token_id])

    def id_of(self, text: str) -> int | None:
        """Id of the token whose raw vocabulary string is `text`, or None."""
        return self._id_of.get(text)

    def __repr__(self) -> str:
        return (f"Tokenizer(source={self._source!r}, n_vocab={self.n_vocab}, pre={self._pre!r}, "
                f"bos={self._bos_id}, eos={self._eos_id}, eot={self._eot_id}, "
                f"mask={self._mask_id})")


class StreamDecoder:
    """Incremental detokenizer: push ids, get the text that is complete so far."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = True) -> None:
        """Start an empty stream over `tokenizer`."""
        self._tok = tokenizer
        self._skip = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Feed one id; return the newly completed text (may be empty mid-character)."""
        if self._skip and self._tok.is_special(token_id):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token_id))

    def flush(self) -> str:
        """End the stream; an unfinished UTF-8 sequence becomes U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _parse_merges(raw: list[str] | None, tokens: list[str],
                  source: str) -> list[tuple[str, str]]:
    """Split "left right" merge strings the way llama.cpp does and check they name tokens."""
    if raw is None:
        raise _fail(source, K.MERGES, "missing; byte-level BPE needs its merge list")
    vocab = set(tokens)
    merges = []
    for n, merge in enumerate(raw):
        # llama.cpp searches the separator from position 1, so a merge may start with a space.
        cut = merge.find(" ", 1)
        if cut < 0:
            raise _fail(source, K.MERGES, f"entry {n} {merge!r} is not of the form 'left right'")
        left, right = merge[:cut], merge[cut + 1:]
        for part in (left, right, left + right):
            if part not in vocab:
                raise _fail(source, K.MERGES, f"entry {n} {merge!r} refers to {part!r}, "
                            f"which is not in '{K.LIST}'")
        merges.append((left, right))
    return merges
