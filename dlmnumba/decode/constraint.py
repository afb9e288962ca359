"""Structured output: a grammar over the model's vocabulary that masks the LM head's candidates.

The schema-to-token-mask step is llguidance's (Microsoft's Rust grammar engine, used by vLLM
and SGLang): it compiles a JSON Schema (or "any JSON object") into a grammar and, given the
text decided so far, computes the set of tokens that keep it completable.  A request with a
`Grammar` asks its passes for logits and commits, per position and left to right, the most
likely token the mask allows (decode/requests.py `Request._constrained`), advancing the matcher
over decided text only.

Why llguidance: it takes any tokenizer as a list of token byte strings (ours comes from the
GGUF file, not from Hugging Face), builds its token trie in milliseconds (0.002 s for the
bundled model's vocabulary), computes a mask into a numpy bitmask, supports most of JSON
Schema and reports what it does not implement (refused here with a 400 naming it), and needs
neither torch nor transformers at run time.  xgrammar's tokenizer info is built from a
Hugging Face tokenizer and its masks from torch tensors; outlines-core builds its index from a
Hugging Face vocabulary too.
"""
from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass

import numpy as np

from ..errors import DecodeError

# compact JSON: no free whitespace between tokens (fewer tokens, fewer choices per position)
JSON_OPTIONS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Grammar:
    """A compiled grammar: llguidance's grammar text, and what it was made from."""

    source: str  # llguidance's serialized grammar
    description: str  # for messages: "JSON", "JSON schema"

    @classmethod
    @functools.cache  # a fixed grammar: compiled and checked once
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's response_format json_object)."""
        return cls.json_schema({"type": "object"}, "JSON object")

    @classmethod
    def json_schema(cls, schema: dict | str, description: str = "JSON schema",
                    field: str = "response_format") -> "Grammar":
        """A JSON Schema's grammar; a schema llguidance cannot compile (an unimplemented keyword,
        a dangling $ref) is a DecodeError naming the problem."""
        llg = _llguidance()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise DecodeError(f"the JSON schema is not valid JSON: {e}", field) from None
        if not isinstance(schema, dict):
            raise DecodeError(f"a JSON schema must be an object, got {type(schema).__name__}",
                              field)
        try:
            source = llg.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except Exception as e:  # noqa: BLE001 - llguidance's message names the problem
            raise DecodeError(f"the JSON schema cannot be compiled: {e}", field) from None
        bad, messages = llg.LLMatcher.validate_grammar_with_warnings(source)
        if bad:
            raise DecodeError(f"the JSON schema cannot be compiled: {'; '.join(messages)}",
                              field)
        return cls(source, description)


class Constraint:
    """One request's matcher of a Grammar over a model's vocabulary."""

    def __init__(self, grammar: Grammar, tokenizer, n_vocab: int, eog: frozenset[int]):
        llg = _llguidance()
        self.grammar, self.n_vocab = grammar, n_vocab
        self.matcher = llg.LLMatcher(_lltokenizer(tokenizer, n_vocab, eog), grammar.source)
        if self.matcher.is_error():
            raise DecodeError(f"the {grammar.description} grammar: {self.matcher.get_error()}",
                              "response_format")
        self._words = (n_vocab + 31) // 32

    def allowed(self, matcher=None) -> np.ndarray:
        """bool[n_vocab]: the tokens that keep the decided text completable (end-of-generation
        tokens only where it is complete)."""
        m = self.matcher if matcher is None else matcher
        bits = np.empty(self._words, np.int32)
        m.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return np.unpackbits(bits.view(np.uint8), bitorder="little")[:self.n_vocab].astype(bool)

    def fork(self):
        """A copy of the matcher (to walk a pass's positions before committing them)."""
        return self.matcher.deep_copy()

    def consume(self, token: int, matcher=None) -> None:
        m = self.matcher if matcher is None else matcher
        if not m.consume_token(int(token)):
            raise DecodeError(f"token {token} does not continue the {self.grammar.description}"
                              f": {m.get_error()}")

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (generation ends)."""
        return self.matcher.is_stopped()


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a dependency of the package: only a broken install lacks it
        raise DecodeError(f"structured output needs llguidance ({e})") from None
    return llguidance


_TOKENIZERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _lltokenizer(tokenizer, n_vocab: int, eog: frozenset[int]):
    """llguidance's tokenizer of ours (built once per tokenizer object: a token trie)."""
    key = (n_vocab, tuple(sorted(eog)))
    cached = _TOKENIZERS.get(tokenizer, {})
    if key not in cached:
        llg = _llguidance()

        class _Vocab:  # what llguidance.TokenizerWrapper reads
            eos_token_id = min(eog) if eog else None
            bos_token_id = tokenizer.bos_id
            tokens = [tokenizer.token_bytes(i) for i in range(tokenizer.n_vocab)]
            tokens += [b""] * (n_vocab - len(tokens))
            special_token_ids = [i for i in range(tokenizer.n_vocab) if tokenizer.is_special(i)]

            def __call__(self, text):
                if isinstance(text, bytes):
                    text = text.decode("utf-8", "replace")
                return tokenizer.encode(text, add_bos=False)

        cached[key] = llg.LLTokenizer(llg.TokenizerWrapper(_Vocab()), n_vocab=n_vocab,
                                      eos_token=sorted(eog) or None)
        _TOKENIZERS[tokenizer] = cached
    return cached[key]
