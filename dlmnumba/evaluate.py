"""`dlmnumba eval`: score decoding settings on the held-out synthetic tasks (dlmnumba.tasks).

Each example's prompt goes through the model's chat template (the bundled toy model was trained
on it); the generated text is right when, stripped, it equals the answer.  Reported per task and
overall: accuracy, generated tokens per forward pass, and tokens per second.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from . import tasks as T


@dataclass
class TaskResult:
    """Scores of one task (or of all tasks together)."""

    task: str
    n: int = 0
    correct: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0
    draft_tokens: int = 0  # spec: draft tokens verified
    accepted_tokens: int = 0  # spec: ... and accepted
    failures: list[dict] = field(default_factory=list)  # a few wrong answers, for reading

    @property
    def accuracy(self) -> float:
        """Fraction answered exactly."""
        return self.correct / max(1, self.n)

    @property
    def tokens_per_pass(self) -> float:
        """Generated tokens per forward pass."""
        return self.generated_tokens / max(1, self.forward_passes)

    @property
    def acceptance(self) -> float:
        """spec: the fraction of draft tokens accepted (0 without drafts)."""
        return self.accepted_tokens / max(1, self.draft_tokens)

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of decoding."""
        return self.generated_tokens / max(self.seconds, 1e-9)

    def add(self, other: TaskResult) -> None:
        """Fold another result into this one."""
        self.n += other.n
        self.correct += other.correct
        self.generated_tokens += other.generated_tokens
        self.forward_passes += other.forward_passes
        self.seconds += other.seconds
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens

    def to_dict(self) -> dict:
        """JSON-ready figures."""
        d = asdict(self)
        d.update(accuracy=self.accuracy, tokens_per_pass=self.tokens_per_pass,
                 tokens_per_second=self.tokens_per_second, acceptance=self.acceptance)
        return d


def examples_for(tasks: Sequence[str], n_per_task: int) -> list[T.Example]:
    """The first n_per_task held-out examples of each task."""
    if not 1 <= n_per_task <= T.HELDOUT_PER_TASK:
        raise ValueError(f"examples per task must be in 1..{T.HELDOUT_PER_TASK}, got {n_per_task}")
    return [ex for t in T.check_tasks(tasks) for ex in T.heldout(t, n_per_task)]


def run_eval(generator, encode: Callable[[str], list[int]], examples: Sequence[T.Example],
             progress=None, keep_failures: int = 3) -> tuple[list[TaskResult], TaskResult]:
    """Decode every example with `generator`; return per-task results and the total.

    encode maps a user prompt to prompt token ids (chat template applied)."""
    per: dict[str, TaskResult] = {}
    for ex in examples:
        ids = encode(ex.prompt)
        t0 = time.perf_counter()
        gen = generator.generate(ids)
        dt = time.perf_counter() - t0
        r = per.setdefault(ex.task, TaskResult(ex.task))
        ok = T.is_correct(ex, gen.text)
        r.n += 1
        r.correct += ok
        r.generated_tokens += gen.stats.generated_tokens
        r.forward_passes += gen.stats.forward_passes
        r.seconds += dt
        r.draft_tokens += gen.stats.draft_tokens
        r.accepted_tokens += gen.stats.accepted_tokens
        if not ok and len(r.failures) < keep_failures:
            r.failures.append({"prompt": ex.prompt, "answer": ex.answer, "output": gen.text})
        if progress is not None:
            progress.update(1)
    total = TaskResult("all")
    for r in per.values():
        total.add(r)
    return list(per.values()), total


def format_table(results: Sequence[TaskResult], total: TaskResult, settings: str) -> str:
    """The human-readable report."""
    drafts = total.draft_tokens > 0  # spec: the accepted fraction of the drafts too
    lines = [f"Evaluation ({settings})",
             f"{'task':<10} {'n':>5} {'accuracy':>9} {'tok/pass':>9} {'tok/s':>8}"
             + (f" {'accepted':>9}" if drafts else "")]
    for r in list(results) + [total]:
        lines.append(f"{r.task:<10} {r.n:>5} {100 * r.accuracy:>8.1f}% "
                     f"{r.tokens_per_pass:>9.2f} {r.tokens_per_second:>8.1f}"
                     + (f" {100 * r.acceptance:>8.1f}%" if drafts else ""))
    return "\n".join(lines)


def write_json(path: str, results: Sequence[TaskResult], total: TaskResult, settings: dict,
               environment: dict) -> None:
    """Machine-readable results."""
    doc = {"settings": settings, "environment": environment, "total": total.to_dict(),
           "tasks": [r.to_dict() for r in results]}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=2)
        fh.write("\n")
