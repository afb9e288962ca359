"""Deterministic, license-clean byte-level BPE vocabularies for synthetic test/benchmark models.

The BPE part is trained with Hugging Face `tokenizers` on `dlmnumba/data/corpus.txt` (original
text written for this project) with the Llama-3 pre-tokenizer; the special tokens follow the
layout of Llama-3 / BitNet b1.58 2B-4T and its DLM fine-tunes:

    ids 0 .. n_bpe-1          byte-level BPE: 256 single-byte tokens, then one token per merge,
                              then (if the corpus runs out of merges) UNUSED padding tokens
    n_bpe + 0                 <|begin_of_text|>   BOS
    n_bpe + 1                 <|end_of_text|>     EOS
    n_bpe + 2 .. n_bpe + 5    <|reserved_special_token_0..3|>
    n_bpe + 6, n_bpe + 7      <|start_header_id|>, <|end_header_id|>
    n_bpe + 8                 <|reserved_special_token_4|>
    n_bpe + 9                 <|eot_id|>          EOT
    n_bpe + 10 .. V - 2       <|reserved_special_token_5|> ...
    V - 1                     |<MASK>|            mask (diffusion)

The control block has Llama-3's 256 tokens when vocab_size >= FULL_BLOCK_MIN_VOCAB and 16
otherwise, so vocab_size 128257 gives exactly the real ids (BOS 128000, EOS 128001, EOT 128009,
MASK 128256) while small test vocabularies keep most of their ids for BPE tokens.

The corpus yields only a few thousand merges. Larger BPE regions are filled with UNUSED tokens
`<|synth_unused_N|>`: llama.cpp loads them (tokens need no merge leading to them), the Llama-3
pre-tokenizer can never produce them as one piece, so they are never produced by encoding, and
both llama.cpp and our decoder print nothing for them.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from gguf import GGUFWriter, TokenType
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from ..errors import ConfigError
from ..gguf.spec import EOT_TEXT, MASK_TOKEN_TEXT as MASK_TEXT
from ..gguf.tokenizer import PRE_TOKENIZERS, build_pre_tokenizer

CORPUS_PATH = Path(__file__).resolve().parent.parent / "data" / "corpus.txt"
PRE = "llama-bpe"
N_BYTE_TOKENS = 256
LLAMA3_CONTROL_BLOCK = 256  # <|begin_of_text|> .. <|reserved_special_token_250|>
SMALL_CONTROL_BLOCK = 16
FULL_BLOCK_MIN_VOCAB = 16384
MIN_MERGES = 32
# A pair seen once is noise, not a word piece; such merges only make tokenization brittle.
MIN_PAIR_FREQUENCY = 2

BOS_TEXT = "<|begin_of_text|>"
EOS_TEXT = "<|end_of_text|>"
HEADER_START_TEXT = "<|start_header_id|>"
HEADER_END_TEXT = "<|end_header_id|>"
# Offsets of the named tokens inside the control block (Llama-3's order).
_NAMED_IN_BLOCK = {0: BOS_TEXT, 1: EOS_TEXT, 6: HEADER_START_TEXT, 7: HEADER_END_TEXT,
                   9: EOT_TEXT}

# Llama-3-style chat template (written for this project; no system-date preamble).
LLAMA3_STYLE_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)
# Fallback for vocabularies without header tokens: "USER: hi<|eot_id|>ASSISTANT:".
SIMPLE_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- message['role'] | upper + ': ' + message['content'] + '{end}' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


@dataclass
class SynthVocab:
    """A complete GGUF vocabulary: tokens, their types, BPE merges and the special ids."""

    tokens: list[str]  # byte-level strings for BPE tokens, raw text for special ones
    token_types: list[int]  # gguf.TokenType values: 1 normal, 3 control, 5 unused
    merges: list[str]  # "left right", in rank order
    bos_id: int | None
    eos_id: int | None
    eot_id: int | None
    mask_id: int | None

    @property
    def vocab_size(self) -> int:
        """Number of tokens."""
        return len(self.tokens)


def control_block_size(vocab_size: int) -> int:
    """Number of Llama-3-style control tokens (BOS .. reserved) for a vocabulary size."""
    return LLAMA3_CONTROL_BLOCK if vocab_size >= FULL_BLOCK_MIN_VOCAB else SMALL_CONTROL_BLOCK


def min_vocab_size() -> int:
    """Smallest vocab_size `build_synth_vocab` accepts: bytes + a few merges + specials + mask."""
    return N_BYTE_TOKENS + MIN_MERGES + SMALL_CONTROL_BLOCK + 1


def build_synth_vocab(vocab_size: int) -> SynthVocab:
    """The deterministic synthetic vocabulary of `vocab_size` tokens (mask token last)."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ConfigError(f"vocab_size must be an integer, got {vocab_size!r}")
    if vocab_size < min_vocab_size():
        raise ConfigError(f"vocab_size {vocab_size} is too small for a synthetic vocabulary; "
                          f"need at least {min_vocab_size()} (256 byte tokens, {MIN_MERGES} "
                          f"merges, {SMALL_CONTROL_BLOCK} control tokens and the mask token)")
    tokens, types, merges, ids = _build_cached(vocab_size)
    # Fresh lists: the cached tuples are shared between callers.
    return SynthVocab(list(tokens), list(types), list(merges), *ids)


@functools.lru_cache(maxsize=8)
def _trained_bpe(n_bpe: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Train byte-level BPE on the corpus; return (tokens by id, merges), at most n_bpe tokens."""
    text = CORPUS_PATH.read_text(encoding="utf-8")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = build_pre_tokenizer(PRE_TOKENIZERS[PRE])
    trainer = trainers.BpeTrainer(
        vocab_size=n_bpe,
        min_frequency=MIN_PAIR_FREQUENCY,
        show_progress=False,
        special_tokens=[],
        # All 256 bytes, so every input is encodable however small the corpus.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One sequence, so the trainer also sees the newline runs between paragraphs.
    hf.train_from_iterator([text], trainer=trainer)
    model = json.loads(hf.to_str())["model"]
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise RuntimeError("BPE trainer returned non-contiguous token ids")
    # tokenizers >= 0.20 stores merges as pairs, older versions as "left right" strings.
    merges = tuple(m if isinstance(m, str) else f"{m[0]} {m[1]}" for m in model["merges"])
    return tuple(tokens), merges


@functools.lru_cache(maxsize=8)
def _build_cached(vocab_size: int) -> tuple[tuple[str, ...], tuple[int, ...], tuple[str, ...],
                                            tuple[int, int, int, int]]:
    block = control_block_size(vocab_size)
    n_bpe = vocab_size - block - 1
    bpe_tokens, merges = _trained_bpe(n_bpe)
    n_pad = n_bpe - len(bpe_tokens)

    tokens = list(bpe_tokens)
    types = [int(TokenType.NORMAL)] * len(bpe_tokens)
    tokens += [f"<|synth_unused_{i}|>" for i in range(n_pad)]
    types += [int(TokenType.UNUSED)] * n_pad

    tokens += control_tokens(block)
    types += [int(TokenType.CONTROL)] * (block + 1)

    if len(tokens) != vocab_size or len(set(tokens)) != vocab_size:
        raise RuntimeError(f"synthetic vocabulary layout broken: {len(tokens)} tokens, "
                           f"{len(set(tokens))} distinct, wanted {vocab_size}")
    ids = (n_bpe, n_bpe + 1, n_bpe + 9, vocab_size - 1)  # BOS, EOS, EOT, MASK
    return tuple(tokens), tuple(types), merges, ids


def control_tokens(block: int) -> list[str]:
    """The control block in Llama-3's order (BOS, EOS, reserved..., headers, EOT, ...), then
    |<MASK>|: block + 1 token texts."""
    names, reserved = [], 0
    for offset in range(block):
        name = _NAMED_IN_BLOCK.get(offset)
        if name is None:
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
        names.append(name)
    return names + [MASK_TEXT]


def chat_template_for(vocab: SynthVocab) -> str:
    """Llama-3-style chat template if the header tokens exist, else the USER:/ASSISTANT: one."""
    if HEADER_START_TEXT in vocab.tokens and HEADER_END_TEXT in vocab.tokens:
        return LLAMA3_STYLE_CHAT_TEMPLATE
    return seed_chat_template(vocab)


def seed_chat_template(vocab: SynthVocab) -> str:
    """The template rendering the seed server's prompt form "USER: hi<|eot_id|>ASSISTANT:"."""
    return SIMPLE_CHAT_TEMPLATE.replace("{end}", vocab.tokens[vocab.eot_id])


def add_tokenizer_metadata(writer: GGUFWriter, vocab: SynthVocab,
                           chat_template: str | None = None) -> None:
    """Write the `tokenizer.*` keys for `vocab` (gpt2 / llama-bpe, BOS added, chat template:
    `chat_template_for(vocab)` unless given)."""
    add_vocab_metadata(writer, vocab)
    writer.add_chat_template(chat_template or chat_template_for(vocab))


def add_vocab_metadata(writer: GGUFWriter, vocab: SynthVocab, pre: str = PRE,
                       add_bos: bool = True) -> None:
    """Write the `tokenizer.ggml.*` keys of a byte-level BPE vocabulary (model gpt2, the given
    pre-tokenizer; special ids that are None are left out; no chat template)."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    for token_id, add in ((vocab.bos_id, writer.add_bos_token_id),
                          (vocab.eos_id, writer.add_eos_token_id),
                          (vocab.eot_id, writer.add_eot_token_id),
                          (vocab.mask_id, writer.add_mask_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(False)


def build_char_vocab() -> SynthVocab:
    """A byte-level vocabulary without word pieces, for small trained models (the bundled toy
    model): ids 0..255 are the bytes in byte order, then one merge (two spaces; GGUF and llama.cpp
    need a non-empty merge list), then the 16-token control block and |<MASK>| last (274 tokens)."""
    from ..gguf.tokenizer import bytes_to_unicode

    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)]
    space = b2u[ord(" ")]
    merges = [f"{space} {space}"]
    tokens.append(space + space)
    types = [int(TokenType.NORMAL)] * len(tokens)
    n_bpe = len(tokens)
    tokens += control_tokens(SMALL_CONTROL_BLOCK)
    types += [int(TokenType.CONTROL)] * (SMALL_CONTROL_BLOCK + 1)
    return SynthVocab(tokens, types, merges, n_bpe, n_bpe + 1, n_bpe + 9, len(tokens) - 1)


def vocab_tokenizer(vocab: SynthVocab, pre: str = PRE, add_bos: bool = True):
    """Our Tokenizer for a SynthVocab, exactly as a GGUF written with it would build it."""
    from ..gguf.tokenizer import Tokenizer

    return Tokenizer(vocab.tokens, vocab.token_types,
                     [tuple(m.split(" ", 1)) for m in vocab.merges], pre,
                     bos_id=vocab.bos_id, eos_id=vocab.eos_id, eot_id=vocab.eot_id,
                     mask_id=vocab.mask_id, add_bos=add_bos)
