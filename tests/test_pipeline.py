"""One retrain cycle on the tiny model through a real SQLite file: versions, runs, metrics, evaluate."""
import json
from pathlib import Path

import pytest

from trainer.data import as_messages, load_prompts, prompt_pool


def add_votes(store, count: int):
    prompts = load_prompts("trainer/seed_prompts.jsonl")
    for i in range(count):
        cid = store.create_comparison(prompt_messages=as_messages(prompts[i % len(prompts)]), sampling={},
                                      source="simulated")
        short, long = "Yes, indeed.", "Well, it depends on a great many things " * 3
        store.complete_comparison(cid, answer_a=short if i % 2 else long, answer_b=long if i % 2 else short,
                                  policy_version="base")
        store.record_vote(cid, "a" if i % 2 else "b", "oracle")


def test_too_few_votes_is_a_skipped_run_not_an_error(tiny_config):
    from chat_app.store import Store
    from trainer.pipeline import retrain

    add_votes(Store(tiny_config.serve.db_path), 3)
    summary = retrain(tiny_config)
    assert summary["status"] == "skipped" and "3 pairs, need 8" in summary["reason"]
    run = Store(tiny_config.serve.db_path).runs()[0]
    assert run["status"] == "skipped" and run["ended_at"]


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_a_cycle_registers_a_versioned_adapter_with_its_metrics(tiny_config, quantization):
    from chat_app.store import Store
    from trainer.pipeline import retrain

    if quantization != "none":   # reward model and PPO over a bitsandbytes 4-bit base
        pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (in the test extra)")
        tiny_config.model.quantization = quantization

    store = Store(tiny_config.serve.db_path)
    add_votes(store, 24)
    summary = retrain(tiny_config)
    assert summary["status"] in ("succeeded", "rejected"), summary
    version = store.version(summary["version"])
    assert version["parent"] == "base" and version["reason"] == summary["reason"]
    assert version["status"] == ("serving" if summary["status"] == "succeeded" else "rejected")
    for key in ("rm/accuracy", "objective/kl", "objective/score", "eval/reward_gain", "eval/win_rate",
                "time/ppo_s", "data/pairs"):
        assert key in version["metrics"], key
    assert (Path(version["adapter_path"]) / "adapter_model.safetensors").exists()
    assert (Path(version["adapter_path"]) / "value_head.safetensors").exists()
    # the reward features, kept apart from the versions for the next run
    assert (Path(tiny_config.serve.adapters_dir) / "reward_features" / "features.safetensors").exists()
    run = store.run(summary["run_id"])
    assert run["candidate_version"] == summary["version"] and run["progress"]["stage"] == "gate"
    assert json.dumps(summary)  # the CLI prints it


def test_the_cycle_budget_shortens_ppo_not_the_cycle(tiny_config):
    """Whatever the reward model took comes out of PPO's minutes: with no minutes left, PPO runs one iteration."""
    from chat_app.store import Store
    from trainer.pipeline import retrain

    tiny_config.ppo.iterations, tiny_config.ppo.max_minutes = 3, 10.0
    tiny_config.ppo.cycle_minutes, tiny_config.ppo.gate_reserve_minutes = 0.001, 0.0
    add_votes(Store(tiny_config.serve.db_path), 16)
    summary = retrain(tiny_config)
    assert 0 < summary["ppo/budget_minutes"] < 0.001   # a budget no iteration fits, whatever the CPU
    assert summary["ppo/iterations"] == 1, summary["ppo/iterations"]


@pytest.mark.parametrize("warm_start", [True, False])
def test_a_second_cycle_starts_from_the_serving_policy_or_afresh_from_the_base(tiny_config, warm_start):
    """ppo.warm_start: the next cycle's policy is the serving version's adapter, or a new one (the base's answers,
    KL 0 on the first rollouts); either way the gate weighs the candidate against the serving version."""
    from chat_app.store import Store
    from trainer.pipeline import retrain

    tiny_config.ppo.iterations, tiny_config.ppo.kl_budget = 3, 0.0
    tiny_config.ppo.learning_rate = 0.01                       # a first cycle that moves
    store = Store(tiny_config.serve.db_path)
    add_votes(store, 16)
    first = retrain(tiny_config)
    store.mark_serving(first["version"], actor="test", action="promote")
    assert first["objective/kl_initial"] == 0.0 and first["objective/kl"] > 0
    tiny_config.ppo.warm_start = warm_start
    add_votes(store, 8)
    second = retrain(tiny_config)
    assert (second["objective/kl_initial"] > 0) == warm_start, second["objective/kl_initial"]
    assert store.version(second["version"])["parent"] == first["version"]   # gated against the serving version


def test_evaluate_counts_every_comparison(tiny_config, tmp_path):
    from trainer.evaluate import evaluate_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("first question\nsecond question\n\nthird question\n")
    result = evaluate_cli(tiny_config, oracle="shorter", prompts_file=str(prompts), policy="base", against="base",
                          samples=2)
    report = result["judges"]["shorter"]
    assert report["wins"] + report["losses"] + report["ties"] == report["comparisons"] == 6
    assert result["prompts"] == 3


def test_prompt_pool_keeps_gate_prompts_out_of_training():
    users = [as_messages(f"user prompt {i}") for i in range(10)]
    train, gate = prompt_pool(users, ["seed a", "seed b", "user prompt 1"], gate_size=4, seed=3)
    keys = {json.dumps(p) for p in train}
    assert len(gate) == 3 and not keys & {json.dumps(p) for p in gate}
    assert len(train) + len(gate) == 12                    # "user prompt 1" counted once


def test_a_cycle_trains_on_the_voted_answers_and_borrows_an_idle_servers_core(tiny_config, monkeypatch):
    """ppo.served_pairs: the parent's voted answers join the rollouts, never those of the gate's held-out prompts;
    a server that is idle lends its core (trainer/threads.py) and the run says for what share of its steps."""
    import subprocess
    import sys

    import torch

    from chat_app.store import Store
    from trainer.pipeline import retrain

    store = Store(tiny_config.serve.db_path)
    add_votes(store, 24)
    tiny_config.ppo.served_pairs = 2
    idle_server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    monkeypatch.setenv("RLHF_SERVER_PID", str(idle_server.pid))
    threads = torch.get_num_threads()
    try:
        summary = retrain(tiny_config)
    finally:
        idle_server.kill()
        idle_server.wait()
        torch.set_num_threads(threads)                          # the borrower set this process's threads
    _, gate = prompt_pool(store.user_prompts(), load_prompts(tiny_config.schedule.seed_prompts),
                          tiny_config.gate.eval_prompts, summary["run_id"])
    voted = {json.dumps(p["prompt_messages"]) for p in store.preference_pairs()}
    assert summary["ppo/served_pairs_available"] == len(voted - {json.dumps(m) for m in gate}) > 0
    assert summary["objective/served_rows"] == 4                # 2 pairs, both answers, each iteration
    assert summary["time/borrowed_share"] > 0                   # the first look waits; the later ones borrowed


def test_simulate_no_retrain_only_votes(tmp_path):
    """`simulate --no-retrain` collects the votes and stops: copies of that database are arms for `retrain`."""
    import subprocess
    import sys

    from chat_app.store import Store

    db = tmp_path / "votes.db"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "run.py", "simulate", "--config", "configs/tiny.yaml", "--db", str(db),
                          "--set", f"serve.adapters_dir={tmp_path / 'adapters'}", "--oracle", "shorter", "--votes", "4",
                          "--no-retrain"], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sum(json.loads(out.stdout.strip().splitlines()[-1])["votes"].values()) == 4
    store = Store(db)
    assert store.vote_counts()["total"] == 4 and store.runs() == [] and store.versions() == []
