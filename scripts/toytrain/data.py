"""Training data: the mix and its curriculum, the fast encoder, and the batch of a step, a pure
function of (seed, step), built ahead by worker processes if asked."""
from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import random
import re
from dataclasses import dataclass

import numpy as np

from dlmnumba import tasks as T
from dlmnumba.chat import seed_chat
from dlmnumba.synth.vocab import build_char_vocab, vocab_tokenizer

__all__ = ["chat", "DEFAULT_MIX", "lookup_multi_example", "draw_example", "parse_mix", "Encoder",
           "DataConfig", "Batch", "recall_sources", "make_batch", "Batches",
           "make_batch_example"]

chat = seed_chat  # the prompt form the model is trained on (its chat template renders it)

# Training mix: what each entry draws at difficulty d (see the docstring of toytrain.cli).
DEFAULT_MIX = ("add=1,add2=2,add_carry=1,sub=1,sub2=2,sub_borrow=1,copy=1.5,copy_long=1,"
               "reverse=1.5,reverse_long=1,sort=1.5,lookup=3")


def _operand(rng: random.Random, d: float, two_digit: bool) -> int:
    if rng.random() >= d:
        return rng.randint(0, 9)
    return rng.randint(10, 99) if two_digit else T.number(rng, 2)


def _span(lo: int, hi: int, d: float) -> int:
    return lo + round(d * (hi - lo))


def lookup_multi_example(pairs: dict[str, str], rng: random.Random) -> T.Example:
    """Training only: every key queried once, in random order, one lookup answer each
    (`Given o=903 q=949, find q o` -> `q=949 o=903`): several recalls per sequence."""
    keys = rng.sample(list(pairs), len(pairs))
    ex = T.lookup_example(pairs, keys[0])
    return T.Example("lookup", f"{ex.prompt} {' '.join(keys[1:])}".rstrip(),
                     " ".join(T.lookup_pair(pairs, k) for k in keys))


def draw_example(rng: random.Random, entry: str, d: float) -> T.Example:
    """One example of a training-mix entry at difficulty d (before the held-out filter)."""
    if entry in ("add", "add2", "add_carry", "sub", "sub2", "sub_borrow"):
        two = entry != "add" and entry != "sub"
        for _ in range(1000):
            a, b = _operand(rng, d, two), _operand(rng, d, two)
            if entry == "sub_borrow":  # a borrow needs a two-digit minuend: 1x at first
                a = rng.randint(10, 99) if rng.random() < d else rng.randint(10, 19)
                if a < b or a % 10 >= b % 10:
                    continue
            if entry == "add_carry" and a % 10 + b % 10 < 10:
                continue
            return (T.add_example if entry.startswith("add") else T.sub_example)(a, b)
        raise RuntimeError(f"no {entry} example at difficulty {d}")
    if entry in ("copy", "copy_long"):
        hi = _span(4, 24, d)
        return T.copy_example(T.letters(rng, 2 if entry == "copy" else max(2, hi - 10), hi))
    if entry in ("reverse", "reverse_long"):
        hi = _span(4, 16, d)
        return T.reverse_example(T.letters(rng, 2 if entry == "reverse" else max(2, hi - 6), hi))
    if entry == "sort":
        n = rng.randint(2, _span(4, 12, d))
        return T.sort_example("".join(rng.choice("0123456789") for _ in range(n)))
    if entry in ("lookup", "lookup_value", "lookup_multi"):
        keys = rng.sample("abcdefghijklmnopqrstuvwxyz", rng.randint(2, _span(2, 5, d)))
        pairs = dict(zip(keys, (str(T.number(rng, _span(1, 3, d))) for _ in keys)))
        if entry == "lookup_multi":
            return lookup_multi_example(pairs, rng)
        ex = T.lookup_example(pairs, key := rng.choice(keys))
        # lookup_value: the bare value, the answer stages 1 and 2 of the bundled model trained on
        return ex if entry == "lookup" else dataclasses.replace(ex, answer=pairs[key])
    raise ValueError(f"unknown training-mix entry {entry!r}")


def parse_mix(text: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """'add=1,sub2=2,...' -> (entries, weights), each entry checked."""
    pairs = [p.split("=") for p in text.split(",") if p.strip()]
    entries, weights = tuple(p[0].strip() for p in pairs), tuple(float(p[1]) for p in pairs)
    probe = random.Random(0)
    for e in entries:
        draw_example(probe, e, 1.0)  # raises on an unknown entry
    return entries, weights


class Encoder:
    """Token ids of the chat-form prompt and of the answer, by table lookup: the char
    vocabulary maps every byte to its own id (checked against the real tokenizer at start)."""

    def __init__(self):
        vocab = build_char_vocab()
        self.eot, self.mask, self.bos, self.eos = (vocab.eot_id, vocab.mask_id, vocab.bos_id,
                                                   vocab.eos_id)
        head, tail = chat("\x00").split("\x00")
        self.head = [self.bos] + list(head.encode())
        self.tail = self._text(tail)

    def _text(self, text: str) -> list[int]:
        special = "<|eot_id|>"
        out: list[int] = []
        for i, part in enumerate(text.split(special)):
            if i:
                out.append(self.eot)
            out += part.encode()
        return out

    def prompt(self, text: str) -> list[int]:
        return self.head + list(text.encode()) + self.tail

    def answer(self, text: str) -> list[int]:
        return list((" " + text).encode()) + [self.eot]

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")

    def check(self, examples) -> None:
        """Raise unless the lookup encoding equals the tokenizer's on these examples."""
        tok = vocab_tokenizer(build_char_vocab())
        for ex in examples:
            if "  " in ex.prompt or "  " in ex.answer:
                raise ValueError(f"double space in {ex}: the char vocabulary merges it")
            want = tok.encode(chat(ex.prompt)), tok.encode(" " + ex.answer, add_bos=False)
            if (self.prompt(ex.prompt), self.answer(ex.answer)[:-1]) != want:
                raise AssertionError(f"fast encoding differs from the tokenizer on {ex}")


@dataclass(frozen=True)
class DataConfig:
    """Everything a batch depends on (picklable for worker processes)."""

    seed: int
    steps: int
    ar_steps: int
    ar_every: int
    batch: int
    block_sizes: tuple[int, ...]
    entries: tuple[str, ...]
    weights: tuple[float, ...]
    curriculum_steps: int
    recall_weight: float  # > 0: AR batches carry recall_sources (see --recall-weight)
    recall_head: tuple[int, int]  # (layer, head) taught the copy step
    key_head: tuple[int, int] | None  # (layer, head) taught the key step (None: none)

    def is_ar(self, step: int) -> bool:
        return step < self.ar_steps or bool(self.ar_every and step % self.ar_every == 0)

    def difficulty(self, step: int) -> float:
        return min(1.0, step / self.curriculum_steps) if self.curriculum_steps else 1.0


@dataclass
class Batch:
    """One step's data: ids [B, T] (EOT padding), prompt lengths, answer ends (exclusive);
    for diffusion steps the block size and the first mask of each complementary pair."""

    kind: str
    ids: np.ndarray
    plen: np.ndarray
    end: np.ndarray
    block: int = 0
    masked: np.ndarray | None = None
    recall: np.ndarray | None = None  # [B, 2, T]: see recall_sources (-1: none)


_PAIR = re.compile(r"([a-z])=(\d+)")


def recall_sources(enc: Encoder, ex: T.Example, plen: int, t: int) -> np.ndarray:
    """[2, t] attention targets of a lookup example (-1: none), the two steps of a recall:
    row 0 (copy): for the position whose next token is a digit of an answer's pair (`q=949`),
    the prompt position of that digit in the prompt's pair `q=949`; row 1 (key): for those
    positions, the answer's key `q`, and for each digit of a value in the prompt, its key.
    The char vocabulary puts character c of the prompt text at token len(enc.head) + c and
    character c of " " + answer at plen + c."""
    out = np.full((2, t), -1, np.int64)
    if ex.task != "lookup":
        return out
    head = len(enc.head)
    start = {}
    for m in _PAIR.finditer(ex.prompt):
        start[m.group(1)] = head + m.start(2)
        out[1, head + m.start(2):head + m.end(2)] = head + m.start(1)
    for m in _PAIR.finditer(" " + ex.answer):
        if m.group(1) in start:
            for j in range(len(m.group(2))):
                out[0, plen + m.start(2) + j - 1] = start[m.group(1)] + j
                out[1, plen + m.start(2) + j - 1] = plen + m.start(1)
    return out


_ENCODER: Encoder | None = None


def make_batch(cfg: DataConfig, step: int, kind: str | None = None,
               difficulty: float | None = None) -> Batch:
    """The batch of `step` (kind and difficulty overridable, for the probe)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = Encoder()
    enc, banned = _ENCODER, T.heldout_prompts()
    rng = random.Random(f"{cfg.seed}:batch:{step}")
    kind = kind or ("ar" if cfg.is_ar(step) else "dlm")
    d = cfg.difficulty(step) if difficulty is None else difficulty
    block = rng.choice(cfg.block_sizes) if kind == "dlm" else 1
    n = cfg.batch if kind == "ar" else max(1, cfg.batch // 2)
    seqs, plens, exs = [], [], []
    for entry in rng.choices(cfg.entries, cfg.weights, k=n):
        ex = draw_example(rng, entry, d)
        for _ in range(1000):
            if ex.prompt not in banned:
                break
            ex = draw_example(rng, entry, d)
        else:
            raise RuntimeError(f"{entry} at difficulty {d}: every draw is a held-out prompt")
        p = enc.prompt(ex.prompt)
        seqs.append(p + enc.answer(ex.answer))
        plens.append(len(p))
        exs.append(ex)
    t = -(-max(map(len, seqs)) // block) * block
    ids = np.full((n, t), enc.eot, np.int64)
    for i, x in enumerate(seqs):
        ids[i, :len(x)] = x
    out = Batch(kind, ids, np.array(plens, np.int64), np.array([len(x) for x in seqs], np.int64),
                block)
    if kind == "ar" and cfg.recall_weight:
        out.recall = np.stack([recall_sources(enc, ex, pl, t) for ex, pl in zip(exs, plens)])
    if kind == "dlm":
        nrng = np.random.default_rng([cfg.seed, step])
        ratio = np.repeat(nrng.random((n, t // block)), block, axis=1)
        out.masked = nrng.random((n, t)) < ratio
    return out


class Batches:
    """Batches of the given steps in order; with workers > 0 built ahead by a process pool
    (fork: started before CUDA), at most `ahead` batches in flight."""

    def __init__(self, cfg: DataConfig, jobs, workers: int = 0, ahead: int = 0):
        self.cfg, self.jobs, self.workers = cfg, list(jobs), workers
        self.ahead = ahead or 4 * workers
        self.pool = None
        if workers:
            T.heldout_prompts()  # computed once, inherited by the workers
            self.pool = multiprocessing.get_context("fork").Pool(workers)

    def __iter__(self):
        if self.pool is None:
            for job in self.jobs:
                yield make_batch(self.cfg, *job)
            return
        pending: collections.deque = collections.deque()
        it = iter(self.jobs)
        for job in it:
            pending.append(self.pool.apply_async(make_batch, (self.cfg, *job)))
            if len(pending) >= self.ahead:
                break
        while pending:
            res = pending.popleft().get()
            job = next(it, None)
            if job is not None:
                pending.append(self.pool.apply_async(make_batch, (self.cfg, *job)))
            yield res

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool = None


def make_batch_example(cfg: DataConfig, i: int) -> T.Example:
    """A training example of the mix (for the encoder check)."""
    rng = random.Random(f"{cfg.seed}:check:{i}")
    return draw_example(rng, cfg.entries[i % len(cfg.entries)], 1.0)
