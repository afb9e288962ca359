"""Synthetic tasks with checkable answers: the training data of the bundled toy model and the
held-out sets `dlmnumba eval` scores.

Every example is a (task, prompt, answer) triple.  The prompt is what a user types (for example
``What is 48+27?``); the model sees it in the seed's chat form
``USER: What is 48+27?<|eot_id|>ASSISTANT:`` and should answer `` 75`` followed by ``<|eot_id|>``.
An answer is right when the generated text, stripped of surrounding white space, equals it.

Held-out sets are drawn from their own seeded stream; the training stream skips every prompt of
every held-out set (`heldout_prompts`), so no test prompt is ever trained on.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from typing import Callable, Iterator

TASKS = ("add", "sub", "copy", "reverse", "sort", "lookup")
# Held-out sets: TEST_SEED is scored by `dlmnumba eval`; training excludes all of them.
TEST_SEED = 1_000_003
HELDOUT_PER_TASK = 200  # size of the held-out set per task (eval samples from it)


@dataclass(frozen=True)
class Example:
    """One task instance."""

    task: str
    prompt: str
    answer: str


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10 ** digits - 1)


def _letters(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> Example:
    a, b = _number(rng, 2), _number(rng, 2)
    return Example("add", f"What is {a}+{b}?", str(a + b))


def _sub(rng: random.Random) -> Example:
    a, b = _number(rng, 2), _number(rng, 2)
    a, b = max(a, b), min(a, b)
    return Example("sub", f"What is {a}-{b}?", str(a - b))


def _copy(rng: random.Random) -> Example:
    s = _letters(rng, 2, 24)
    return Example("copy", f"Copy: {s}", s)


def _reverse(rng: random.Random) -> Example:
    s = _letters(rng, 2, 16)
    return Example("reverse", f"Reverse: {s}", s[::-1])


def _sort(rng: random.Random) -> Example:
    s = "".join(rng.choice(string.digits) for _ in range(rng.randint(2, 12)))
    return Example("sort", f"Sort: {s}", "".join(sorted(s)))


def _lookup(rng: random.Random) -> Example:
    keys = rng.sample(string.ascii_lowercase, rng.randint(2, 5))
    values = [str(_number(rng, 3)) for _ in keys]
    key = rng.choice(keys)
    pairs = " ".join(f"{k}={v}" for k, v in zip(keys, values))
    return Example("lookup", f"Find {key} in {pairs}", values[keys.index(key)])


GENERATORS: dict[str, Callable[[random.Random], Example]] = {
    "add": _add, "sub": _sub, "copy": _copy, "reverse": _reverse, "sort": _sort,
    "lookup": _lookup}


def check_tasks(tasks) -> tuple[str, ...]:
    """Validate task names (ValueError naming the bad one)."""
    tasks = tuple(tasks)
    for t in tasks:
        if t not in GENERATORS:
            raise ValueError(f"unknown task {t!r}; expected some of {', '.join(TASKS)}")
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


def heldout_prompts() -> frozenset[str]:
    """Every held-out prompt of every task (training skips them)."""
    return frozenset(ex.prompt for t in TASKS for ex in heldout(t))


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
