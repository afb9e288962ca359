"""Synthetic tasks with checkable answers: the training data of the bundled toy model and the
held-out sets `dlmnumba eval` scores.

Every example is a (task, prompt, answer) triple.  The prompt is what a user types (for example
``What is 48+27?``); the model sees it in the seed's chat form
``USER: What is 48+27?<|eot_id|>ASSISTANT:`` and should answer `` 75`` followed by ``<|eot_id|>``.
An answer is right when the generated text, stripped of surrounding white space, equals it.

Held-out sets are drawn from their own seeded stream; the training stream skips every prompt of
every held-out set (`heldout_prompts`), so no test prompt is ever trained on.

Besides the six tasks of the held-out table (`TASKS`, 1-2 digit operands) there are the fresh
two-digit sets (`FRESH_TASKS`: `add2`, `sub2`, both operands 10-99, carries and borrows as they
fall): what a user typing a sum is most likely to ask.  `heldout("add2", n, seed)` gives n
distinct fresh draws for any seed; the sets at TEST_SEED are held out of training like the others.
The prompt of every task is built by one function (`add_example`, ...), which the trainer's
curriculum calls with its own operands.
"""
from __future__ import annotations

import functools
import random
import string
from dataclasses import dataclass
from typing import Callable, Iterator

TASKS = ("add", "sub", "copy", "reverse", "sort", "lookup")
FRESH_TASKS = ("add2", "sub2")  # two-digit operands only (10-99)
# Held-out sets: TEST_SEED is scored by `dlmnumba eval`; training excludes all of them.
TEST_SEED = 1_000_003
HELDOUT_PER_TASK = 200  # size of the held-out set per task (eval samples from it)


@dataclass(frozen=True)
class Example:
    """One task instance."""

    task: str
    prompt: str
    answer: str


def number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def add_example(a: int, b: int, task: str = "add") -> Example:
    """The addition a+b."""
    return Example(task, f"What is {a}+{b}?", str(a + b))


def sub_example(a: int, b: int, task: str = "sub") -> Example:
    """The subtraction of the smaller from the larger operand (answers are never negative)."""
    a, b = max(a, b), min(a, b)
    return Example(task, f"What is {a}-{b}?", str(a - b))


def copy_example(s: str) -> Example:
    """Copy a string."""
    return Example("copy", f"Copy: {s}", s)


def reverse_example(s: str) -> Example:
    """Reverse a string."""
    return Example("reverse", f"Reverse: {s}", s[::-1])


def sort_example(s: str) -> Example:
    """Sort a string of digits."""
    return Example("sort", f"Sort: {s}", "".join(sorted(s)))


def lookup_pair(pairs: dict[str, str], key: str) -> str:
    """One pair as the lookup prompt writes it and the answer repeats it: `q=949`."""
    return f"{key}={pairs[key]}"


def lookup_example(pairs: dict[str, str], key: str) -> Example:
    """Find a key's value: the pairs come first, the query last; the answer is the found pair
    (`Given o=903 q=949, find q` -> `q=949`), the key first, so that the value is what followed
    that key in the prompt (a small model learns that copy; the bare value it did not)."""
    text = " ".join(lookup_pair(pairs, k) for k in pairs)
    return Example("lookup", f"Given {text}, find {key}", lookup_pair(pairs, key))


def _add(rng: random.Random) -> Example:
    return add_example(number(rng, 2), number(rng, 2))


def _sub(rng: random.Random) -> Example:
    return sub_example(number(rng, 2), number(rng, 2))


def _add2(rng: random.Random) -> Example:
    return add_example(rng.randint(10, 99), rng.randint(10, 99), "add2")


def _sub2(rng: random.Random) -> Example:
    return sub_example(rng.randint(10, 99), rng.randint(10, 99), "sub2")


def _copy(rng: random.Random) -> Example:
    return copy_example(letters(rng, 2, 24))


def _reverse(rng: random.Random) -> Example:
    return reverse_example(letters(rng, 2, 16))


def _sort(rng: random.Random) -> Example:
    return sort_example("".join(rng.choice(string.digits) for _ in range(rng.randint(2, 12))))


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample(string.ascii_lowercase, rng.randint(2, 5))
    values = [str(number(rng, 3)) for _ in keys]
    return lookup_example(dict(zip(keys, values)), rng.choice(keys))


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "sub": _sub, "copy": _copy, "reverse": _reverse, "sort": _sort,
    "lookup": _lookup, "add2": _add2, "sub2": _sub2}


def check_tasks(tasks) -> tuple[str, ...]:
    """Validate task names (ValueError naming the bad one)."""
    tasks = tuple(tasks)
    for t in tasks:
        if t not in GENERATORS:
            raise ValueError(f"unknown task {t!r}; expected some of {', '.join(GENERATORS)}")
    return tasks


def heldout(task: str, n: int = HELDOUT_PER_TASK, seed: int = TEST_SEED) -> list[Example]:
    """The first n distinct examples of a task's held-out stream (deterministic)."""
    check_tasks([task])
    rng = random.Random(f"{seed}:{task}")
    seen: set[str] = set()
    out: list[Example] = []
    for _ in range(100 * n):
        ex = GENERATORS[task](rng)
        if ex.prompt not in seen:
            seen.add(ex.prompt)
            out.append(ex)
            if len(out) == n:
                return out
    raise RuntimeError(f"task {task!r}: could not draw {n} distinct held-out examples")


@functools.lru_cache(maxsize=1)
def heldout_prompts() -> frozenset[str]:
    """Every held-out prompt of every task, fresh two-digit sets included (training skips
    them)."""
    return frozenset(ex.prompt for t in TASKS + FRESH_TASKS for ex in heldout(t))


def training_stream(seed: int, tasks=TASKS, weights=None) -> Iterator[Example]:
    """An endless stream of training examples, tasks drawn with `weights` (default uniform),
    held-out prompts skipped."""
    tasks = check_tasks(tasks)
    rng = random.Random(seed)
    banned = heldout_prompts()
    while True:
        ex = GENERATORS[rng.choices(tasks, weights)[0]](rng)
        if ex.prompt not in banned:
            yield ex


def is_correct(example: Example, text: str) -> bool:
    """Whether generated text answers the example exactly (white space around it ignored)."""
    return text.strip() == example.answer
