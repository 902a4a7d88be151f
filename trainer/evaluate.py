"""Evaluation: answers from a policy version, their reward, KL to the base and length; the gate; oracle win rates."""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys

import torch

from chat_app.chat import encode_prompt
from chat_app.decoding import TOP_K, decode
from chat_app.packed import policy_copy
from trainer.data import as_messages, load_prompts
from trainer.oracles import load_oracle
from trainer.ppo import forward_logits_values, logprobs_from_logits, pack_query_response, response_mask, token_kl
from trainer.ratings import OUTCOMES, length_controlled_win_rate, relative_length_difference, win_rate_summary


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
def answer_kls(policy, adapter: str | None, prompt_ids: list[list[int]], answer_ids: list[list[int]], pad_id: int,
               batch_size: int = 4, temperature: float = 1.0) -> tuple[list[float], list[float]]:
    """Each answer's KL to the base (logits / temperature), two ways: (sampled, exact). Sampled sums the log-ratio of
    the tokens it holds, exact the KL of the whole next-token distributions at the same positions (`token_kl`): the
    same expectation, less spread. `adapter` is the version that wrote the answers; the base is `policy` without it."""
    device = next(policy.parameters()).device
    sampled, exact = [], []
    for start in range(0, len(prompt_ids), batch_size):          # a few rows: two (rows, tokens, vocab) tensors
        answers = answer_ids[start:start + batch_size]
        batch = pack_query_response(prompt_ids[start:start + batch_size], answers, pad_id, device)
        args = (batch["query_response"], batch["attention_mask"], batch["context_length"], temperature)
        with using_adapter(policy, adapter):
            logits, _ = forward_logits_values(policy, None, *args)   # the same path as PPO's
        with using_adapter(policy, None):
            ref_logits, _ = forward_logits_values(policy, None, *args)
        targets = batch["query_response"][:, batch["context_length"]:]
        mask = response_mask(batch["response_lengths"], targets.shape[1])
        log_ratio = logprobs_from_logits(logits, targets) - logprobs_from_logits(ref_logits, targets)
        sampled += (log_ratio * mask).sum(1).tolist()
        exact += (token_kl(logits, ref_logits) * mask).sum(1).tolist()
    return sampled, exact


def policy_stats(policy, tokenizer, reward_model, prompts: list[list[dict]], adapter: str | None, *,
                 samples: int, max_new_tokens: int, seed: int, max_prompt_tokens: int = 1024,
                 temperature: float = 0.7) -> dict:
    """Mean RM score, KL to the base (nats per answer), length and EOS rate of one version's sampled answers.

    Sampled as PPO samples (whole vocabulary, `temperature`), so the KL here is the KL that PPO penalised: `kl` is
    the exact per-position KL summed over each answer (`answer_kls`; 40 answers of a 300-vote policy spread 4.6 nats
    per answer this way against 5.9 for the sampled log-ratio, whose mean is `kl_sampled`).
    """
    repeated = [p for p in prompts for _ in range(samples)]
    with using_adapter(policy, adapter):
        texts, prompt_ids, answer_ids, ended = generate_answers(
            policy, tokenizer, repeated, max_new_tokens=max_new_tokens, seed=seed, temperature=temperature,
            max_prompt_tokens=max_prompt_tokens, top_k=0)
    # the EOS token is part of the answer the policy chose: count its position too
    with_eos = [a + [tokenizer.eos_token_id] * e for a, e in zip(answer_ids, ended)]
    kl_sampled, kl = answer_kls(policy, adapter, prompt_ids, with_eos, tokenizer.pad_token_id, temperature=temperature)
    members = None
    if reward_model is None:
        scores = torch.zeros(len(texts))
    elif hasattr(reward_model, "ensemble"):                      # the heads: every member's score, for the spread
        members = reward_model.ensemble.member_scores(reward_model.features(repeated, texts))   # (members, n)
        scores = members.mean(0)
    else:
        scores = reward_model.score(repeated, texts)
    return {"score": float(scores.float().mean()), "scores": scores.float().tolist(), "kl": sum(kl) / len(kl),
            "kl_sampled": sum(kl_sampled) / len(kl_sampled),
            "member_scores": members.tolist() if members is not None else None,
            "lengths": [len(a) for a in answer_ids],
            "length": sum(len(a) for a in answer_ids) / len(answer_ids), "eos_rate": sum(ended) / len(ended),
            "examples": [{"prompt": p[-1]["content"], "answer": t} for p, t in zip(repeated[:4], texts[:4])]}


def gate_figures(candidate: dict, serving: dict) -> dict:
    """What the gate decides on, from two `policy_stats` over the same prompts in the same order.

    eval/reward_gain: mean RM score, candidate minus serving. eval/reward_gain_std: its uncertainty, the sampling
    error of the paired differences and, for an ensemble, the spread of the gain across its heads, combined.
    eval/reward_gain_lc: the gain at equal length (least squares of score on length and which version), so an
    operator sees when a version only got longer or shorter. eval/length_ratio: candidate over serving length.
    """
    cand, serv = torch.tensor(candidate["scores"]), torch.tensor(serving["scores"])
    gain = (cand.mean() - serv.mean()).item()
    paired = cand - serv
    sampling_var = (paired.var() / len(paired)).item() if len(paired) > 1 else 0.0
    heads_var = 0.0
    if candidate.get("member_scores") and serving.get("member_scores"):
        member_gains = torch.tensor(candidate["member_scores"]).mean(1) - torch.tensor(serving["member_scores"]).mean(1)
        heads_var = member_gains.var().item() if len(member_gains) > 1 else 0.0
    lengths = torch.tensor(candidate["lengths"] + serving["lengths"], dtype=torch.float64)
    scores = torch.cat([cand, serv]).double()
    is_candidate = torch.cat([torch.ones(len(cand)), torch.zeros(len(serv))]).double()
    columns = [torch.ones_like(lengths), is_candidate]
    if lengths.std() > 1e-6:             # equal lengths leave nothing to control for (and a rank-deficient fit)
        columns.append((lengths - lengths.mean()) / lengths.std())
    design = torch.stack(columns, 1)
    coef = torch.linalg.pinv(design) @ scores   # the minimum-norm least squares: deterministic on every CPU
    per_length = coef[2].item() if len(coef) > 2 else 0.0
    return {"eval/reward_gain": gain, "eval/reward_gain_std": math.sqrt(sampling_var + heads_var),
            "eval/reward_gain_lc": coef[1].item(), "eval/reward_per_length_std": per_length,
            "eval/length_ratio": candidate["length"] / max(serving["length"], 1e-6)}


def gate_decision(candidate: dict, serving: dict, cfg) -> tuple[bool, str]:
    """Promote only a candidate whose reward beats the serving one's without drifting too far (GateConfig)."""
    values = [candidate["score"], candidate["kl"], candidate["length"]]
    if any(math.isnan(v) or math.isinf(v) for v in values):
        return False, "rejected: NaN or infinite metrics"
    figures = gate_figures(candidate, serving)
    gain, spread, ratio = figures["eval/reward_gain"], figures["eval/reward_gain_std"], figures["eval/length_ratio"]
    shown = (f"reward {gain:+.3f} ± {spread:.3f} ({figures['eval/reward_gain_lc']:+.3f} at equal length), "
             f"KL {candidate['kl']:.2f} nats, length x{ratio:.2f}")
    if gain <= cfg.min_reward_gain + cfg.min_gain_in_std * spread:
        need = f"{cfg.min_reward_gain}" + (f" + {cfg.min_gain_in_std:g} × its uncertainty" if cfg.min_gain_in_std else "")
        return False, f"rejected: reward gain is not above {need}: {shown}"
    if candidate["kl"] > cfg.max_kl:
        return False, f"rejected: KL to base {candidate['kl']:.2f} nats is above {cfg.max_kl}: {shown}"
    if cfg.max_length_ratio > 0 and ratio > cfg.max_length_ratio:
        return False, f"rejected: answers {ratio:.2f}x as long as the serving policy's (max {cfg.max_length_ratio}): {shown}"
    return True, f"passed: {shown}"


def oracle_win_rate(judge, prompts: list[str], answers_policy: list[str], answers_against: list[str],
                    seed: int = 0, *, tokens_policy: list[int] | None = None,
                    tokens_against: list[int] | None = None) -> dict:
    """Counts and win rates of the policy by one judge, length-controlled when given the answers' token counts.

    The fields are those of `trainer.ratings.length_controlled_win_rate` (`win_rate_summary` without tokens):
    win_rate counts a tie as half, decided_win_rate leaves ties out.
    """
    outcomes = [OUTCOMES[w] for w in judge_pairs(judge, prompts, answers_policy, answers_against, seed)]
    if tokens_policy is None or tokens_against is None:
        return win_rate_summary(outcomes, seed=seed)
    return length_controlled_win_rate(outcomes, relative_length_difference(tokens_policy, tokens_against), seed=seed)


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


def judge_pairs(judge, prompts: list[str], answers_policy: list[str], answers_against: list[str],
                seed: int = 0) -> list[str]:
    """The judge's verdict on each pair from the policy's side: "policy" | "against" | "tie"."""
    rng = random.Random(seed)                  # one seed: every judge sees each pair in the same order
    winners = []
    for prompt, mine, theirs in zip(prompts, answers_policy, answers_against):
        swapped = rng.random() < 0.5           # shown in either order, as judges favour a position
        verdict = judge(prompt, theirs, mine) if swapped else judge(prompt, mine, theirs)
        if verdict not in ("a", "b", "tie", "both_bad"):
            raise ValueError(f"a judge returned {verdict!r}, not 'a', 'b' or 'tie'")
        if verdict in ("tie", "both_bad"):     # both bad is a tie, as in Arena
            winners.append("tie")
        else:
            winners.append("policy" if (verdict == "a") != swapped else "against")
    return winners


def summary_line(name: str, report: dict) -> str:
    """`name: win 0.62 [0.55, 0.69] (won-lost-tied 112-68-20 of 200), length-controlled 0.58 [0.50, 0.66], length effect +0.31`"""
    if not report["comparisons"]:
        return f"{name}: no comparisons"
    low, high = report["win_rate_interval"]
    lc_low, lc_high = report["length_controlled_interval"]
    effect = "n/a" if report["length_effect"] is None else f"{report['length_effect']:+.2f}"
    return (f"{name}: win {report['win_rate']:.2f} [{low:.2f}, {high:.2f}] "
            f"(won-lost-tied {report['wins']}-{report['losses']}-{report['ties']} of {report['comparisons']}), "
            f"length-controlled {report['length_controlled_win_rate']:.2f} [{lc_low:.2f}, {lc_high:.2f}], length effect {effect}")


def reward_agreement(margins: list[float], winners: dict[str, list[str]]) -> dict:
    """How a reward model reads the judged pairs: how often it prefers the policy's answer (margin > 0), and, per
    judge, on how many of the pairs that judge decided it picks the judge's winner (issue 12: is it the reward model
    that fails the voters' judge, or a policy that moved too little by the reward model's own measure?)."""
    n = len(margins)
    report = {"comparisons": n, "prefers_policy": sum(m > 0 for m in margins),
              "prefers_policy_rate": sum(m > 0 for m in margins) / n if n else 0.0,
              "mean_margin": sum(margins) / n if n else 0.0, "judges": {}}
    for name, verdicts in winners.items():
        decided = [(m, w) for m, w in zip(margins, verdicts) if w != "tie"]
        agree = sum((m > 0) == (w == "policy") for m, w in decided)
        report["judges"][name] = {"agree": agree, "decided": len(decided),
                                  "rate": agree / len(decided) if decided else 0.0}
    return report


def agreement_line(version: str, report: dict) -> str:
    """`reward model of v3: prefers the policy in 123 of 200 (0.62); agrees with readable on 121 of 150 decided (0.81), ...`"""
    judges = ", ".join(f"{name} on {j['agree']} of {j['decided']} decided ({j['rate']:.2f})"
                       for name, j in report["judges"].items())
    return (f"reward model of {version}: prefers the policy in {report['prefers_policy']} of {report['comparisons']} "
            f"({report['prefers_policy_rate']:.2f}); agrees with {judges}")


def reward_folder(store, version: str) -> str:
    """The heads reward model trained with `version`; a one-line error when it has none."""
    from trainer.reward_heads import is_head_reward_model

    if version == "base":
        raise ValueError("the base has no reward model: name a trained version with --reward-agreement")
    row = store.version(version)
    if row is None:
        raise ValueError(f"no policy version {version!r} in {store.path}")
    folder = row.get("reward_adapter_path")
    if not is_head_reward_model(folder):
        raise ValueError(f"version {version!r} has no reward model of heads (reward.kind: heads) to check")
    return folder


def evaluate_cli(config, *, oracles: list[str] | None = None, prompts_file: str, policy: str, against: str,
                 samples: int = 1, out: str | None = None, oracle: str | None = None,
                 agreement_of: str | None = None) -> dict:
    """`run.py evaluate`: each policy answers every prompt (× samples) once, and every judge rates the same pairs.

    Args:
        oracles: built-in judge names or module:function specs; `oracle` (one name) is the older keyword.
        out: a JSONL file to write every comparison to (both answers, token counts, each judge's winner).
        agreement_of: a version whose reward model also scores every pair (`reward_agreement`); `policy` for the
            policy's own.
    """
    from peft import PeftModel

    from chat_app.model import load_model, load_tokenizer
    from chat_app.store import Store

    # 1. judges first, so a misspelt one fails before minutes of sampling
    judges = {name: load_oracle(name) for name in dict.fromkeys([*(oracles or []), *([oracle] if oracle else [])])}
    if not judges:
        raise ValueError("evaluate needs at least one oracle")
    store = Store(config.serve.db_path)
    prompt_texts = load_prompts(prompts_file)
    if not prompt_texts:
        raise ValueError(f"no prompts in {prompts_file}")
    versions = {side: resolve_version(store, version) for side, version in (("policy", policy), ("against", against))}
    agreement_version = versions["policy"][0] if agreement_of == "policy" else agreement_of
    agreement_folder = reward_folder(store, agreement_version) if agreement_of else None
    tokenizer = load_tokenizer(config.model)
    model = load_model(config.model, tokenizer)
    names = {}
    for side, (version_id, path) in versions.items():
        names[side] = version_id
        if path is None:
            continue
        if not isinstance(model, PeftModel):
            model = PeftModel.from_pretrained(model, path, adapter_name=version_id)
        elif version_id not in model.peft_config:
            model.load_adapter(path, adapter_name=version_id)

    # 2. one sampling per side, shared by every judge
    repeated = [p for p in prompt_texts for _ in range(samples)]
    answers = {}
    for side in ("policy", "against"):
        adapter = None if names[side] == "base" else names[side]
        with using_adapter(model, adapter):
            answers[side] = generate_answers(model, tokenizer, [as_messages(p) for p in repeated],
                                             max_new_tokens=config.serve.max_new_tokens,
                                             temperature=config.serve.temperature, top_p=config.serve.top_p,
                                             seed=17 if side == "policy" else 29)
    texts = {side: answers[side][0] for side in answers}
    tokens = {side: [len(a) for a in answers[side][2]] for side in answers}    # EOS not counted

    # 3. every judge on the same pairs, shown in the same order
    length_diffs = relative_length_difference(tokens["policy"], tokens["against"])
    winners, reports = {}, {}
    for name, judge in judges.items():
        winners[name] = judge_pairs(judge, repeated, texts["policy"], texts["against"])
        reports[name] = length_controlled_win_rate([OUTCOMES[w] for w in winners[name]], length_diffs)
        print(summary_line(name, reports[name]), file=sys.stderr)
    margins = None
    if agreement_folder:                       # the reward model reads the base's features of the same answers
        from trainer.reward_heads import HeadRewardModel

        rm = HeadRewardModel.load(model, tokenizer, agreement_folder)
        messages = [as_messages(p) for p in repeated]
        margins = (rm.score(messages, texts["policy"]) - rm.score(messages, texts["against"])).tolist()
        agreement = reward_agreement(margins, winners)
        print(agreement_line(agreement_version, agreement), file=sys.stderr)
    if out:
        with open(out, "w") as f:
            for i, prompt in enumerate(repeated):
                f.write(json.dumps({"prompt": prompt, "answer_policy": texts["policy"][i],
                                    "answer_against": texts["against"][i], "tokens_policy": tokens["policy"][i],
                                    "tokens_against": tokens["against"][i],
                                    "winners": {name: winners[name][i] for name in judges},
                                    **({"reward_margin": margins[i]} if margins else {})}) + "\n")
    count = max(len(repeated), 1)
    return {"policy": names["policy"], "against": names["against"], "prompts": len(prompt_texts),
            "samples_per_prompt": samples, "comparisons": len(repeated),
            "mean_tokens": {side: sum(tokens[side]) / count for side in answers},
            "eos_rate": {side: sum(answers[side][3]) / count for side in answers}, "judges": reports,
            **({"reward_agreement": {"version": agreement_version, **agreement}} if margins is not None else {})}
