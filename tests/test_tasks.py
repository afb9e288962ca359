"""The synthetic tasks: answers checked by an independent parser, held-out sets kept out of
training, determinism."""
import itertools
import re

import pytest

from dlmnumba import tasks as T


def oracle_answer(prompt: str) -> str:
    """Solve a prompt from its text alone (independent of the generators)."""
    if m := re.fullmatch(r"What is (\d+)([+-])(\d+)\?", prompt):
        a, b = int(m.group(1)), int(m.group(3))
        return str(a + b if m.group(2) == "+" else a - b)
    if m := re.fullmatch(r"Copy: ([a-z]+)", prompt):
        return m.group(1)
    if m := re.fullmatch(r"Reverse: ([a-z]+)", prompt):
        return "".join(reversed(m.group(1)))
    if m := re.fullmatch(r"Sort: (\d+)", prompt):
        return "".join(sorted(m.group(1)))
    if m := re.fullmatch(r"Given ((?:[a-z]=\d+ ?)+), find ([a-z])", prompt):
        pairs = dict(p.split("=") for p in m.group(1).split())
        return f"{m.group(2)}={pairs[m.group(2)]}"  # the found pair
    raise AssertionError(f"unparseable prompt {prompt!r}")


@pytest.mark.parametrize("task", T.TASKS + T.FRESH_TASKS)
def test_heldout_answers_match_an_independent_solver(task):
    exs = T.heldout(task, 100)
    assert len({e.prompt for e in exs}) == 100
    for e in exs:
        assert e.task == task and oracle_answer(e.prompt) == e.answer
    assert T.heldout(task, 100) == exs  # deterministic


def test_training_stream_never_yields_heldout_prompts_and_covers_every_task():
    banned = T.heldout_prompts()
    assert banned == {e.prompt for t in T.TASKS + T.FRESH_TASKS for e in T.heldout(t)}
    assert len(banned) > (len(T.TASKS) + 1) * T.HELDOUT_PER_TASK  # add2 overlaps add a little
    seen = list(itertools.islice(T.training_stream(0), 3000))
    assert not {e.prompt for e in seen} & banned
    assert {e.task for e in seen} == set(T.TASKS)
    assert all(oracle_answer(e.prompt) == e.answer for e in seen)
    # small prompt spaces (one-digit sums) do get drawn, so the filter has work to do
    raw = list(itertools.islice(_unfiltered(), 20000))
    assert {e.prompt for e in raw} & banned


def _unfiltered():
    import random
    rng = random.Random(0)
    while True:
        yield T.GENERATORS[rng.choice(T.TASKS)](rng)


@pytest.mark.parametrize("task, op", [("add2", "+"), ("sub2", "-")])
def test_fresh_two_digit_sets_have_two_digit_operands_and_depend_on_the_seed(task, op):
    exs = T.heldout(task, 200, seed=7)
    assert len({e.prompt for e in exs}) == 200 and all(e.task == task for e in exs)
    ops = [tuple(map(int, re.fullmatch(rf"What is (\d+){re.escape(op)}(\d+)\?", e.prompt).groups()))
           for e in exs]
    assert all(10 <= a <= 99 and 10 <= b <= 99 for a, b in ops)
    assert all(oracle_answer(e.prompt) == e.answer for e in exs)
    carries = [(a % 10 + b % 10 >= 10) if op == "+" else (a % 10 < b % 10) for a, b in ops]
    assert 0.3 < sum(carries) / len(carries) < 0.6  # carries / borrows as they fall (~45%)
    assert {e.prompt for e in T.heldout(task, 200, seed=8)} != {e.prompt for e in exs}


def test_answers_span_several_lengths_and_subtraction_is_never_negative():
    exs = [e for t in T.TASKS for e in T.heldout(t)]
    lengths = {len(e.answer) for e in exs}
    assert min(lengths) == 1 and max(lengths) >= 20
    assert all(not e.answer.startswith("-") for e in exs)


def test_is_correct_ignores_only_surrounding_space():
    e = T.Example("add", "What is 1+2?", "3")
    assert T.is_correct(e, " 3") and T.is_correct(e, "3\n")
    assert not T.is_correct(e, "33") and not T.is_correct(e, "3 3")


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="'mul'"):
        T.check_tasks(["add", "mul"])
