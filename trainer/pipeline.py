"""One retrain cycle: SFT (if demonstrations), reward model, PPO, evaluation gate, a new versioned adapter."""
from __future__ import annotations

import json
import logging
import os
import resource
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

from chat_app.config import Config
from chat_app.store import Store
from trainer import distributed
from trainer.data import load_prompts, prompt_pool

log = logging.getLogger(__name__)


class Progress:
    """Prints each update and stores it in the run's row, so the operator page can follow along."""

    def __init__(self, store: Store, run_id: int, min_interval_s: float = 1.0):
        self.store, self.run_id, self.min_interval_s = store, run_id, min_interval_s
        self.last_write = 0.0
        self.state: dict = {}

    def __call__(self, update: dict):
        self.state = {**self.state, **update, "updated_at": time.time()}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in update.items())
        print(f"{time.strftime('%H:%M:%S')} [run {self.run_id}] {shown}", flush=True)
        if time.time() - self.last_write >= self.min_interval_s or update.get("step") == update.get("steps"):
            self.store.update_run(self.run_id, progress=self.state)
            self.last_write = time.time()


def retrain(config: Config, run_id: int | None = None, promote: bool | None = None) -> dict:
    """Run one cycle and return its summary. Standalone runs (no run_id) promote in the DB themselves;
    runs started by the server leave the hot-swap to it. Under `accelerate launch` (schedule.trainer_launcher) the
    other processes only share PPO's work (`_ppo_worker`); rank 0 does everything else, the database included."""
    distributed.init_from_env()
    if not distributed.is_main():
        return _ppo_worker(config)
    store = Store(config.serve.db_path)
    standalone = run_id is None
    if run_id is None:
        run_id = store.start_run("command line", pid=os.getpid())
    promote = standalone if promote is None else promote
    try:
        summary = _retrain(config, store, run_id, promote)
    except BaseException as error:   # recorded, then re-raised: the exit code tells the scheduler too
        store.finish_run(run_id, "failed", error=f"{type(error).__name__}: {error}\n{traceback.format_exc()[-3000:]}")
        raise
    return summary


def _retrain(config: Config, store: Store, run_id: int, promote: bool) -> dict:
    from chat_app.model import load_model, load_tokenizer
    from trainer.evaluate import gate_decision, gate_figures, policy_stats
    from trainer.ppo import load_value_head, make_policy, save_policy, served_rows, train_ppo, ValueHead
    from trainer.reward import train_reward_model
    from trainer.sft import sft_loss, train_sft
    from trainer.threads import core_borrower

    progress = Progress(store, run_id)
    # the server's core too while nobody chats (one process only: under accelerate the processes share the cores)
    borrower = core_borrower(config.schedule.trainer_threads, config.schedule.trainer_idle_threads) \
        if distributed.world_size() == 1 else None
    pace = borrower or (lambda: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    counts = store.vote_counts()
    pairs, demos = store.preference_pairs(), store.demonstrations()
    store.update_run(run_id, votes_total=counts["total"], pairs=len(pairs), demonstrations=len(demos))
    metrics: dict = {"data/votes": counts["total"], "data/pairs": len(pairs), "data/ties": counts["tie"],
                     "data/both_bad": counts["both_bad"], "data/demonstrations": len(demos)}
    progress({"stage": "loading", "step": 0, "steps": 1})

    # 1. the base, the serving adapter (the new policy starts from it) and the previous reward adapter
    tokenizer = load_tokenizer(config.model)
    serving = store.serving_version()
    parent = serving["id"] if serving else "base"
    previous_rm = serving.get("reward_adapter_path") if serving else None

    # 2. reward model on every A/B vote (and the ties, for the heads)
    t0 = time.perf_counter()
    pace()
    base = None
    if config.reward.kind == "heads":
        from trainer.reward_heads import FEATURES_FILE, FEATURES_FOLDER, is_head_reward_model, train_head_reward_model

        base = load_model(config.model, tokenizer)          # read frozen, then wrapped by the policy's LoRA below
        # features depend on the base and the votes only: kept in their own folder by every run that reads any (a
        # run skipped for chance too); before there was one, the newest version's cache, even a rejected one's
        shared = Path(config.serve.adapters_dir) / FEATURES_FOLDER
        cached = shared if (shared / FEATURES_FILE).exists() else next(
            (v["reward_adapter_path"] for v in reversed(store.versions())
             if is_head_reward_model(v.get("reward_adapter_path"))), None)
        reward_model, rm_metrics = train_head_reward_model(
            base, tokenizer, config.reward, store.preference_pairs(include_ties=config.reward.use_ties),
            previous=cached, progress=progress, seed=0, cache_folder=shared)
    else:
        warm = config.reward.warm_start and previous_rm and Path(previous_rm).exists() \
            and not (Path(previous_rm) / "reward_heads.json").exists()
        reward_model, rm_metrics = train_reward_model(
            config.model, config.reward, tokenizer, pairs, init_adapter=previous_rm if warm else None,
            progress=progress, seed=0)  # a fixed seed keeps each prompt on its side of the split across runs
    timings["time/reward_s"] = time.perf_counter() - t0
    metrics.update(rm_metrics)
    if reward_model is None:
        distributed.broadcast_object(None)                  # the other processes: no PPO this time
        distributed.finish()
        reason = rm_metrics.get("rm/skipped", "skipped")
        store.finish_run(run_id, "skipped", error=reason, metrics=metrics)
        return {"run_id": run_id, "status": "skipped", "reason": reason, **metrics}

    # 3. the policy: LoRA over the base, warm-started from the serving adapter (unless ppo.warm_start is false)
    base = base if base is not None else load_model(config.model, tokenizer)
    parent_path = serving["adapter_path"] if serving and Path(serving["adapter_path"]).exists() else None
    start_path = parent_path if config.ppo.warm_start else None   # the serving policy, or the base afresh
    policy = make_policy(base, config.lora, init_adapter=start_path)
    if config.reward.kind == "heads":
        reward_model.backbone = policy                      # features with the adapter disabled: the same base
    hidden = base.config.hidden_size
    value_head = (load_value_head(start_path, hidden) if start_path else None) or ValueHead(hidden)
    value_head.to(next(policy.parameters()).device)
    max_prompt = config.model.max_context_tokens - config.ppo.response_length

    # 4. SFT on user-written answers, when there are enough
    if config.sft.enabled and len(demos) >= config.sft.min_demonstrations:
        t0 = time.perf_counter()
        pace()
        metrics.update(train_sft(policy, tokenizer, demos, config.sft, max_prompt, progress=progress, seed=run_id))
        timings["time/sft_s"] = time.perf_counter() - t0

    # 5. PPO against the reward model, on prompts users sent (plus seed prompts), gate prompts held out
    seed_prompts = load_prompts(config.schedule.seed_prompts) if config.schedule.seed_prompts else []
    train_prompts, gate_prompts = prompt_pool(store.user_prompts(), seed_prompts, config.gate.eval_prompts, run_id)
    ptx = None
    if config.ppo.ptx_coef > 0 and demos:
        ptx = lambda batch: sft_loss(policy, tokenizer, batch, max_prompt)  # noqa: E731
    # the parent's own answers that users voted on (decided pairs, not on the gate's prompts): rows PPO need not sample
    held_out = {json.dumps(m) for m in gate_prompts}
    served = [p for p in pairs if p["versions"]["chosen"] == p["versions"]["rejected"] == parent
              and json.dumps(p["prompt_messages"]) not in held_out] if config.ppo.served_pairs > 0 else []
    served = served_rows(tokenizer, served, max_prompt, config.ppo.response_length)
    metrics["ppo/served_pairs_available"] = len(served) // 2
    distributed.broadcast_object({"prompts": train_prompts, "start_path": start_path, "seed": run_id,
                                  "demos": demos if ptx else [], "served": served})   # what the others' PPO needs
    t0 = time.perf_counter()
    ppo_cfg = config.ppo
    if ppo_cfg.cycle_minutes > 0:                           # what the cycle's budget leaves PPO, the gate set aside
        left = ppo_cfg.cycle_minutes - ppo_cfg.gate_reserve_minutes - (t0 - started) / 60
        if ppo_cfg.max_minutes <= 0 or left < ppo_cfg.max_minutes:   # rank 0's clock stops the others too
            ppo_cfg = replace(ppo_cfg, max_minutes=max(left, 1e-6))   # none left: one iteration
            print(f"ppo: {ppo_cfg.max_minutes:.1f} min left of the {config.ppo.cycle_minutes:g} min cycle", flush=True)
    metrics["ppo/budget_minutes"] = ppo_cfg.max_minutes
    # one process: the reward model's own scoring; the heads' PPO reward weighs their length effect apart
    reward_fn = distributed.scored_on_main(getattr(reward_model, "ppo_score", reward_model.score))

    ppo_metrics = train_ppo(policy, value_head, tokenizer, train_prompts, reward_fn, ppo_cfg,
                            progress=progress, ptx_batches=(demos, ptx) if ptx else None, seed=run_id,
                            max_context_tokens=config.model.max_context_tokens, pace=borrower, served=served)
    distributed.finish()                                    # the others exit; the gate and the database are rank 0's
    timings["time/ppo_s"] = time.perf_counter() - t0
    metrics.update(ppo_metrics)

    # 6. the gate: candidate and serving policy answer the same held-out prompts
    t0 = time.perf_counter()
    progress({"stage": "gate", "step": 0, "steps": 2})
    pace()
    if parent != "base":
        policy.load_adapter(parent_path, adapter_name="serving")
    stats_args = dict(samples=config.gate.samples_per_prompt, max_new_tokens=config.ppo.response_length,
                      seed=run_id, max_prompt_tokens=max_prompt, temperature=config.ppo.temperature)
    candidate = policy_stats(policy, tokenizer, reward_model, gate_prompts, "default", **stats_args)
    progress({"stage": "gate", "step": 1, "steps": 2})
    pace()
    incumbent = policy_stats(policy, tokenizer, reward_model, gate_prompts,
                             None if parent == "base" else "serving", **stats_args)
    progress({"stage": "gate", "step": 2, "steps": 2})
    passed, reason = gate_decision(candidate, incumbent, config.gate)
    timings["time/gate_s"] = time.perf_counter() - t0
    metrics.update(gate_figures(candidate, incumbent))
    for stats in (candidate, incumbent):
        stats.pop("member_scores"), stats.pop("lengths")
    wins = [c > s for c, s in zip(candidate.pop("scores"), incumbent.pop("scores"))]   # same prompts, same order
    metrics.update({"eval/win_rate": sum(wins) / len(wins), "eval/candidate_score": candidate["score"], "eval/serving_score": incumbent["score"],
                    "eval/reward_gain": candidate["score"] - incumbent["score"], "eval/candidate_kl": candidate["kl"],
                    "eval/candidate_kl_sampled": candidate["kl_sampled"],
                    "eval/serving_kl": incumbent["kl"], "eval/candidate_length": candidate["length"],
                    "eval/serving_length": incumbent["length"], "eval/candidate_eos_rate": candidate["eos_rate"],
                    "eval/gate_prompts": len(gate_prompts), "eval/passed": passed})
    timings["time/total_s"] = time.perf_counter() - started
    metrics.update(timings)
    if borrower is not None:                                # how much of the run had the server's core too
        metrics["time/borrowed_share"] = borrower.borrowed_share
    metrics["memory/peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: kB

    # 7. save and register the version: candidate when it passed (the server promotes it), else rejected
    version = store.next_version_id()
    folder = Path(config.serve.adapters_dir) / version
    if parent != "base":
        policy.delete_adapter("serving")
    policy.set_adapter("default")
    save_policy(policy, value_head, folder)
    reward_model.save(folder / "reward")
    store.add_version(version, str(folder), parent=parent, run_id=run_id, metrics=metrics,
                      status="candidate" if passed else "rejected", reason=reason,
                      reward_adapter_path=str(folder / "reward"))
    store.finish_run(run_id, "succeeded" if passed else "rejected", candidate_version=version, metrics=metrics,
                     error=None if passed else reason)
    if passed and promote:
        store.mark_serving(version, actor="retrain", action="promote")
    log.info("run %d: %s %s", run_id, version, reason)
    return {"run_id": run_id, "status": "succeeded" if passed else "rejected", "version": version,
            "parent": parent, "reason": reason,
            "promoted": (passed and promote) or ("by the server, after this run" if passed else False),
            "candidate": candidate,
            "serving": incumbent, **metrics}


def _ppo_worker(config: Config) -> dict:
    """A process other than rank 0: the policy as rank 0 built it, then PPO on its share of each iteration's rows,
    scored by rank 0's reward model; no database, no files written."""
    from chat_app.model import load_model, load_tokenizer
    from trainer.ppo import load_value_head, make_policy, train_ppo, ValueHead
    from trainer.sft import sft_loss

    plan, rank = distributed.broadcast_object(), distributed.rank()   # waits while rank 0 trains the reward model
    if plan is None:
        distributed.finish()
        return {"rank": rank, "status": "no PPO"}
    tokenizer = load_tokenizer(config.model)
    base = load_model(config.model, tokenizer)
    policy = make_policy(base, config.lora, init_adapter=plan["start_path"])   # train_ppo copies rank 0's weights
    hidden = base.config.hidden_size
    value_head = (load_value_head(plan["start_path"], hidden) if plan["start_path"] else None) or ValueHead(hidden)
    max_prompt = config.model.max_context_tokens - config.ppo.response_length
    ptx = (plan["demos"], lambda batch: sft_loss(policy, tokenizer, batch, max_prompt)) if plan["demos"] else None
    train_ppo(policy, value_head, tokenizer, plan["prompts"], distributed.scored_on_main(None), config.ppo,
              ptx_batches=ptx, seed=plan["seed"], max_context_tokens=config.model.max_context_tokens,
              served=plan["served"])
    distributed.finish()
    return {"rank": rank, "status": "PPO share done"}
