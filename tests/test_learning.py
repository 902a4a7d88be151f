"""The loop learns the voters' preference, whatever it is: opposite judges move the policy in opposite directions."""
import torch

from chat_app.config import load_config
from chat_app.model import load_model
from conftest import TINY
from trainer.data import as_messages
from trainer.evaluate import generate_answers
from trainer.oracles import load_oracle
from trainer.ppo import ValueHead, make_policy, train_ppo
from trainer.reward_heads import train_head_reward_model

TOPICS = ["cats", "rain", "bread", "chess", "tea", "ships", "owls", "snow", "jazz", "kites", "maps", "bees"]
PROMPTS = [f"Tell me about {t}." for t in TOPICS] + [f"Why do people like {t}?" for t in TOPICS]
# The tiny random model samples like a real LM only at a low temperature and from its top tokens (see
# tests/test_ppo.py): answers then differ in which tokens they use, and so in how many characters they have.
SAMPLING = ["ppo.temperature=0.3", "ppo.top_k=50", "ppo.rollout_prompts=8", "ppo.samples_per_prompt=2",
            "ppo.minibatch_size=4", "ppo.epochs=2", "ppo.learning_rate=0.002", "ppo.target_kl=0",
            "ppo.kl_coef=0.01", "ppo.kl_budget=0", "ppo.iterations=12", "ppo.max_minutes=0", "ppo.cycle_minutes=0",
            "reward.min_pairs=8"]


def sample(policy, tokenizer, cfg, prompts, seed):
    texts, *_ = generate_answers(policy, tokenizer, [as_messages(p) for p in prompts],
                                 max_new_tokens=cfg.ppo.response_length, temperature=cfg.ppo.temperature,
                                 seed=seed, top_k=cfg.ppo.top_k)
    return texts


def votes_from(judge_name, prompts, answers_a, answers_b):
    """Preference pairs as the store hands them to the trainer (ties marked)."""
    judge, pairs = load_oracle(judge_name), []
    for i, (prompt, a, b) in enumerate(zip(prompts, answers_a, answers_b)):
        verdict = judge(prompt, a, b)
        chosen, rejected = (b, a) if verdict == "b" else (a, b)
        pairs.append({"comparison_id": i, "prompt_messages": as_messages(prompt), "chosen": chosen,
                      "rejected": rejected, **({"tie": True} if verdict == "tie" else {})})
    return pairs


def mean_chars(texts):
    return sum(len(t) for t in texts) / len(texts)


def test_opposite_judges_move_the_policy_in_opposite_directions(tokenizer):
    """Votes by `longer` and by `shorter` on the same answers: reward model, then PPO, from the same base.
    The two policies must end on opposite sides of the base in answer length (characters)."""
    torch.set_num_threads(1)
    cfg = load_config(TINY, SAMPLING)
    base_policy = load_model(cfg.model, tokenizer)
    vote_prompts = [p for p in PROMPTS for _ in range(4)]
    answers_a = sample(base_policy, tokenizer, cfg, vote_prompts, seed=1)
    answers_b = sample(base_policy, tokenizer, cfg, vote_prompts, seed=2)
    probe = [p for p in PROMPTS for _ in range(3)]
    base_chars = mean_chars(sample(base_policy, tokenizer, cfg, probe, seed=9))
    moved = {}
    for judge in ("longer", "shorter"):
        base = load_model(cfg.model, tokenizer)
        reward_model, metrics = train_head_reward_model(base, tokenizer, cfg.reward,
                                                        votes_from(judge, vote_prompts, answers_a, answers_b))
        assert metrics["rm/accuracy"] > 0.6, (judge, metrics)          # it read the voters from the features
        policy = make_policy(base, cfg.lora)
        reward_model.backbone = policy                                  # as in the pipeline: one copy of the base
        train_ppo(policy, ValueHead(policy.config.hidden_size), tokenizer, [as_messages(p) for p in PROMPTS],
                  reward_model.score, cfg.ppo, seed=0)
        moved[judge] = mean_chars(sample(policy, tokenizer, cfg, probe, seed=9)) - base_chars
    assert moved["longer"] > 0 > moved["shorter"], moved
    assert moved["longer"] - moved["shorter"] > 0.05 * base_chars, (moved, base_chars)   # seen: +5.9 and -3.6 of 82
