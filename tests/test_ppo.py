"""PPO: hand-computed numbers for each tensor function, fast paths against slow ones, and learning on the tiny model."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from chat_app.config import load_config
from chat_app.decoding import left_pad
from trainer import ppo
from trainer.ppo import (RunningMoments, ValueHead, compute_rewards, forward_logprobs_values,
                         gae, load_value_head, logprobs_from_logits, make_policy, masked_whiten, policy_loss,
                         response_mask, rollout, save_policy, train_ppo, value_loss)

from conftest import nudged_policy

TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
PROMPTS = [[{"role": "user", "content": f"Question {i}: tell me about {topic}."}]
           for i, topic in enumerate(["cats", "dogs", "rain", "math", "music", "tea", "code", "the sun",
                                      "the sky", "bread", "chess", "rivers"])]


@pytest.fixture(autouse=True)
def one_thread():
    """Two threads on a shared 2-core machine thrash: the tiny model runs 50x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def space_share(messages, texts):
    """A rule reward: the share of each answer's characters that are spaces."""
    return torch.tensor([t.count(" ") / max(len(t), 1) for t in texts])


# The tiny random model learns a rule reward at a low temperature from its top tokens (see the test below).
SPACE_SAMPLING = ("ppo.iterations=15", "ppo.rollout_prompts=8", "ppo.samples_per_prompt=2", "ppo.minibatch_size=8",
                  "ppo.temperature=0.3", "ppo.top_k=50", "ppo.learning_rate=0.002", "ppo.kl_coef=0.01",
                  "ppo.target_kl=0")


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def tiny_model(cfg, tokenizer):
    from chat_app.model import load_model

    return load_model(cfg.model, tokenizer)   # seeded: the same weights every call


# -- pure tensor functions on hand-computed numbers --------------------------------------------------
def test_response_mask_from_lengths_keeps_a_final_eos_equal_to_pad():
    tokens = torch.tensor([[5, 6, 2, 2], [7, 2, 2, 2]])          # row 0 ends with EOS (2), then pad (2)
    mask = response_mask(torch.tensor([3, 1]), 4)
    assert mask.tolist() == [[True, True, True, False], [True, False, False, False]]
    assert tokens[0][mask[0]].tolist() == [5, 6, 2]             # the EOS is trained, the pad after it is not


def test_rollout_appends_eos_and_counts_it(monkeypatch):
    def fake_decode(model, prompts, **kwargs):
        return [[5, 6], [7, 8, 9]], [True, False]               # answers come back without their EOS

    monkeypatch.setattr(ppo, "decode", fake_decode)
    tokenizer = SimpleNamespace(eos_token_id=2, pad_token_id=2, decode=lambda ids, **_: " ".join(map(str, ids)))
    cfg = tiny_cfg("ppo.response_length=3").ppo
    batch = rollout(torch.nn.Linear(1, 1), tokenizer, [[10, 11, 12], [13]], cfg, seed=0)
    assert batch["context_length"] == 3
    assert batch["query_response"].tolist() == [[10, 11, 12, 5, 6, 2], [2, 2, 13, 7, 8, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]]
    assert batch["response_lengths"].tolist() == [3, 3]
    assert batch["ended_with_eos"].tolist() == [True, False]
    assert batch["texts"] == ["5 6", "7 8 9"]


def test_logprobs_from_logits_is_log_softmax():
    logits, tokens = torch.randn(2, 3, 7), torch.tensor([[0, 6, 3], [1, 1, 2]])
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    assert torch.allclose(logprobs_from_logits(logits, tokens), expected, atol=1e-6)


def test_token_kl_is_the_kl_between_the_two_next_token_distributions():
    from torch.distributions import Categorical, kl_divergence

    torch.manual_seed(0)
    logits, ref_logits = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    expected = kl_divergence(Categorical(logits=logits), Categorical(logits=ref_logits))   # (2, 3)
    assert torch.allclose(ppo.token_kl(logits, ref_logits), expected, atol=1e-5)
    assert torch.allclose(ppo.token_kl(logits, logits + 3.0), torch.zeros(2, 3), atol=1e-5)   # the same distribution


def test_masked_whiten_uses_only_real_tokens():
    values, mask = torch.tensor([[1.0, 2.0, 3.0, 100.0]]), torch.tensor([[True, True, True, False]])
    s = 1 / math.sqrt(2 / 3)                                    # mean 2, population variance 2/3
    assert torch.allclose(masked_whiten(values, mask), torch.tensor([[-s, 0.0, s, 0.0]]), atol=1e-4)
    assert torch.allclose(masked_whiten(values, mask, shift_mean=False), torch.tensor([[2 - s, 2.0, 2 + s, 0.0]]),
                          atol=1e-4)


def test_kl_penalty_and_score_on_the_last_real_token():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -5.0, -1.0]])
    ref_logprobs = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, -1.0]])
    lengths = torch.tensor([3, 1])
    rewards, kl = compute_rewards(torch.tensor([1.0, -2.0]), logprobs, ref_logprobs, response_mask(lengths, 3),
                                  lengths, kl_coef=0.1)
    assert torch.allclose(kl, torch.tensor([[0.5, 0.0, -1.0], [1.0, 0.0, 0.0]]))      # padding carries no KL
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.0, 0.1 + 1.0], [-0.1 - 2.0, 0.0, 0.0]]))


def test_gae_by_hand():
    # γ = 1, λ = 0.95. Row 0: δ = (-0.3, -0.1, 0.9); A2 = 0.9, A1 = -0.1 + 0.95·0.9 = 0.755,
    # A0 = -0.3 + 0.95·0.755 = 0.41725. Row 1 ends after 2 tokens: its value 9 at t=2 is padding.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.1], [0.5, 0.2, 9.0]])
    mask = response_mask(torch.tensor([3, 2]), 3)
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert torch.allclose(advantages, torch.tensor([[0.41725, 0.755, 0.9], [0.46, 0.8, 0.0]]), atol=1e-6)
    assert torch.allclose(returns, torch.tensor([[0.91725, 0.955, 1.0], [0.96, 1.0, 0.0]]), atol=1e-6)


def test_the_default_lambda_gives_an_answers_first_token_the_credit_of_its_last():
    # A reward model scores a whole answer at its last token, and with a value head that knows nothing yet (V = 0,
    # as after a leave-one-out baseline, whose per-prompt mean is 0) GAE hands token t the score times λ^(L-1-t).
    # At λ = 0.95 the first token of a 100-token answer got 0.6% of it: only the last ~20 tokens, where the answer
    # ends (its length), were trained. The default λ gives every token the score.
    cfg = tiny_cfg().ppo
    length = 100
    rewards = torch.zeros(1, length)
    rewards[0, -1] = 1.0                                         # the score on the last real token
    mask = response_mask(torch.tensor([length]), length)
    advantages, _ = gae(rewards, torch.zeros(1, length), mask, gamma=cfg.gamma, lam=cfg.gae_lambda)
    assert advantages[0, 0] == pytest.approx(advantages[0, -1])
    old, _ = gae(rewards, torch.zeros(1, length), mask, gamma=1.0, lam=0.95)
    assert old[0, 0] < 0.01 * old[0, -1]


def test_vectorised_gae_equals_a_loop_per_row():
    torch.manual_seed(0)
    rewards, values = torch.randn(5, 7), torch.randn(5, 7)
    lengths = torch.tensor([7, 1, 4, 6, 2])
    advantages, returns = gae(rewards, values, response_mask(lengths, 7), gamma=0.9, lam=0.8)
    for row, n in enumerate(lengths.tolist()):
        running = 0.0
        for t in reversed(range(n)):                            # the textbook loop over one episode
            next_value = values[row, t + 1].item() if t + 1 < n else 0.0
            running = rewards[row, t].item() + 0.9 * next_value - values[row, t].item() + 0.9 * 0.8 * running
            assert advantages[row, t].item() == pytest.approx(running, abs=1e-5)
            assert returns[row, t].item() == pytest.approx(running + values[row, t].item(), abs=1e-5)
        assert advantages[row, n:].abs().sum() == 0


def test_clipped_policy_loss_by_hand():
    # ratios 1.5, 0.5, 1.1, 0.5 with advantages +1, -1, +2, +1 and clip 0.2; the 5th token is padding.
    new_logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 0.5, 50.0]])).requires_grad_()
    old_logprobs, advantages = torch.zeros(1, 5), torch.tensor([[1.0, -1.0, 2.0, 1.0, 1.0]])
    mask = response_mask(torch.tensor([4]), 5)
    loss, clipfrac, approx_kl = policy_loss(new_logprobs, old_logprobs, advantages, mask, clip_range=0.2)
    # per token max(-A·r, -A·clip(r)): -1.2 (clipped), 0.8 (clipped), -2.2, -0.5 (pessimistic: unclipped)
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2 - 0.5) / 4)
    assert clipfrac.item() == pytest.approx(0.5)
    kl_terms = [(r - 1) - math.log(r) for r in (1.5, 0.5, 1.1, 0.5)]
    assert approx_kl.item() == pytest.approx(sum(kl_terms) / 4, rel=1e-5)
    loss.backward()                                             # a clipped token gets no gradient
    assert torch.allclose(new_logprobs.grad, torch.tensor([[0.0, 0.0, -2 * 1.1 / 4, -0.5 / 4, 0.0]]), atol=1e-6)


def test_clipped_value_loss_by_hand():
    old_values, returns = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    new_values = torch.tensor([[1.0, -0.1, 1.5, 30.0]])           # the last token is padding
    loss, vf_clipfrac = value_loss(new_values, old_values, returns, response_mask(torch.tensor([3]), 4), 0.2)
    # token 0: clipped to 0.2, (0.2-1)² = 0.64 > 0 bites; token 1: 1.21 either way; token 2: 2.25 > 1.44
    assert loss.item() == pytest.approx(0.5 * (0.64 + 1.21 + 2.25) / 3)
    assert vf_clipfrac.item() == pytest.approx(1 / 3)


def test_running_moments_match_all_scores_at_once():
    stats, scores = RunningMoments(), torch.tensor([1.0, 2.0, 4.0, -3.0, 0.5, 7.0, 2.0])
    stats.update(scores[:3])
    stats.update(scores[3:])
    assert stats.mean == pytest.approx(scores.mean().item())
    assert stats.std == pytest.approx(scores.std(unbiased=False).item())


# -- the model side on the tiny model ---------------------------------------------------------------
def test_padded_batch_equals_one_by_one_and_reference_is_the_base(tokenizer):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    base = tiny_model(cfg, tokenizer)
    prompts = [[1, 9, 15, 23, 4], [1, 30], [1, 40, 41, 42]]
    responses = [[100, 101, 2], [200, 201, 202, 203, 204], [300]]  # row 0 ends with EOS == pad
    query, query_mask = left_pad(prompts, 2, "cpu")
    lengths = torch.tensor([len(r) for r in responses])
    response_ids = torch.full((3, 5), 2)
    for row, r in enumerate(responses):
        response_ids[row, :len(r)] = torch.tensor(r)
    mask = response_mask(lengths, 5)
    ids, attention = torch.cat([query, response_ids], 1), torch.cat([query_mask, mask.long()], 1)
    with torch.no_grad():
        base_logprobs, _ = forward_logprobs_values(base, None, ids, attention, 5)
        policy, value_head = nudged_policy(tiny_model(cfg, tokenizer), cfg.lora)
        logprobs, values = forward_logprobs_values(policy, value_head, ids, attention, 5)
        with policy.disable_adapter():
            ref_logprobs, _ = forward_logprobs_values(policy, None, ids, attention, 5)
        for row, (prompt, response) in enumerate(zip(prompts, responses)):
            alone = torch.tensor([prompt + response])
            one_logprobs, one_values = forward_logprobs_values(policy, value_head, alone, torch.ones_like(alone),
                                                               len(prompt))
            assert torch.allclose(logprobs[row, :len(response)], one_logprobs[0], atol=1e-4)
            assert torch.allclose(values[row, :len(response)], one_values[0], atol=1e-4)
    assert torch.allclose(ref_logprobs[mask], base_logprobs[mask], atol=1e-5)     # disabled adapter = the base
    assert (logprobs - ref_logprobs)[mask].abs().max() > 1e-3                      # and the adapter does act


def test_save_and_warm_start(tokenizer, tmp_path):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    policy, value_head = nudged_policy(tiny_model(cfg, tokenizer), cfg.lora)
    ids = torch.tensor([[1, 9, 15, 23, 4, 100, 101]])
    folder = save_policy(policy, value_head, tmp_path / "v1")
    assert (folder / "adapter_config.json").exists() and (folder / "value_head.safetensors").exists()
    again = make_policy(tiny_model(cfg, tokenizer), cfg.lora, init_adapter=str(folder))
    head_again = load_value_head(folder, again.config.hidden_size)
    assert any(p.requires_grad for p in again.parameters())                       # trainable, not frozen
    with torch.no_grad():
        before = forward_logprobs_values(policy, value_head, ids, torch.ones_like(ids), 5)
        after = forward_logprobs_values(again, head_again, ids, torch.ones_like(ids), 5)
    assert torch.allclose(before[0], after[0], atol=1e-5) and torch.allclose(before[1], after[1], atol=1e-5)
    assert load_value_head(tmp_path, again.config.hidden_size) is None                # no head saved there


def test_ptx_and_early_stop_run(tokenizer):
    from trainer.sft import sft_loss

    cfg = tiny_cfg("ppo.iterations=1", "ppo.epochs=3", "ppo.target_kl=0", "ppo.ptx_coef=0.5")
    policy = make_policy(tiny_model(cfg, tokenizer), cfg.lora)
    no_reward = lambda messages, texts: torch.zeros(len(texts))                     # noqa: E731
    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, PROMPTS, no_reward, cfg.ppo)
    assert metrics["ppo/epochs"] == 3 and "ppo/ptx_loss" not in metrics              # target_kl 0: no early stop
    cfg.ppo.target_kl = 1e-9
    demos = [{"prompt_messages": PROMPTS[0], "answer": "Cats purr."},
             {"prompt_messages": PROMPTS[1], "answer": "Dogs bark loudly."}]
    ptx = (demos, lambda batch: sft_loss(policy, tokenizer, batch, 256))             # as trainer/pipeline.py passes it
    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, PROMPTS, no_reward, cfg.ppo,
                        ptx_batches=ptx)
    assert metrics["ppo/epochs"] == 1                                               # approx KL > target after epoch 1
    assert math.isfinite(metrics["ppo/ptx_loss"]) and metrics["ppo/ptx_loss"] > 0


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_ppo_raises_a_rule_based_reward_with_bounded_kl(tokenizer, quantization):
    # Reward: the share of the answer's characters that are spaces. At T=1 the tiny random model cannot learn
    # anything sharp: its tied 0.02-std embeddings under a unit RMSNorm give logits within about ±1.3, so every
    # answer is near-uniform over the top 50 tokens whatever LoRA does. At T=0.3 its distributions are peaked
    # like a real LM's and LoRA can move them. Rollouts use top-50 here (ppo.top_k): over the full 49k vocabulary
    # those flat logits spread a random model's mass too thin to learn from in 15 iterations.
    # The same bar on a bitsandbytes 4-bit base (QLoRA-style; bitsandbytes runs NF4 on CPU too).
    if quantization != "none":
        pytest.importorskip("bitsandbytes", reason="the 4-bit path needs bitsandbytes (in the test extra)")
    cfg = tiny_cfg(*SPACE_SAMPLING, "ppo.epochs=2", "ppo.kl_budget=0", f"model.quantization={quantization}")
    policy = make_policy(tiny_model(cfg, tokenizer), cfg.lora)
    history = []

    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, PROMPTS, space_share, cfg.ppo,
                        progress=history.append, seed=0)
    assert [h["step"] for h in history] == list(range(1, 16)) and history[0]["stage"] == "ppo"
    for key in ("objective/score", "objective/kl", "objective/length", "ppo/approx_kl", "ppo/clipfrac",
                "ppo/value_loss", "objective/eos_rate", "time/rollout_s", "time/update_s"):
        assert math.isfinite(metrics[key]), key
    scores = [h["objective/score"] for h in history]
    start, end = sum(scores[:3]) / 3, sum(scores[-3:]) / 3
    assert end > start + 0.15, scores                            # seen: about 0.14 -> 0.45 and up
    assert 0.5 < metrics["objective/kl"] < 40                    # it moved, but stayed near the base


def space_run(tokenizer, *overrides):
    """PPO on the tiny model against `space_share` with SPACE_SAMPLING: (metrics, progress history, LoRA weights)."""
    cfg = tiny_cfg(*SPACE_SAMPLING, *overrides)
    policy = make_policy(tiny_model(cfg, tokenizer), cfg.lora)
    history = []
    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, PROMPTS, space_share, cfg.ppo,
                        progress=history.append, seed=0)
    return metrics, history, {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}


def test_kl_budget_is_a_ceiling_the_update_that_crossed_it_is_undone(tokenizer):
    """ppo.kl_budget: once a batch of rollouts is that far (nats per answer) from the base, PPO stops and keeps the
    policy from before the update that carried it there: the same weights as a run of one iteration fewer."""
    metrics, history, lora = space_run(tokenizer, "ppo.kl_budget=1", "ppo.kl_backtracks=0")
    kls = [h["objective/kl"] for h in history]
    assert 1 < len(kls) < 15 and all(kl < 1 for kl in kls), kls   # it moved, then stopped short of the cap
    assert metrics["ppo/stopped_by_kl_budget"] == 1.0 and metrics["objective/kl_over_budget"] >= 1
    assert metrics["ppo/updates_undone"] == 1 and metrics["ppo/iterations"] == len(kls) - 1
    _, _, kept = space_run(tokenizer, "ppo.kl_budget=0", f"ppo.iterations={len(kls) - 1}")
    assert lora.keys() == kept.keys()
    assert all(torch.equal(lora[n], kept[n]) for n in lora)   # the last update undone, exactly
    _, _, moved = space_run(tokenizer, "ppo.kl_budget=0", f"ppo.iterations={len(kls)}")
    assert not all(torch.equal(lora[n], moved[n]) for n in lora)   # (the undone update did change the weights)


def test_after_an_undone_update_ppo_goes_on_at_half_the_step(tokenizer):
    """ppo.kl_backtracks: after the ceiling undid an update, PPO goes on from the policy within it at half the step;
    every update it made started from rollouts within the ceiling."""
    metrics, history, _ = space_run(tokenizer, "ppo.kl_budget=1", "ppo.kl_backtracks=2", "ppo.iterations=25")
    kls, steps = [h["objective/kl"] for h in history], [h["step"] for h in history]   # one per update made
    assert all(kl < 1 for kl in kls), kls
    undone = metrics["ppo/updates_undone"]
    assert 1 <= undone <= 3 and metrics["ppo/iterations"] == len(kls) - undone
    first_crossing = next(i for i in range(1, 26) if i not in steps)
    assert any(step > first_crossing for step in steps), steps  # it went on after the first crossing...
    halvings = min(undone, 2)                                   # ...on a smaller step (the third undo stops it)
    assert metrics["ppo/learning_rate_final"] == pytest.approx(0.002 / 2 ** halvings)


def test_prompt_baseline_is_leave_one_out_within_a_prompt():
    from trainer.ppo import prompt_baseline

    scores = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 7.0])
    prompts = torch.tensor([0, 0, 0, 1, 1, 2])                # three answers, two answers, one answer
    centered = prompt_baseline(scores, prompts)
    expected = torch.tensor([1 - 2.5, 2 - 2.0, 3 - 1.5, 10 - 20.0, 20 - 10.0, 7.0])   # alone: kept as it is
    assert torch.allclose(centered, expected)
    shifted = prompt_baseline(scores + torch.tensor([5.0, 5, 5, -3, -3, 0]), prompts)  # a per-prompt offset
    assert torch.allclose(shifted[:5], centered[:5])          # ...is what the baseline removes


def test_served_rows_tokenise_each_answer_once_and_mark_cut_ones(tokenizer):
    from trainer.ppo import served_rows

    pair = {"prompt_messages": PROMPTS[0], "chosen": "Cats purr.", "rejected": "Cats " * 40,
            "ended_with_eos": {"chosen": True, "rejected": True}}
    rows = served_rows(tokenizer, [pair], max_prompt_tokens=100, response_length=20)
    assert [r["text"] for r in rows] == ["Cats purr.", "Cats " * 40] and {r["pair"] for r in rows} == {0}
    assert rows[0]["answer_ids"] == tokenizer("Cats purr.", add_special_tokens=False)["input_ids"]
    assert rows[0]["ended_with_eos"] and not rows[1]["ended_with_eos"]       # cut at 20 tokens: no EOS to train
    assert len(rows[1]["answer_ids"]) == 20


def test_ppo_learns_from_voted_answers_it_never_sampled(tokenizer):
    # Served pairs only (no prompt is ever sampled for the reward): each pair's chosen answer is spaced words, its
    # rejected one a run-on string; the reward prefers spaces. PPO on those rows must raise the policy's
    # likelihood of the chosen answers over the rejected ones (the margin a pairwise loss would train).
    from trainer.ppo import served_rows

    cfg = tiny_cfg("ppo.iterations=6", "ppo.rollout_prompts=1", "ppo.samples_per_prompt=1", "ppo.served_pairs=4",
                   "ppo.minibatch_size=9", "ppo.epochs=2", "ppo.learning_rate=0.003", "ppo.target_kl=0",
                   "ppo.response_length=12")
    words = ["cat", "dog", "tea", "sun", "rain", "map", "code", "song"]
    pairs = [{"prompt_messages": PROMPTS[i], "chosen": " ".join(words[i:] + words[:i])[:40],
              "rejected": "".join(words[i:] + words[:i])[:40], "ended_with_eos": {"chosen": True, "rejected": True}}
             for i in range(4)]
    rows = served_rows(tokenizer, pairs, max_prompt_tokens=100, response_length=12)
    policy = make_policy(tiny_model(cfg, tokenizer), cfg.lora)

    def margin():                                               # Σ log π(chosen) − Σ log π(rejected)
        batch = ppo.pack_query_response([r["prompt_ids"] for r in rows], [r["answer_ids"] for r in rows],
                                        tokenizer.pad_token_id, "cpu")
        with torch.no_grad():
            logprobs, _ = forward_logprobs_values(policy, None, batch["query_response"], batch["attention_mask"],
                                                  batch["context_length"], cfg.ppo.temperature)
        totals = (logprobs * response_mask(batch["response_lengths"], logprobs.shape[1])).sum(1)
        return (totals[0::2] - totals[1::2]).sum().item()

    before = margin()
    metrics = train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, PROMPTS[:1], space_share, cfg.ppo,
                        seed=0, served=rows)
    after = margin()
    assert after > before + 20, (before, after)                 # seen: 35 -> 105 nats; without the pairs 35 -> 34
    assert metrics["objective/served_rows"] == 8


def test_cached_frozen_layers_give_the_whole_forwards_numbers_and_gradients(tokenizer):
    from trainer.frozen_layers import frozen_layer_count, lower_hidden

    torch.manual_seed(0)
    cfg = tiny_cfg()
    policy, value_head = nudged_policy(tiny_model(cfg, tokenizer), cfg.lora)
    count = frozen_layer_count(policy)
    assert 0 < count < policy.config.num_hidden_layers          # LoRA on the top half only
    prompts, responses = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [23, 24, 25, 26, 27]]
    batch = ppo.pack_query_response(prompts, responses, tokenizer.pad_token_id, "cpu")
    ids, attention, ctx = batch["query_response"], batch["attention_mask"], batch["context_length"]
    mask = response_mask(batch["response_lengths"], ids.shape[1] - ctx)
    lower = lower_hidden(policy, ids, attention, count)
    results = []
    for cached in (None, lower):
        policy.zero_grad()
        logprobs, values = forward_logprobs_values(policy, value_head, ids, attention, ctx, 0.7, cached, count)
        (logprobs * mask).sum().backward()
        grads = [p.grad.clone() for p in policy.parameters() if p.requires_grad]
        with torch.no_grad(), policy.disable_adapter():
            ref, _ = forward_logprobs_values(policy, None, ids, attention, ctx, 0.7, cached, count)
        results.append((logprobs.detach(), values.detach(), grads, ref))
    (whole, whole_values, whole_grads, whole_ref), (part, part_values, part_grads, part_ref) = results
    assert torch.allclose(whole[mask], part[mask], atol=1e-5)
    assert torch.allclose(whole_ref[mask], part_ref[mask], atol=1e-5)
    assert torch.allclose(whole_values[mask], part_values[mask], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(whole_grads, part_grads))
    assert (whole - whole_ref)[mask].abs().max() > 1e-3         # the adapter acts above the cached layers
