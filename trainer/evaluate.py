"""Evaluation: answers from a policy version, their reward, KL to the base and length; the gate; oracle win rates."""
from __future__ import annotations

import contextlib
import math
import random

import torch

from chat_app.chat import encode_prompt
from chat_app.decoding import TOP_K, decode
from chat_app.packed import policy_copy
from trainer.data import as_messages, load_prompts
from trainer.oracles import load_oracle
from trainer.ppo import forward_logprobs_values, pack_query_response


@contextlib.contextmanager
def using_adapter(policy, adapter: str | None):
    """Run `policy` as one of its adapters, or as the base model when `adapter` is None."""
    if adapter is None:
        if hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                yield policy
        else:
            yield policy
        return
    previous = policy.active_adapter
    policy.set_adapter(adapter)
    try:
        yield policy
    finally:
        policy.set_adapter(previous)


def generate_answers(model, tokenizer, prompts: list[list[dict]], *, max_new_tokens: int, temperature: float = 1.0,
                     top_p: float = 1.0, seed: int = 0, max_prompt_tokens: int = 1024, batch_size: int = 16,
                     top_k: int = TOP_K):
    """Sampled answers: (texts, prompt ids, answer ids, ended_with_eos), one entry per prompt."""
    prompt_ids = [encode_prompt(tokenizer, p, max_prompt_tokens)[0] for p in prompts]
    sampler = policy_copy(model) or model     # CPU: the packed copy, its active adapter (or none) folded in
    answers, ended = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = prompt_ids[start:start + batch_size]
        a, e = decode(sampler, chunk, max_new_tokens=[max_new_tokens] * len(chunk),
                      temperature=[temperature] * len(chunk), top_p=[top_p] * len(chunk),
                      seeds=[seed * 100003 + start + i for i in range(len(chunk))],
                      eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id, top_k=top_k)
        answers += a
        ended += e
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    return texts, prompt_ids, answers, ended


@torch.no_grad()
def answer_logprobs(model, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int,
                    batch_size: int = 16, temperature: float = 1.0) -> list[torch.Tensor]:
    """Per-token log-probabilities of each answer given its prompt (logits / temperature); (answer_len,) each."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompt_ids), batch_size):
        answers = answer_ids[start:start + batch_size]
        batch = pack_query_response(prompt_ids[start:start + batch_size], answers, pad_id, device)
        logprobs, _ = forward_logprobs_values(model, None, batch["query_response"], batch["attention_mask"],
                                              batch["context_length"], temperature)   # the same path as PPO's
        out += [logprobs[row, :len(a)].cpu() for row, a in enumerate(answers)]
    return out


def policy_stats(policy, tokenizer, reward_model, prompts: list[list[dict]], adapter: str | None, *,
                 samples: int, max_new_tokens: int, seed: int, max_prompt_tokens: int = 1024,
                 temperature: float = 0.7) -> dict:
    """Mean RM score, KL to the base (nats per answer), length and EOS rate of one version's sampled answers.

    Sampled as PPO samples (whole vocabulary, `temperature`), so the KL here is the KL that PPO penalised.
    """
    repeated = [p for p in prompts for _ in range(samples)]
    with using_adapter(policy, adapter):
        texts, prompt_ids, answer_ids, ended = generate_answers(
            policy, tokenizer, repeated, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
            max_prompt_tokens=max_prompt_tokens, top_k=0)
        # the EOS token is part of the answer the policy chose: count its logprob too
        with_eos = [a + [tokenizer.eos_token_id] * e for a, e in zip(answer_ids, ended)]
        logprobs = answer_logprobs(policy, prompt_ids, with_eos, tokenizer.pad_token_id, temperature=temperature)
    with using_adapter(policy, None):
        ref_logprobs = answer_logprobs(policy, prompt_ids, with_eos, tokenizer.pad_token_id, temperature=temperature)
    kl = [float((lp - ref).sum()) for lp, ref in zip(logprobs, ref_logprobs)]
    scores = reward_model.score(repeated, texts) if reward_model is not None else torch.zeros(len(texts))
    return {"score": float(scores.float().mean()), "scores": scores.float().tolist(), "kl": sum(kl) / len(kl),
            "length": sum(len(a) for a in answer_ids) / len(answer_ids), "eos_rate": sum(ended) / len(ended),
            "examples": [{"prompt": p[-1]["content"], "answer": t} for p, t in zip(repeated[:4], texts[:4])]}


def gate_decision(candidate: dict, serving: dict, cfg) -> tuple[bool, str]:
    """Promote only a candidate whose reward beats the serving one's without drifting too far (GateConfig)."""
    values = [candidate["score"], candidate["kl"], candidate["length"]]
    if any(math.isnan(v) or math.isinf(v) for v in values):
        return False, "rejected: NaN or infinite metrics"
    gain = candidate["score"] - serving["score"]
    if gain <= cfg.min_reward_gain:
        return False, f"rejected: reward gain {gain:+.3f} is not above {cfg.min_reward_gain}"
    if candidate["kl"] > cfg.max_kl:
        return False, f"rejected: KL to base {candidate['kl']:.2f} nats is above {cfg.max_kl}"
    ratio = candidate["length"] / max(serving["length"], 1e-6)
    if ratio > cfg.max_length_ratio:
        return False, f"rejected: answers {ratio:.2f}x as long as the serving policy's"
    return True, f"passed: reward {gain:+.3f} over the serving policy, KL {candidate['kl']:.2f} nats"


def oracle_win_rate(judge, prompts: list[str], answers_policy: list[str], answers_against: list[str],
                    seed: int = 0) -> dict:
    """Ask the oracle with the order swapped half the time; win_rate excludes ties."""
    rng = random.Random(seed)
    wins = losses = ties = 0
    for prompt, mine, theirs in zip(prompts, answers_policy, answers_against):
        swapped = rng.random() < 0.5
        verdict = judge(prompt, theirs, mine) if swapped else judge(prompt, mine, theirs)
        if verdict == "tie":
            ties += 1
        elif (verdict == "a") != swapped:
            wins += 1
        else:
            losses += 1
    decided = wins + losses
    return {"win_rate": wins / decided if decided else None, "wins": wins, "losses": losses, "ties": ties,
            "comparisons": len(prompts)}


def resolve_version(store, version: str) -> tuple[str, str | None]:
    """(version id, adapter path or None for the base) for an id, `base` or `latest`."""
    if version == "base":
        return "base", None
    if version == "latest":
        rows = [v for v in store.versions() if v["status"] != "rejected"] or store.versions()
        if not rows:
            return "base", None
        row = rows[-1]
    else:
        row = store.version(version)
        if row is None:
            raise ValueError(f"no policy version {version!r} in {store.path}")
    return row["id"], row["adapter_path"]


def evaluate_cli(config, *, oracle: str, prompts_file: str, policy: str, against: str, samples: int = 1) -> dict:
    """`run.py evaluate`: one answer per prompt (× samples) from each policy, judged by the oracle."""
    from peft import PeftModel

    from chat_app.model import load_model, load_tokenizer
    from chat_app.store import Store

    judge = load_oracle(oracle)
    store = Store(config.serve.db_path)
    prompt_texts = load_prompts(prompts_file)
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    names = {}
    for side, version in (("policy", policy), ("against", against)):
        version_id, path = resolve_version(store, version)
        names[side] = version_id
        if path is None:
            continue
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, path, adapter_name=version_id)
        elif version_id not in model.peft_config:
            model.load_adapter(path, adapter_name=version_id)
    repeated = [p for p in prompt_texts for _ in range(samples)]
    answers = {}
    for side in ("policy", "against"):
        adapter = None if names[side] == "base" else names[side]
        with using_adapter(model, adapter):
            answers[side] = generate_answers(model, tokenizer, [as_messages(p) for p in repeated],
                                             max_new_tokens=config.serve.max_new_tokens,
                                             temperature=config.serve.temperature, top_p=config.serve.top_p,
                                             seed=17 if side == "policy" else 29)
    result = oracle_win_rate(judge, repeated, answers["policy"][0], answers["against"][0])
    lengths = {side: sum(len(a) for a in answers[side][2]) / len(repeated) for side in answers}
    return {**result, "policy": names["policy"], "against": names["against"], "prompts": len(prompt_texts),
            "samples_per_prompt": samples, "oracle": oracle, "mean_tokens": lengths,
            "eos_rate": {side: sum(answers[side][3]) / len(repeated) for side in answers}}
