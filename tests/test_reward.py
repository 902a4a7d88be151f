"""Reward model: Bradley-Terry loss, encoding, prompt split, batched scoring, learning, save/load, warm start."""
import math
import random
from pathlib import Path

import pytest
import torch

from chat_app.config import load_config
from trainer.reward import (RewardModel, bradley_terry_loss, encode_pair_text, prompt_key, split_by_prompt,
                            train_reward_model)

TOPICS = ["rivers", "volcanoes", "bread", "chess", "whales", "bicycles", "tea", "comets", "violins", "glaciers",
          "bees", "castles", "deserts", "kites", "lighthouses", "mushrooms", "owls", "pianos", "rainbows", "sailing",
          "tigers", "tulips", "typewriters", "windmills", "zebras", "coral", "lanterns", "maple trees", "robots", "soap",
          "trains", "cheese", "fireflies", "origami", "penguins", "quartz", "saturn", "honey", "igloos", "jazz",
          "kangaroos", "lemons", "marbles", "nebulas", "otters", "pottery", "quilts", "rockets", "sundials", "thunder"]
ASKS = ["Tell me about {}.", "What do you know about {}?", "Write a short note on {}.", "Explain {} to a child."]
WARM = ["wonderful", "delightful", "fascinating", "lovely", "brilliant", "amazing"]
COLD = ["terrible", "awful", "boring", "dreadful", "horrible", "useless"]
TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def cfg():
    torch.set_num_threads(1)  # two cores, shared with whatever else runs: one thread is faster here
    return load_config(TINY, ["reward.epochs=3"])  # `tokenizer` comes from conftest.py


def separable_pairs(n: int = 50, seed: int = 0) -> list[dict]:
    """Chosen answers use warm words, rejected ones cold words; prompts vary in topic and phrasing."""
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        prompt = [{"role": "user", "content": rng.choice(ASKS).format(topic)}]
        chosen = f"{topic.capitalize()} are {rng.choice(WARM)} and {rng.choice(WARM)}."
        rejected = f"{topic.capitalize()} are {rng.choice(COLD)} and {rng.choice(COLD)}."
        pairs.append({"comparison_id": i, "prompt_messages": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def swapped(pairs: list[dict]) -> list[dict]:
    return [{**p, "chosen": p["rejected"], "rejected": p["chosen"]} for p in pairs]


@pytest.fixture(scope="module")
def trained(cfg, tokenizer):
    return train_reward_model(cfg.model, cfg.reward, tokenizer, separable_pairs(), seed=0)


def test_bradley_terry_loss_by_hand():
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0]))
    # -log σ(x) = log(1 + e^-x) for margins 2, 0, -2
    expected = (math.log(1 + math.exp(-2)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_split_by_prompt_keeps_each_prompt_on_one_side():
    pairs = [p for p in separable_pairs(40) for _ in range(3)]  # three pairs per prompt
    train, heldout = split_by_prompt(pairs, heldout_fraction=0.25, seed=0)
    assert len(train) + len(heldout) == len(pairs) and heldout and train
    assert not {prompt_key(p["prompt_messages"]) for p in train} & {prompt_key(p["prompt_messages"]) for p in heldout}
    # a prompt stays on its side as more votes arrive (a warm-started RM is never scored on its training prompts)
    _, heldout_more = split_by_prompt(pairs + separable_pairs(10, seed=1), heldout_fraction=0.25, seed=0)
    assert {prompt_key(p["prompt_messages"]) for p in heldout} <= {prompt_key(p["prompt_messages"]) for p in heldout_more}


def test_split_by_prompt_with_few_prompts():
    two = separable_pairs(2)
    train, heldout = split_by_prompt(two * 4, heldout_fraction=0.2, seed=0)
    assert len({prompt_key(p["prompt_messages"]) for p in heldout}) == 1 and len(train) == 4
    train, heldout = split_by_prompt(separable_pairs(1) * 5, heldout_fraction=0.2, seed=0)
    assert len(train) == 5 and heldout == []


def test_encode_pair_text_ends_with_answer_and_eos(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = encode_pair_text(tokenizer, messages, "Hello friend.", max_length=512)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "Hello friend."}], tokenize=False)
    assert tokenizer.decode(ids) + "\n" == full  # the template's text, ending at <|im_end|>
    assert ids[-1] == tokenizer.eos_token_id


def test_encode_pair_text_truncates_the_prompt_not_the_answer(tokenizer):
    messages = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"}]
    answer = "The end of the answer stays."
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = encode_pair_text(tokenizer, messages, answer, max_length=32)
    assert len(ids) == 32 and ids[-len(answer_ids):] == answer_ids


def test_too_few_pairs_is_skipped(cfg, tokenizer):
    rm, metrics = train_reward_model(cfg.model, cfg.reward, tokenizer, separable_pairs(cfg.reward.min_pairs - 1))
    assert rm is None and metrics == {"rm/skipped": f"skipped: {cfg.reward.min_pairs - 1} pairs, need {cfg.reward.min_pairs}"}


def test_padded_batch_scores_equal_one_by_one_at_the_last_token(cfg, tokenizer):
    rm = RewardModel.create(cfg.model, cfg.reward, tokenizer, seed=0)
    pairs = separable_pairs(6)
    prompts = [p["prompt_messages"] for p in pairs]
    answers = [p["chosen"] + " more" * i for i, p in enumerate(pairs)]  # different lengths: real padding
    batched = rm.score(prompts, answers, batch_size=16)
    single = torch.cat([rm.score([m], [a]) for m, a in zip(prompts, answers)])
    assert batched.shape == (6,)
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # with no pad id, HF's own head reads position -1: our score is the reward at the final EOS
    ids = encode_pair_text(tokenizer, prompts[0], answers[0], cfg.reward.max_length)
    rm.model.get_base_model().config.pad_token_id = None
    with torch.no_grad():
        hf = rm.model(input_ids=torch.tensor([ids])).logits.squeeze()
    assert hf.item() == pytest.approx(single[0].item(), abs=1e-5)


def test_reward_model_learns_a_separable_preference(trained):
    rm, metrics = trained
    assert metrics["rm/train_pairs"] + metrics["rm/heldout_pairs"] == 50 and metrics["rm/heldout_pairs"] >= 5
    assert metrics["rm/train_accuracy"] >= 0.9
    assert metrics["rm/accuracy"] >= 0.9 and metrics["rm/margin"] > 0
    for key in ("rm/loss", "time/reward_s", "rm/pairs_per_s"):
        assert math.isfinite(metrics[key])


def test_reward_model_learns_the_mirrored_preference(cfg, tokenizer):
    # the same pairs with the labels flipped: a trainer that does not learn cannot pass both this and the above
    _, metrics = train_reward_model(cfg.model, cfg.reward, tokenizer, swapped(separable_pairs()), seed=0)
    assert metrics["rm/accuracy"] >= 0.9 and metrics["rm/train_accuracy"] >= 0.9


def test_save_load_round_trip_and_warm_start(cfg, tokenizer, trained, tmp_path):
    rm, _ = trained
    pairs = separable_pairs(8, seed=3)
    prompts, answers = [p["prompt_messages"] for p in pairs], [p["chosen"] for p in pairs]
    rm.save(tmp_path / "rm")
    loaded = RewardModel.load(cfg.model, cfg.reward, tokenizer, tmp_path / "rm")
    torch.testing.assert_close(loaded.score(prompts, answers), rm.score(prompts, answers), atol=0, rtol=0)
    # warm start with no training steps gives back the saved model, trainable
    no_steps = load_config(TINY, ["reward.epochs=0"]).reward
    warm, _ = train_reward_model(cfg.model, no_steps, tokenizer, separable_pairs(), init_adapter=str(tmp_path / "rm"))
    assert any(p.requires_grad for p in warm.model.parameters())
    torch.testing.assert_close(warm.score(prompts, answers), rm.score(prompts, answers), atol=0, rtol=0)


def test_a_warm_start_trains_on_new_pairs_plus_a_replay_and_tokenises_only_new_ones(cfg, tokenizer, tmp_path):
    everything = separable_pairs(50)
    first, first_metrics = train_reward_model(cfg.model, cfg.reward, tokenizer, everything[:30], seed=0)
    assert first_metrics["rm/tokenized_pairs"] == 30 and first_metrics["rm/replayed_pairs"] == 0
    first.save(tmp_path / "rm")
    warm, metrics = train_reward_model(cfg.model, cfg.reward, tokenizer, everything, seed=0,
                                       init_adapter=str(tmp_path / "rm"))
    train, _ = split_by_prompt(everything, cfg.reward.heldout_fraction, seed=0)
    new_train = [p for p in train if p["comparison_id"] >= 30]
    assert metrics["rm/new_pairs"] == len(new_train)
    assert metrics["rm/replayed_pairs"] == min(len(train) - len(new_train),
                                               max(len(new_train), cfg.reward.min_pairs - len(new_train)))
    assert metrics["rm/train_pairs"] < len(train)              # not every pair again
    assert metrics["rm/tokenized_pairs"] == 20                 # the 30 old pairs came from the carried cache
    assert metrics["rm/accuracy"] >= 0.9                        # and it still ranks unseen prompts
    assert warm.trained_on >= {p["comparison_id"] for p in train}
    # another tokeniser setting makes the carried cache unusable: everything is tokenised again
    other = load_config(TINY, ["reward.epochs=0", "reward.max_length=100"]).reward
    _, again = train_reward_model(cfg.model, other, tokenizer, everything, init_adapter=str(tmp_path / "rm"))
    assert again["rm/tokenized_pairs"] == 50


def test_micro_batches_give_the_same_model_as_whole_batches(cfg, tokenizer):
    pairs = separable_pairs(24)
    probe = separable_pairs(6, seed=9)
    scores = []
    for micro in (1, 8):
        reward_cfg = load_config(TINY, ["reward.epochs=1", "reward.batch_size=8",
                                        f"reward.micro_batch_size={micro}"]).reward
        rm, _ = train_reward_model(cfg.model, reward_cfg, tokenizer, pairs, seed=0)
        scores.append(rm.score([p["prompt_messages"] for p in probe], [p["chosen"] for p in probe]))
    untrained = RewardModel.create(cfg.model, cfg.reward, tokenizer, seed=0)
    before = untrained.score([p["prompt_messages"] for p in probe], [p["chosen"] for p in probe])
    torch.testing.assert_close(scores[0], scores[1], atol=1e-4, rtol=1e-4)   # accumulation: the same update
    assert not torch.allclose(scores[0], before, atol=1e-3)                    # and training did move it
