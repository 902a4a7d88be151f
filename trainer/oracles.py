"""Built-in simulated users for `simulate` and `evaluate`: judge(prompt, answer_a, answer_b) -> "a" | "b" | "tie"."""
from __future__ import annotations

import importlib
from typing import Callable

Judge = Callable[[str, str, str], str]
ENDINGS = (".", "!", "?", '"', ")", "*")


def ends_properly(answer: str) -> bool:
    """Ends like a finished sentence (a cut-off answer usually stops mid-word)."""
    return answer.strip().endswith(ENDINGS)


def _compare(score_a: float, score_b: float, margin: float) -> str:
    if abs(score_a - score_b) <= margin:
        return "tie"
    return "a" if score_a > score_b else "b"


def shorter(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the shorter answer; within 10% of each other is a tie. Empty answers lose."""
    if not answer_a.strip() or not answer_b.strip():
        return _compare(bool(answer_a.strip()), bool(answer_b.strip()), 0)
    return _compare(-len(answer_a), -len(answer_b), 0.1 * max(len(answer_a), len(answer_b)))


def complete(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the answer that ends properly; otherwise a tie."""
    return _compare(ends_properly(answer_a), ends_properly(answer_b), 0)


def concise(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers finished, short answers: +1 for ending properly, −1 per 200 characters; close scores tie."""
    def score(answer: str) -> float:
        if not answer.strip():
            return -2.0
        return float(ends_properly(answer)) - len(answer) / 200
    return _compare(score(answer_a), score(answer_b), 0.1)


def load_oracle(spec: str) -> Judge:
    """`module:function`, or the name of a built-in oracle (shorter, complete, concise)."""
    if ":" not in spec:
        spec = f"trainer.oracles:{spec}"
    module, _, name = spec.partition(":")
    judge = getattr(importlib.import_module(module), name, None)
    if not callable(judge):
        raise ValueError(f"{spec} is not a function judge(prompt, answer_a, answer_b)")
    return judge
