"""Win rates with ties as half, the length-controlled win rate on synthetic votes, and evaluate with two judges."""
import json

import numpy as np
import pytest

from trainer.ratings import (bradley_terry, length_controlled_win_rate, relative_length_difference, sigmoid,
                             win_rate_summary)


def synthetic_votes(seed: int, n: int, skill: float, length_effect: float, policy_longer: bool):
    """Outcomes drawn from P(policy wins) = σ(skill + length_effect·z), and the relative length differences z."""
    rng = np.random.default_rng(seed)
    tokens_policy = rng.integers(20, 160, n) if policy_longer else rng.integers(10, 110, n)
    tokens_against = rng.integers(10, 110, n)
    z = relative_length_difference(tokens_policy, tokens_against)
    outcomes = (rng.random(n) < sigmoid(skill + length_effect * z)).astype(float)
    return outcomes, z


def test_length_control_removes_a_pure_length_effect():
    # a judge that only likes longer answers, and a policy whose answers are longer: no better at equal length
    outcomes, z = synthetic_votes(seed=0, n=400, skill=0.0, length_effect=4.0, policy_longer=True)
    report = length_controlled_win_rate(outcomes, z, bootstrap=300)
    low, high = report["length_controlled_interval"]
    assert report["win_rate"] > 0.6, report
    assert low <= 0.5 <= high and abs(report["length_controlled_win_rate"] - 0.5) < 0.05, report
    assert report["length_effect_interval"][0] > 1.0, report


def test_length_control_keeps_a_quality_effect_independent_of_length():
    outcomes, z = synthetic_votes(seed=1, n=400, skill=0.8, length_effect=0.0, policy_longer=False)
    report = length_controlled_win_rate(outcomes, z, bootstrap=300)
    assert abs(report["length_controlled_win_rate"] - report["win_rate"]) < 0.02, report   # σ(0.8) = 0.69
    assert report["length_effect_interval"][0] < 0 < report["length_effect_interval"][1], report


def test_bootstrap_intervals_cover_the_true_rates_in_most_seeds():
    raw_covered = controlled_covered = 0
    for seed in range(20):
        outcomes, z = synthetic_votes(seed=100 + seed, n=150, skill=0.6, length_effect=2.0, policy_longer=False)
        low, high = length_controlled_win_rate(outcomes, z, bootstrap=300, seed=seed)["length_controlled_interval"]
        controlled_covered += low <= sigmoid(0.6) <= high
        coin = (np.random.default_rng(seed).random(150) < 0.65).astype(float)
        low, high = win_rate_summary(coin, bootstrap=300, seed=seed)["win_rate_interval"]
        raw_covered += low <= 0.65 <= high
    assert raw_covered >= 16 and controlled_covered >= 16, (raw_covered, controlled_covered)   # 95% → 19 of 20


def test_ties_count_as_half_a_win():
    report = length_controlled_win_rate([1, 0, 0.5, 0.5, 1], np.zeros(5), bootstrap=100)
    assert (report["wins"], report["losses"], report["ties"], report["comparisons"]) == (2, 1, 2, 5)
    assert report["win_rate"] == pytest.approx(0.6) and report["decided_win_rate"] == pytest.approx(2 / 3)
    assert report["length_controlled_win_rate"] == pytest.approx(0.6, abs=1e-3)   # no length differences
    assert report["length_effect"] is None                                          # nothing to measure it on
    assert length_controlled_win_rate([0.5] * 8, np.linspace(-0.5, 0.5, 8))["length_controlled_win_rate"] == \
        pytest.approx(0.5)


def test_one_sided_votes_give_finite_ratings():
    report = length_controlled_win_rate([1.0] * 10, np.linspace(-0.3, 0.3, 10), bootstrap=50)
    assert 0.99 < report["length_controlled_win_rate"] < 1.0 and np.isfinite(report["length_effect"])


def test_bradley_terry_recovers_three_players_strengths():
    rng = np.random.default_rng(0)
    strength = {"base": 0.0, "v1": 0.7, "v2": 1.5}
    comparisons = []
    for _ in range(1500):
        a, b = (str(p) for p in rng.choice(list(strength), size=2, replace=False))
        comparisons.append((a, b, float(rng.random() < sigmoid(strength[a] - strength[b]))))
    fit = bradley_terry(list(strength), comparisons, bootstrap=200)
    assert fit["ratings"]["base"] == 0.0 < fit["ratings"]["v1"] < fit["ratings"]["v2"], fit
    for player in ("v1", "v2"):
        low, high = fit["intervals"][player]
        assert abs(fit["ratings"][player] - strength[player]) < 0.3 and low < fit["ratings"][player] < high, fit


def test_oracle_win_rate_reads_each_verdict_from_the_policys_side():
    from trainer.evaluate import oracle_win_rate

    def likes_good(prompt, answer_a, answer_b):
        return "tie" if answer_a == answer_b else "a" if answer_a == "good" else "b"

    report = oracle_win_rate(likes_good, ["q"] * 10, ["good"] * 6 + ["bad"] * 2 + ["same"] * 2,
                             ["bad"] * 6 + ["good"] * 2 + ["same"] * 2, tokens_policy=[5] * 10,
                             tokens_against=[5] * 10)
    assert (report["wins"], report["losses"], report["ties"]) == (6, 2, 2)   # whichever order each was shown in
    assert report["win_rate"] == pytest.approx(0.7) and report["decided_win_rate"] == pytest.approx(0.75)
    assert report["length_controlled_win_rate"] == pytest.approx(0.7, abs=1e-3)


def test_evaluate_asks_every_judge_about_the_same_answers(tiny_config, tmp_path, capsys):
    from trainer.evaluate import evaluate_cli

    prompts = tmp_path / "p.txt"
    prompts.write_text("first question\nsecond question\nthird question\n")
    out = tmp_path / "comparisons.jsonl"
    result = evaluate_cli(tiny_config, oracles=["shorter", "complete"], prompts_file=str(prompts), policy="base",
                          against="base", samples=2, out=str(out))
    assert result["comparisons"] == 6 and result["prompts"] == 3 and set(result["judges"]) == {"shorter", "complete"}
    for report in result["judges"].values():
        assert report["wins"] + report["losses"] + report["ties"] == report["comparisons"] == 6
        assert 0 <= report["length_controlled_win_rate"] <= 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 6 and all(set(row["winners"]) == {"shorter", "complete"} for row in rows)
    shorter_wins = sum(row["winners"]["shorter"] == "policy" for row in rows)
    assert shorter_wins == result["judges"]["shorter"]["wins"]
    summary = capsys.readouterr().err
    assert "shorter: win " in summary and "complete: win " in summary and "length-controlled" in summary
    assert json.dumps(result)   # the CLI prints it


def test_gate_figures_separate_a_pure_length_gain_from_a_real_one():
    """The gate's reward gain at equal length: ~0 when the reward model only pays for length, the whole gain when
    the candidate is better at every length; the uncertainty includes the heads' disagreement."""
    import random as _random

    from trainer.evaluate import gate_decision, gate_figures
    from chat_app.config import GateConfig

    rng = _random.Random(0)
    serving_lengths = [rng.randint(40, 120) for _ in range(64)]
    candidate_lengths = [n + 30 for n in serving_lengths]            # the candidate only got longer

    def stats(lengths, bonus, heads_noise):
        scores = [0.02 * n + bonus + rng.gauss(0, 0.1) for n in lengths]
        members = [[s + heads_noise * (k - 1.5) for s in scores] for k in range(4)]
        return {"scores": scores, "member_scores": members, "lengths": lengths,
                "score": sum(scores) / len(scores), "length": sum(lengths) / len(lengths), "kl": 2.0}

    longer = gate_figures(stats(candidate_lengths, 0.0, 0.0), stats(serving_lengths, 0.0, 0.0))
    assert longer["eval/reward_gain"] > 0.5 and abs(longer["eval/reward_gain_lc"]) < 0.15
    assert longer["eval/length_ratio"] > 1.3
    better = gate_figures(stats(serving_lengths, 0.5, 0.0), stats(serving_lengths, 0.0, 0.0))
    assert abs(better["eval/reward_gain_lc"] - 0.5) < 0.1 and abs(better["eval/reward_gain"] - 0.5) < 0.1
    unsure = gate_figures(stats(serving_lengths, 0.5, 0.4), stats(serving_lengths, 0.0, 0.0))
    assert unsure["eval/reward_gain_std"] > better["eval/reward_gain_std"]
    passed, reason = gate_decision(stats(serving_lengths, 0.5, 0.0), stats(serving_lengths, 0.0, 0.0), GateConfig())
    assert passed and "at equal length" in reason
    close = stats(serving_lengths, 0.01, 0.0), stats(serving_lengths, 0.0, 0.0)   # a gain inside its uncertainty
    passed, reason = gate_decision(*close, GateConfig(min_gain_in_std=1.0))
    assert not passed and "uncertainty" in reason
    passed, reason = gate_decision(*close, GateConfig())          # by default any positive gain goes to the canary
    assert passed == (gate_figures(*close)["eval/reward_gain"] > 0)
    passed, reason = gate_decision(stats(serving_lengths, -0.2, 0.0), stats(serving_lengths, 0.0, 0.0), GateConfig())
    assert not passed and "reward gain is not above 0.0" in reason
    same = [64] * 16                                                  # every answer cut at the same length
    even = gate_figures(stats(same, 0.5, 0.0), stats(same, 0.0, 0.0))
    assert abs(even["eval/reward_gain_lc"] - even["eval/reward_gain"]) < 1e-5 and even["eval/reward_per_length_std"] == 0.0


@pytest.mark.parametrize("args, said", [
    (["--oracle", "nonesuch"], "unknown oracle 'nonesuch'"),
    (["--oracle", "shorter", "--policy", "v99"], "no policy version 'v99'"),
    (["--oracle", "shorter", "--prompts", "missing.txt"], "missing.txt"),
])
def test_evaluate_refuses_bad_arguments_in_one_line_before_loading_a_model(args, said, tmp_path, capsys):
    """A misspelt judge, an unknown version or a missing prompts file is a one-line error, not a traceback."""
    import run
    from chat_app.store import Store

    from conftest import TINY

    Store(tmp_path / "feedback.db")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a question\n")
    argv = ["evaluate", "--config", TINY, "--db", str(tmp_path / "feedback.db"), "--prompts", str(prompts), *args]
    if "missing.txt" in args:
        argv[argv.index(str(prompts))] = str(tmp_path / "missing.txt")
        argv = argv[:-2]
    with pytest.raises(SystemExit) as stopped:
        run.main(argv)
    assert str(stopped.value).startswith("run.py: evaluate: ") and said in str(stopped.value)
    with pytest.raises(SystemExit) as stopped:
        run.main(["evaluate", "--oracle", "shorter", "--prompts", str(prompts), "--samples", "0"])
    assert stopped.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_reward_agreement_counts_only_the_pairs_a_judge_decided():
    from trainer.evaluate import reward_agreement

    report = reward_agreement([1.0, -0.5, 2.0, 0.0], {"j": ["policy", "policy", "tie", "against"]})
    assert (report["prefers_policy"], report["comparisons"]) == (2, 4)
    assert report["judges"]["j"] == {"agree": 2, "decided": 3, "rate": pytest.approx(2 / 3)}   # 1.0 and 0.0 agree


def test_evaluate_reports_how_a_reward_model_reads_the_judged_pairs(tiny_config, tmp_path, capsys):
    """A reward model that only reads an answer's characters agrees with `longer` on every pair it decided and
    with `shorter` on none: the check reads the reward model, not the judges."""
    import torch
    from chat_app.model import load_model, load_tokenizer
    from chat_app.store import Store
    from trainer.evaluate import evaluate_cli
    from trainer.reward_heads import HeadEnsemble, HeadRewardModel, answer_features

    tokenizer = load_tokenizer(tiny_config.model)
    model = load_model(tiny_config.model, tokenizer)
    dims = answer_features(model, tokenizer, [[{"role": "user", "content": "q"}]], ["a"], 64).shape[1]
    weights = torch.zeros(2, dims)
    weights[:, -1] = 1.0                                   # log(1 + characters) only
    ensemble = HeadEnsemble(torch.zeros(dims), torch.ones(dims), weights)
    HeadRewardModel(model, tokenizer, ensemble, 64).save(tmp_path / "rm")
    Store(tiny_config.serve.db_path).add_version("v1", str(tmp_path / "none"), "base", None, {},
                                                 reward_adapter_path=str(tmp_path / "rm"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("first question\nsecond question\nthird question\nfourth question\n")
    result = evaluate_cli(tiny_config, oracles=["longer", "shorter"], prompts_file=str(prompts), policy="base",
                          against="base", samples=4, agreement_of="v1")
    check = result["reward_agreement"]
    assert check["version"] == "v1" and check["comparisons"] == 16
    assert check["judges"]["longer"]["decided"] > 0
    assert check["judges"]["longer"]["rate"] == 1.0 and check["judges"]["shorter"]["rate"] == 0.0
    assert "reward model of v1: prefers the policy in" in capsys.readouterr().err
    with pytest.raises(ValueError, match="no reward model"):
        evaluate_cli(tiny_config, oracles=["longer"], prompts_file=str(prompts), policy="base", against="base",
                     agreement_of="policy")


def test_exact_kl_measures_what_the_sampled_log_ratio_does_with_less_spread(tokenizer):
    # 96 answers of a policy whose adapter is not zero: both estimates of each answer's KL to the base must agree
    # on average (the same expectation), and the base measured against itself is 0 both ways.
    import torch

    from chat_app.config import load_config
    from chat_app.model import load_model
    from conftest import nudged_policy
    from trainer.evaluate import answer_kls, generate_answers

    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml")
    policy, _ = nudged_policy(load_model(cfg.model, tokenizer), cfg.lora, scale=0.3)
    prompts = [[{"role": "user", "content": f"Tell me about topic {i}."}] for i in range(12)] * 8
    _, prompt_ids, answers, ended = generate_answers(policy, tokenizer, prompts, max_new_tokens=8, temperature=0.7,
                                                     top_k=0, seed=1)
    answers = [a + [tokenizer.eos_token_id] * e for a, e in zip(answers, ended)]
    sampled, exact = (torch.tensor(x) for x in answer_kls(policy, "default", prompt_ids, answers,
                                                           tokenizer.pad_token_id, temperature=0.7))
    assert (exact >= -1e-4).all() and exact.mean() > 0.2, exact.mean()       # the adapter moved the policy
    difference = sampled - exact
    assert abs(difference.mean()) < 3 * difference.std() / len(difference) ** 0.5, (sampled.mean(), exact.mean())
    assert exact.std() < sampled.std(), (exact.std(), sampled.std())
    base_sampled, base_exact = answer_kls(policy, None, prompt_ids[:8], answers[:8], tokenizer.pad_token_id)
    assert max(map(abs, base_sampled + base_exact)) < 1e-5
