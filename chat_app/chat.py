"""Conversation logic without Gradio: prompt building, history flattening, votes, demonstrations."""
from __future__ import annotations

import random

from chat_app.store import CHOICES, Store

ROLES = ("system", "user", "assistant")
VOTE_LABELS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad"}


class ChatInputError(ValueError):
    """Bad input from a user or an API caller; the message says what is wrong."""


def flatten_content(content) -> str:
    """Text of a message's content: a string, or OpenAI / Gradio 6 parts [{"type": "text", "text": ...}]."""
    if content is None:   # OpenAI allows a null content (an assistant turn that only called tools)
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                         and isinstance(part.get("text"), str) for part in content):
        return "".join(part["text"] for part in content)
    # anything else (a number, an image part, nested lists) was once stringified into the prompt: say so instead
    raise ChatInputError('content must be a string or a list of {"type": "text", "text": "..."} parts')


def check_limits(messages: list[dict], limits) -> None:
    """ChatInputError if a conversation breaks `limits` (a LimitsConfig; 0 turns a bound off).

    The HTTP API (through clean_messages) and the chat page share it, so both refuse the same conversations."""
    if limits.max_turns and len(messages) > limits.max_turns:
        raise ChatInputError(f"a conversation may have at most {limits.max_turns} messages, this one has "
                             f"{len(messages)}: start a new one")
    for i, message in enumerate(messages):
        if limits.max_message_chars and len(message["content"]) > limits.max_message_chars:
            raise ChatInputError(f"messages[{i}] has {len(message['content']):,} characters; the most is "
                                 f"{limits.max_message_chars:,}")


def turn_refusal(history: list[dict], text: str, limits) -> str | None:
    """Why the chat page will not send `text` after `history` (check_limits, worded for a person), or None."""
    if limits.max_message_chars and len(text) > limits.max_message_chars:
        return f"Your message has {len(text):,} characters; the most is {limits.max_message_chars:,}. Shorten it."
    if limits.max_turns and len(history) + 1 > limits.max_turns:
        return f"This conversation has reached {limits.max_turns} messages, the most: press New chat to go on."
    return None


def clean_messages(messages, limits=None) -> list[dict]:
    """Validated [{"role", "content"}] with plain-text content; ChatInputError says what is wrong.

    Args:
        limits: a LimitsConfig whose `max_turns` and `max_message_chars` apply (None: no bound).
    """
    if not isinstance(messages, list) or not messages:
        raise ChatInputError("messages must be a non-empty list of {role, content} objects")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatInputError(f"messages[{i}] must be an object with role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ChatInputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}"[:300])
        try:
            content = flatten_content(message.get("content"))
        except ChatInputError as error:
            raise ChatInputError(f"messages[{i}].{error}") from None
        if "\x00" in content:   # no text has one; PostgreSQL's text type cannot store it
            raise ChatInputError(f"messages[{i}].content contains a NUL character")
        cleaned.append({"role": role, "content": content})
    if limits:   # after flattening, so text parts count by their joined length; the body cap bounds the loop
        check_limits(cleaned, limits)
    if cleaned[-1]["role"] != "user":
        raise ChatInputError("the last message must have role 'user'")
    if not cleaned[-1]["content"].strip():   # a pair for nothing would be voted on and trained on
        raise ChatInputError("the last user message is empty")
    return cleaned


def with_system_prompt(messages: list[dict], system_prompt: str) -> list[dict]:
    """Messages with the configured system prompt first, unless the caller brought their own."""
    if not system_prompt or (messages and messages[0]["role"] == "system"):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def encode_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[int], int]:
    """Token ids of the chat prompt, dropping the oldest turns until it fits; returns (ids, turns_dropped)."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    dropped = 0
    while True:
        ids = tokenizer.apply_chat_template(system + turns, add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):  # transformers 5 may hand back a BatchEncoding
            ids = ids["input_ids"]
        ids = list(ids)
        if len(ids) <= max_prompt_tokens or len(turns) <= 1:
            break
        # drop the oldest user turn and the answer that followed it
        cut = 2 if len(turns) > 2 and turns[1]["role"] == "assistant" else 1
        turns = turns[cut:]
        dropped += cut
    if len(ids) > max_prompt_tokens:  # one message longer than the window: keep its end
        ids = ids[-max_prompt_tokens:]
        dropped += 1
    return ids, dropped


def cast_vote(store: Store, comparison_id, choice: str, voter: str | None) -> tuple[str, str]:
    """Record a vote; returns (status, message) with status ok | unknown | duplicate | invalid."""
    if choice not in CHOICES:
        return "invalid", f"choice must be one of {', '.join(CHOICES)}"
    if not isinstance(comparison_id, int) or isinstance(comparison_id, bool):
        return "invalid", "comparison_id must be an integer"
    status = store.record_vote(comparison_id, choice, voter)
    messages = {"ok": f"Thanks! Vote recorded: {VOTE_LABELS[choice]}.",
                "unknown": f"No comparison with id {comparison_id}.",
                "duplicate": f"Comparison {comparison_id} already has a vote; a second one is not counted.",
                "incomplete": f"Comparison {comparison_id} is still being sampled; vote when both answers are done."}
    return status, messages[status]


def chosen_answer(choice: str, answer_a: str, answer_b: str) -> str:
    """The answer that continues the conversation: B when B won, else A (ties and both-bad keep A)."""
    return answer_b if choice == "b" else answer_a


def sampling_settings(max_new_tokens: int, temperature: float, top_p: float) -> dict:
    return {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}


def start_pair(store: Store, engine, messages: list[dict], *, source: str, max_new_tokens: int,
               temperature: float, top_p: float, conversation_id: str | None = None, candidates: int = 2,
               versions: list[str] | None = None):
    """Reserve a comparison and queue `candidates` answers (two are shown); returns (comparison_id, engine request).

    `versions`: the two versions to answer (a canary comparison, chat_app.canary): then exactly two answers."""
    seeds = [random.randrange(2**31) for _ in range(2 if versions else max(2, candidates))]
    comparison_id = store.create_comparison(
        prompt_messages=messages, sampling=sampling_settings(max_new_tokens, temperature, top_p),
        source=source, conversation_id=conversation_id, seeds=seeds)
    try:
        request = engine.submit(messages, n=len(seeds), max_new_tokens=max_new_tokens, temperature=temperature,
                                top_p=top_p, seeds=seeds, versions=versions)
    except Exception:   # a full queue (engine.EngineBusy): no answers will come, so keep no half comparison
        store.delete_comparison(comparison_id)
        raise
    return comparison_id, request


def finish_pair(store: Store, comparison_id: int, result, picker=None) -> tuple[int, int]:
    """Store the two answers shown with the versions that produced them; returns their indices in `result`.

    With more than two candidates and a `picker` (trainer.reward_heads.PairPicker), the two shown are the pair
    whose order the reward model is least sure of; without one, the first two."""
    i, j, extra = 0, 1, {}
    if picker is not None and len(result.texts) > 2:
        i, j, p_a = picker.pick(result.prompt_messages, result.texts)
        extra = {"candidates": len(result.texts), "picked": [i, j], "rm_p_a": round(p_a, 4)}
    store.complete_comparison(comparison_id, answer_a=result.texts[i], answer_b=result.texts[j],
                              policy_version=result.version, latency_ms=result.latency_ms,
                              ended_with_eos=(result.ended_with_eos[i], result.ended_with_eos[j]),
                              turns_dropped=result.turns_dropped, seeds=(result.seeds[i], result.seeds[j]),
                              sampling_extra=extra,
                              versions=(result.versions[i], result.versions[j]) if result.versions else None,
                              tokens=(result.completion_tokens[i], result.completion_tokens[j]))
    return i, j


def truncation_notice(turns_dropped: int) -> str:
    if not turns_dropped:
        return ""
    return (f"The conversation is longer than the model's context window: the oldest {turns_dropped} "
            f"message{'s' if turns_dropped > 1 else ''} were left out of this answer's prompt.")
