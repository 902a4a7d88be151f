"""Prompt files and the prompt pool the trainer samples from."""
from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_prompts(path: str | Path) -> list[str]:
    """Prompts from JSONL with a `prompt` field, or from plain lines; blank lines are skipped."""
    path = Path(path)
    if not path.is_absolute() and not path.exists():
        path = ROOT / path
    prompts = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error})") from None
            if not isinstance(row.get("prompt"), str):
                raise ValueError(f"{path}:{number}: a JSONL prompt file needs a string `prompt` field")
            prompts.append(row["prompt"])
        else:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path} has no prompts")
    return prompts


def as_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def prompt_pool(user_prompts: list[list[dict]], seed_prompts: list[str], gate_size: int, seed: int
                ) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training prompts, gate prompts): users' own prompts plus the seed prompts, split so they never overlap."""
    pool, seen = [], set()
    for messages in user_prompts + [as_messages(p) for p in seed_prompts]:
        key = json.dumps(messages)
        if key not in seen:
            seen.add(key)
            pool.append(messages)
    random.Random(seed).shuffle(pool)
    gate_size = min(gate_size, max(1, len(pool) // 4))
    return pool[gate_size:], pool[:gate_size]
