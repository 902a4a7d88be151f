"""The feature-head reward model: learns, uses ties, calibrates, knows where it is unsure, caches features."""
import random
from dataclasses import replace

import pytest
import torch

from chat_app.config import load_config
from chat_app.model import load_model
from test_reward import TINY, separable_pairs
from trainer.reward_heads import (HeadRewardModel, answer_features, calibration, fit_head,
                                  train_head_reward_model)


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(1)
    return load_config(TINY)


@pytest.fixture(scope="module")
def base(cfg, tokenizer):
    return load_model(cfg.model, tokenizer)


@pytest.fixture(scope="module")
def trained(cfg, base, tokenizer):
    return train_head_reward_model(base, tokenizer, cfg.reward, separable_pairs(60), seed=0)


def test_fit_head_recovers_a_known_direction():
    generator = torch.Generator().manual_seed(0)
    true_w = torch.tensor([2.0, -1.0, 0.0, 0.0])
    diffs = torch.randn(400, 4, generator=generator)
    outcomes = (torch.rand(400, generator=generator) < torch.sigmoid(diffs @ true_w)).float()
    w = fit_head(diffs, outcomes, l2=1e-4)["w"]
    assert torch.nn.functional.cosine_similarity(w, true_w, dim=0) > 0.95


def test_ties_pull_a_direction_towards_zero():
    """Pairs that differ along feature 1 always tie: with ties used, the head gives feature 1 less weight."""
    generator = torch.Generator().manual_seed(1)
    decided = torch.randn(100, 2, generator=generator)
    outcomes = (decided[:, 0] + 0.5 * decided[:, 1] > 0).float()
    tied = torch.stack([torch.zeros(100), torch.randn(100, generator=generator)], 1)
    diffs, all_outcomes = torch.cat([decided, tied]), torch.cat([outcomes, torch.full((100,), 0.5)])
    without = fit_head(decided, outcomes, l2=1e-3)["w"]
    with_ties = fit_head(diffs, all_outcomes, l2=1e-3)
    ratio = lambda w: abs(w[1] / w[0]).item()                   # noqa: E731; feature 1's weight relative to 0's
    assert ratio(with_ties["w"]) < 0.7 * ratio(without), (with_ties["w"], without)
    assert with_ties["log_nu"] > -5                          # ν is fitted: ties are likely, not impossible


def test_learns_separable_pairs_on_prompts_it_never_saw(trained):
    rm, metrics = trained
    assert metrics["rm/heldout_pairs"] > 0
    assert metrics["rm/accuracy"] >= 0.9
    assert metrics["rm/cv_accuracy"] >= 0.85
    assert 0 <= metrics["rm/ece"] <= 0.5 and metrics["rm/l2"] in load_config(TINY).reward.l2_grid


def strange_answers(n: int, seed: int = 3) -> list[str]:
    """Answers unlike any voted one: random runs of odd tokens."""
    rng = random.Random(seed)
    words = ["qzx", "Ωμέγα", "1234567", "#{}[]", "lorem", "ipsum", "ÆØÅ", "汉字", "zzz", "→→"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(30, 60))) for _ in range(n)]


def test_calibration_by_hand():
    probabilities = torch.tensor([0.9, 0.9, 0.6, 0.6])
    correct = torch.tensor([True, False, True, True])
    result = calibration(probabilities, correct, bins=5)
    # two bins: 0.9 predicted, half right (gap 0.4); 0.6 predicted, all right (gap 0.4)
    assert result["ece"] == pytest.approx(0.4, abs=1e-6)
    assert result["brier"] == pytest.approx((0.01 + 0.81 + 0.16 + 0.16) / 4, abs=1e-6)


def test_uncertainty_is_higher_away_from_the_training_data(trained, tokenizer):
    rm, _ = trained
    pairs = separable_pairs(60)
    near = rm.score_with_uncertainty([p["prompt_messages"] for p in pairs[:20]], [p["chosen"] for p in pairs[:20]])[1]
    strange = strange_answers(20)
    far = rm.score_with_uncertainty([[{"role": "user", "content": "?"}]] * 20, strange)[1]
    assert far.mean() > 1.5 * near.mean()


def test_ppo_reward_pays_less_where_the_heads_disagree(trained):
    """reward.ppo_uncertainty_penalty: PPO's reward is the heads' mean less κ times their spread, so an answer unlike
    the voted ones (the heads disagree) earns less than its mean score; the gate and evaluation keep the mean."""
    rm, _ = trained
    pairs = separable_pairs(60)
    strange = strange_answers(20)
    prompts = [p["prompt_messages"] for p in pairs[:20]] + [[{"role": "user", "content": "?"}]] * 20
    answers = [p["chosen"] for p in pairs[:20]] + strange
    mean, spread = rm.score_with_uncertainty(prompts, answers)
    plain = HeadRewardModel(rm.backbone, rm.tokenizer, rm.ensemble, rm.max_length)
    careful = HeadRewardModel(rm.backbone, rm.tokenizer, rm.ensemble, rm.max_length, ppo_uncertainty_penalty=1.0)
    assert torch.allclose(plain.ppo_score(prompts, answers), mean, atol=1e-5)
    penalty = mean - careful.ppo_score(prompts, answers)
    assert torch.allclose(penalty, spread, atol=1e-5)
    assert penalty[20:].mean() > 1.5 * penalty[:20].mean()       # far from the votes, the score is trusted less


def test_scores_are_the_base_models_even_over_a_policy_adapter(cfg, tokenizer, trained):
    """The pipeline hands the policy (base + LoRA) as the backbone: features must ignore the adapter."""
    from trainer.ppo import make_policy

    rm, _ = trained
    pairs = separable_pairs(8)
    prompts, answers = [p["prompt_messages"] for p in pairs], [p["chosen"] for p in pairs]
    before = rm.score(prompts, answers)
    policy = make_policy(load_model(cfg.model, tokenizer), cfg.lora)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_()                                 # an adapter that changes the model a lot
    scored = HeadRewardModel(policy, tokenizer, rm.ensemble, rm.max_length)
    assert torch.allclose(scored.score(prompts, answers), before, atol=1e-4)


def test_features_are_cached_so_a_retrain_reads_only_new_votes(cfg, base, tokenizer, trained, tmp_path):
    rm, _ = trained
    rm.save(tmp_path / "reward")
    pairs = separable_pairs(60) + [{**p, "comparison_id": 1000 + i} for i, p in enumerate(separable_pairs(10, seed=5))]
    again, metrics = train_head_reward_model(base, tokenizer, cfg.reward, pairs, previous=tmp_path / "reward")
    assert metrics["rm/new_pairs"] == 10
    loaded = HeadRewardModel.load(base, tokenizer, tmp_path / "reward")
    answers = [p["chosen"] for p in pairs[:5]]
    prompts = [p["prompt_messages"] for p in pairs[:5]]
    assert torch.allclose(loaded.score(prompts, answers), rm.score(prompts, answers), atol=1e-5)
    cached = answer_features(base, tokenizer, prompts[:1], answers[:1], cfg.reward.max_length,
                             layers=cfg.reward.feature_layers)[0]
    assert torch.allclose(loaded.feature_cache[0][0], cached, atol=1e-4)


def test_a_reward_model_saved_in_the_first_layout_still_loads(cfg, base, tokenizer, tmp_path):
    """Versions saved before `reward.feature_layers` read 3 layers and the last token's state (FORMAT 1): a server
    that loads one to pick pairs, or an evaluation, must read the features the heads were fitted on."""
    import json

    from trainer.reward_heads import META_FILE, fit_ensemble, pair_outcomes

    pairs = separable_pairs(40)
    prompts = [p["prompt_messages"] for p in pairs]
    old = {side: answer_features(base, tokenizer, prompts, [p[side] for p in pairs], cfg.reward.max_length,
                                 layers=3, last_token=True) for side in ("chosen", "rejected")}
    assert old["chosen"].shape[1] == answer_features(base, tokenizer, prompts[:1], ["a"], 64, layers=3).shape[1] + 64
    ensemble = fit_ensemble(old["chosen"], old["rejected"], pair_outcomes(pairs), cfg.reward, l2=0.1)
    HeadRewardModel(base, tokenizer, ensemble, cfg.reward.max_length, layers=3, last_token=True).save(tmp_path / "v1")
    meta = json.loads((tmp_path / "v1" / META_FILE).read_text())
    del meta["feature_layers"]
    (tmp_path / "v1" / META_FILE).write_text(json.dumps({**meta, "format": 1}))
    loaded = HeadRewardModel.load(base, tokenizer, tmp_path / "v1")
    assert loaded.last_token and loaded.layers == 3
    chosen = loaded.score(prompts, [p["chosen"] for p in pairs])
    assert torch.allclose(chosen, ensemble.scores(old["chosen"]), atol=1e-4)
    assert (chosen > loaded.score(prompts, [p["rejected"] for p in pairs])).float().mean() > 0.9


def test_too_few_pairs_is_skipped(cfg, base, tokenizer):
    rm, metrics = train_head_reward_model(base, tokenizer, cfg.reward, separable_pairs(3))
    assert rm is None and "skipped" in metrics["rm/skipped"]


def coin_flips(pairs: list[dict], seed: int = 5) -> list[dict]:
    """The same answers, each pair's order a coin flip: nothing in the answers tells chosen from rejected."""
    rng = random.Random(seed)
    return [p if rng.random() < 0.5 else {**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


def test_chance_p_value_by_hand():
    from trainer.reward_heads import chance_p_value

    assert chance_p_value(3, 3) == 1 / 8 and chance_p_value(0, 5) == 1.0
    assert chance_p_value(2, 4) == (6 + 4 + 1) / 16             # 2, 3 or 4 right of 4


def test_a_reward_model_that_reads_votes_no_better_than_chance_trains_no_policy(cfg, base, tokenizer, trained):
    coin = coin_flips(separable_pairs(60))
    rm, metrics = train_head_reward_model(base, tokenizer, cfg.reward, coin, seed=0)
    assert rm is None and "no better than chance" in metrics["rm/skipped"], metrics
    assert metrics["rm/chance_p_value"] > 0.05 and metrics["rm/out_of_sample_pairs"] == 60
    _, learned = trained                                         # the warm/cold votes: far above chance
    assert learned["rm/chance_p_value"] < 1e-6 and learned["rm/out_of_sample_accuracy"] >= 0.85
    off = train_head_reward_model(base, tokenizer, replace(cfg.reward, min_skill_confidence=0), coin, seed=0)
    assert off[0] is not None                                   # 0: train whatever the votes say


def test_a_run_skipped_for_chance_keeps_the_features_it_read(cfg, base, tokenizer, tmp_path):
    """No version is stored when the reward model reads chance, but its features are: the next run reads only the
    votes that came since."""
    coin = coin_flips(separable_pairs(60))
    rm, metrics = train_head_reward_model(base, tokenizer, cfg.reward, coin, cache_folder=tmp_path / "features")
    assert rm is None and metrics["rm/new_pairs"] == 60
    more = coin + [{**p, "comparison_id": 1000 + i} for i, p in enumerate(separable_pairs(8, seed=3))]
    _, again = train_head_reward_model(base, tokenizer, cfg.reward, more, previous=tmp_path / "features",
                                       cache_folder=tmp_path / "features")
    assert again["rm/new_pairs"] == 8
    _, third = train_head_reward_model(base, tokenizer, cfg.reward, more, previous=tmp_path / "features")
    assert third["rm/new_pairs"] == 0                           # the second run added its 8
    for other in (replace(cfg.reward, max_length=cfg.reward.max_length // 2), replace(cfg.reward, feature_layers=1)):
        _, fresh = train_head_reward_model(base, tokenizer, other, more, previous=tmp_path / "features")
        assert fresh["rm/new_pairs"] == len(more)               # read differently: nothing reused


def test_the_pair_shown_is_the_one_whose_order_is_least_certain():
    from trainer.reward_heads import HeadEnsemble, most_uncertain_pair, order_probabilities

    # two heads over one feature each... candidates 0 and 1 agree (clear order), 2 and 3 split the heads
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    ensemble = HeadEnsemble(torch.zeros(2), torch.ones(2), weights)
    features = torch.tensor([[3.0, 3.0], [-3.0, -3.0], [2.0, -2.0], [-2.0, 2.0]])
    probabilities = order_probabilities(ensemble, features)
    assert probabilities[0, 1] > 0.99 and probabilities[1, 0] < 0.01
    assert torch.allclose(probabilities + probabilities.T, torch.ones(4, 4))
    assert most_uncertain_pair(probabilities) == (2, 3)
    expected = min(((i, j) for i in range(4) for j in range(i + 1, 4)),
                   key=lambda ij: abs(probabilities[ij] - 0.5))
    assert most_uncertain_pair(probabilities) == expected


def test_a_comparison_stores_the_picked_pair(trained, base, tokenizer, store, tmp_path):
    from types import SimpleNamespace

    from chat_app.chat import finish_pair
    from trainer.reward_heads import PairPicker

    rm, _ = trained
    rm.save(tmp_path / "reward")
    picker = PairPicker.from_folder(base, tokenizer, tmp_path / "reward")
    assert PairPicker.from_folder(base, tokenizer, tmp_path) is None          # no heads there: no picking
    prompt = [{"role": "user", "content": "Tell me about owls."}]
    texts = ["Owls are wonderful and lovely.", "Owls are terrible and awful.", "Owls are lovely and delightful.",
             "Owls are dreadful and boring."]
    cid = store.create_comparison(prompt_messages=prompt, sampling={"max_new_tokens": 16}, source="test",
                                  seeds=[11, 12, 13, 14])
    result = SimpleNamespace(texts=texts, ended_with_eos=[True, False, True, False], version="v1", seeds=[11, 12, 13, 14],
                             prompt_messages=prompt, latency_ms=5.0, turns_dropped=0, versions=None,
                             completion_tokens=[7, 7, 8, 7])
    i, j = finish_pair(store, cid, result, picker)
    expected = picker.pick(prompt, texts)[:2]
    assert (i, j) == expected
    row = store.comparison(cid)
    assert (row["answer_a"], row["answer_b"]) == (texts[i], texts[j])
    assert (row["seed_a"], row["seed_b"]) == (11 + i, 11 + j)
    sampling = row["sampling"]
    assert sampling["candidates"] == 4 and sampling["picked"] == [i, j] and sampling["max_new_tokens"] == 16


def synthetic_answers(n: int, seed: int) -> torch.Tensor:
    """(n, 7) features laid out as the real ones end: hidden h0 that mostly tracks length, hidden h1 that does not,
    three cosines, log tokens, log characters (the two length features move together)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.rand(n, generator=generator) * 3 + 2
    h0 = tokens + 0.3 * torch.randn(n, generator=generator)
    h1 = torch.randn(n, generator=generator)
    cosines = torch.randn(n, 3, generator=generator) * 0.1
    return torch.cat([h0[:, None], h1[:, None], cosines, tokens[:, None], (tokens + 1.5)[:, None]], 1)


@pytest.mark.parametrize("driver", ["length", "content"])
def test_decoupled_heads_keep_the_length_effect_apart(cfg, driver):
    """Voters who go by length only: the decoupled heads put (nearly) all of it in the length part, even though a
    hidden feature tracks length too, and PPO's reward at weight 0 no longer follows length. Voters who go by a
    feature unrelated to length: the length part is (nearly) nothing. Scores stay what the plain fit would rank."""
    from dataclasses import replace

    from trainer.reward_heads import HeadRewardModel, fit_ensemble

    a, b = synthetic_answers(300, 0), synthetic_answers(300, 1)
    column = 5 if driver == "length" else 1
    generator = torch.Generator().manual_seed(2)
    outcomes = (torch.rand(300, generator=generator) < torch.sigmoid(3 * (a[:, column] - b[:, column]))).float()
    decoupled = fit_ensemble(a, b, outcomes, replace(cfg.reward, length_decoupled=True), l2=0.01)
    plain = fit_ensemble(a, b, outcomes, replace(cfg.reward, length_decoupled=False), l2=0.01)
    assert plain.length_weights is None and decoupled.length_weights is not None
    every = torch.cat([a, b])
    share = (decoupled.length_scores(every).std() / decoupled.scores(every).std()).item()
    rest = decoupled.scores(every) - decoupled.length_scores(every)
    length = every[:, 5]
    correlation = torch.corrcoef(torch.stack([rest, length]))[0, 1].item()
    assert abs(correlation) < 0.05, correlation            # what is left says nothing linear about length
    if driver == "length":
        assert share > 0.9, share
    else:
        assert share < 0.1, share
    # the same pairs ordered the same way as the plain fit: decoupling moves weight, not what is learned
    agree = ((decoupled.scores(a) > decoupled.scores(b)) == (plain.scores(a) > plain.scores(b))).float().mean()
    assert agree > 0.95, agree

    class Fixed(HeadRewardModel):                         # features given directly, no backbone
        def features(self, prompts_messages, answers):
            return every[: len(answers)]

    half = Fixed(None, None, decoupled, 0, ppo_length_weight=0.5)
    none = Fixed(None, None, decoupled, 0, ppo_length_weight=0.0)
    prompts = [[{"role": "user", "content": "?"}]] * len(every)
    assert torch.allclose(half.ppo_score(prompts, [""] * len(every)),
                          decoupled.scores(every) - 0.5 * decoupled.length_scores(every), atol=1e-5)
    assert torch.allclose(none.ppo_score(prompts, [""] * len(every)), rest, atol=1e-5)
