"""Reward model: the base model with a scalar head and its own LoRA adapter, fitted to A/B votes (Bradley-Terry)."""
from __future__ import annotations

import hashlib
import json
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from chat_app.config import ModelConfig, RewardConfig
from chat_app.decoding import left_pad
from chat_app.model import load_model

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
HEAD = "score"                # AutoModelForSequenceClassification's scalar head (Llama, Qwen, Mistral...)
MAX_GRAD_NORM = 1.0           # gradient-norm clipping, as in TRL's RewardTrainer and every PPO recipe
HEAD_LR_SCALE = 10.0          # the head starts random and is one linear map: it needs a bigger step than LoRA
PROGRESS_EVERY = 5            # steps between progress reports


def bradley_terry_loss(chosen: Tensor, rejected: Tensor) -> Tensor:
    """Mean of -log σ(r_chosen − r_rejected); both shapes (pairs,)."""
    return -F.logsigmoid(chosen - rejected).mean()


def encode_pair_text(tokenizer, prompt_messages: list[dict], answer: str, max_length: int) -> list[int]:
    """Token ids of the chat prompt plus the assistant's answer and EOS, cut from the front to `max_length`."""
    prompt_ids = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=True)
    if hasattr(prompt_ids, "keys"):  # transformers 5 hands back a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    # answer + EOS, the tokens the policy itself emits after "<|im_start|>assistant\n" (no trailing "\n")
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = list(prompt_ids) + answer_ids
    return ids[-max_length:]  # the oldest prompt tokens go first; the answer's end is what the score reads


def prompt_key(prompt_messages: list[dict]) -> str:
    """The prompt's text as one string: pairs with the same key share a prompt."""
    return json.dumps([[m.get("role"), m.get("content")] for m in prompt_messages], ensure_ascii=False)


def split_by_prompt(pairs: list[dict], heldout_fraction: float, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, heldout) pairs; a prompt's pairs all land on one side, with ≥ 1 held-out prompt when there are ≥ 2."""
    def unit(key: str) -> float:  # a prompt's side depends on its own text, so it stays put as votes accrue
        digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64

    keys = sorted({prompt_key(p["prompt_messages"]) for p in pairs}, key=unit)
    heldout_keys = {k for k in keys if unit(k) < heldout_fraction}
    if heldout_fraction > 0 and len(keys) >= 2:
        if not heldout_keys:
            heldout_keys = {keys[0]}               # too few prompts for the fraction: hold out one anyway
        if len(heldout_keys) == len(keys):
            heldout_keys.discard(keys[-1])         # and always train on at least one
    train = [p for p in pairs if prompt_key(p["prompt_messages"]) not in heldout_keys]
    heldout = [p for p in pairs if prompt_key(p["prompt_messages"]) in heldout_keys]
    return train, heldout


def lora_config(reward_cfg: RewardConfig):
    from peft import LoraConfig, TaskType

    return LoraConfig(task_type=TaskType.SEQ_CLS, r=reward_cfg.lora_r, lora_alpha=2 * reward_cfg.lora_r,
                      lora_dropout=0.0, target_modules=TARGET_MODULES, modules_to_save=[HEAD])


TOKENS_FILE = "pair_tokens.json"
"""Beside a saved reward adapter: the token ids of every pair it has read, and which pairs it trained on."""


class RewardModel:
    """The scalar-head model with its LoRA adapter, and the tokenizer; scores (prompt, answer) pairs."""

    def __init__(self, model, tokenizer, max_length: int):
        self.model = model            # a peft PeftModelForSequenceClassification
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.device = next(model.parameters()).device
        self.pair_tokens: dict[int, tuple[list[int], list[int]]] = {}
        """comparison id -> (chosen ids, rejected ids): tokenised once, carried from run to run."""
        self.trained_on: set[int] = set()
        """Comparison ids this adapter has been trained on, in this run or the runs it warm-started from."""
        self.tokenized = 0
        """Pairs tokenised by this object (the rest came from the carried cache)."""

    def _cache_key(self) -> dict:
        return {"format": 1, "tokenizer": getattr(self.tokenizer, "name_or_path", ""), "vocab": len(self.tokenizer),
                "max_length": self.max_length}

    def load_pair_tokens(self, folder: str | Path) -> None:
        """Take over a previous run's token cache and trained-on ids (ignored if the tokenizer or length differ)."""
        path = Path(folder) / TOKENS_FILE
        if not path.exists():
            return
        data = json.loads(path.read_text())
        if data.get("key") != self._cache_key():
            return
        self.pair_tokens = {int(k): (v[0], v[1]) for k, v in data["pairs"].items()}
        self.trained_on = set(data["trained_on"])

    @classmethod
    def create(cls, model_cfg: ModelConfig, reward_cfg: RewardConfig, tokenizer, init_adapter: str | None = None,
               seed: int = 0) -> "RewardModel":
        """A trainable reward model: a fresh LoRA adapter and head, or `init_adapter`'s, loaded trainable."""
        from peft import PeftModel, get_peft_model

        torch.manual_seed(seed)  # the new head's init (a pretrained model has none) and the LoRA A matrices
        base = load_model(model_cfg, tokenizer, kind="reward")
        if init_adapter:
            model = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
        else:
            model = get_peft_model(base, lora_config(reward_cfg))
        rm = cls(model, tokenizer, reward_cfg.max_length)
        if init_adapter:
            rm.load_pair_tokens(init_adapter)
        return rm

    @classmethod
    def load(cls, model_cfg: ModelConfig, reward_cfg: RewardConfig, tokenizer, folder: str | Path) -> "RewardModel":
        """A saved reward model, frozen, in eval mode."""
        from peft import PeftModel

        base = load_model(model_cfg, tokenizer, kind="reward")
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=False)
        model.eval()
        return cls(model, tokenizer, reward_cfg.max_length)

    def save(self, folder: str | Path) -> None:
        """Write the adapter and the trained head (peft's modules_to_save), and the pair token cache, to `folder`."""
        self.model.save_pretrained(str(folder))
        data = {"key": self._cache_key(), "trained_on": sorted(self.trained_on),
                "pairs": {str(k): [c, r] for k, (c, r) in self.pair_tokens.items()}}
        (Path(folder) / TOKENS_FILE).write_text(json.dumps(data, separators=(",", ":")))

    def encode(self, prompt_messages_list: list[list[dict]], answers: list[str]) -> list[list[int]]:
        return [encode_pair_text(self.tokenizer, m, a, self.max_length) for m, a in zip(prompt_messages_list, answers)]

    def encode_pairs(self, pairs: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        """(chosen ids, rejected ids) per pair; a pair with a comparison id is tokenised once across runs."""
        chosen, rejected = [], []
        for pair in pairs:
            key = pair.get("comparison_id")
            ids = self.pair_tokens.get(key) if key is not None else None
            if ids is None:
                ids = (encode_pair_text(self.tokenizer, pair["prompt_messages"], pair["chosen"], self.max_length),
                       encode_pair_text(self.tokenizer, pair["prompt_messages"], pair["rejected"], self.max_length))
                self.tokenized += 1
                if key is not None:
                    self.pair_tokens[key] = ids
            chosen.append(ids[0])
            rejected.append(ids[1])
        return chosen, rejected

    def score_ids(self, sequences: list[list[int]]) -> Tensor:
        """Rewards (batch,) float32, read from the hidden state at each sequence's last real token."""
        # Pooling by hand, not through the HF head's forward: transformers 5's GenericForSequenceClassification
        # pools at "the rightmost token that is not pad_token_id", and with pad == eos (SmolLM2: id 2) that
        # skips our final EOS even under left padding. Left padding puts every last real token at position -1.
        ids, mask = left_pad(sequences, self.tokenizer.pad_token_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # each row counts from its first real token
        backbone = self.model.get_base_model()          # LoRA layers are injected in place: still active
        body = getattr(backbone, backbone.base_model_prefix)
        hidden = body(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
        return getattr(backbone, HEAD)(hidden[:, -1]).squeeze(-1).float()  # the head's trained copy (modules_to_save)

    @torch.no_grad()
    def score(self, prompt_messages_list: list[list[dict]], answers: list[str], batch_size: int = 16) -> Tensor:
        """Rewards (n,) on the CPU for each (prompt messages, answer); no grad, eval mode, batched."""
        return self.score_sequences(self.encode(prompt_messages_list, answers), batch_size)

    @torch.no_grad()
    def score_sequences(self, sequences: list[list[int]], batch_size: int = 16) -> Tensor:
        """Rewards (n,) on the CPU for token sequences; no grad, eval mode, batched by length."""
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths pad less
        rewards = torch.zeros(len(sequences))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            rewards[rows] = self.score_ids([sequences[i] for i in rows]).cpu()
        self.model.train(was_training)
        return rewards


def evaluate_pairs(rm: RewardModel, pairs: list[dict], batch_size: int = 16) -> dict:
    """Pair accuracy, Bradley-Terry loss and mean margin (chosen − rejected) of `rm` on `pairs`."""
    chosen_ids, rejected_ids = rm.encode_pairs(pairs)
    chosen, rejected = rm.score_sequences(chosen_ids, batch_size), rm.score_sequences(rejected_ids, batch_size)
    margin = chosen - rejected
    return {"accuracy": (margin > 0).float().mean().item(), "loss": bradley_terry_loss(chosen, rejected).item(),
            "margin": margin.mean().item()}


def train_reward_model(model_cfg: ModelConfig, reward_cfg: RewardConfig, tokenizer, pairs: list[dict],
                       init_adapter: str | None = None, progress: Callable[[dict], None] | None = None,
                       seed: int = 0) -> tuple[RewardModel | None, dict]:
    """Fit a reward model to preference pairs; (None, {"rm/skipped": why}) when there are too few pairs.

    Held-out metrics are None when all pairs share one prompt (nothing to hold out).
    Warm-started from `init_adapter`, it trains on the pairs that adapter has not seen plus a replay sample of
    the old ones (`reward.replay_ratio`), and tokenises only pairs it has never read: the cost of a run follows
    the new votes, not all of them (the held-out evaluation, forward only, still reads every held-out pair).
    """
    if len(pairs) < reward_cfg.min_pairs:
        return None, {"rm/skipped": f"skipped: {len(pairs)} pairs, need {reward_cfg.min_pairs}"}
    started = time.perf_counter()

    # 1. split by prompt, so held-out accuracy measures prompts the model never saw
    train, heldout = split_by_prompt(pairs, reward_cfg.heldout_fraction, seed)
    rm = RewardModel.create(model_cfg, reward_cfg, tokenizer, init_adapter=init_adapter, seed=seed)
    new = [p for p in train if p.get("comparison_id") not in rm.trained_on]
    old = [p for p in train if p.get("comparison_id") in rm.trained_on]
    if old and reward_cfg.replay_ratio >= 0:      # warm start: new pairs, and a replay of old ones against forgetting
        replay = max(round(len(new) * reward_cfg.replay_ratio), reward_cfg.min_pairs - len(new), 0)
        fit = new + random.Random(seed).sample(old, min(len(old), replay))
    else:
        fit = train
    encode_started = time.perf_counter()
    chosen_ids, rejected_ids = rm.encode_pairs(fit)
    encode_s = time.perf_counter() - encode_started

    # 2. optimizer: LoRA at the configured lr, the scalar head faster
    head_params = [p for n, p in rm.model.named_parameters() if p.requires_grad and f".{HEAD}." in n]
    lora_params = [p for n, p in rm.model.named_parameters() if p.requires_grad and f".{HEAD}." not in n]
    optimizer = torch.optim.AdamW([
        {"params": lora_params, "lr": reward_cfg.learning_rate},
        {"params": head_params, "lr": reward_cfg.learning_rate * HEAD_LR_SCALE}], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(fit) / reward_cfg.batch_size)
    total_steps = steps_per_epoch * reward_cfg.epochs
    rng = random.Random(seed)

    # 3. epochs of shuffled minibatches; a pair's chosen and rejected answers share one forward pass
    rm.model.train()  # LoRA dropout is 0 and Llama has no dropout: train mode changes nothing but the flag
    step, train_started = 0, time.perf_counter()
    for epoch in range(reward_cfg.epochs):
        order = list(range(len(fit)))
        rng.shuffle(order)
        for start in range(0, len(order), reward_cfg.batch_size):
            mb = order[start:start + reward_cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            chosen_parts, rejected_parts = [], []
            micro_size = max(1, reward_cfg.micro_batch_size)
            for micro_start in range(0, len(mb), micro_size):   # the activations of a few pairs at a time
                micro = mb[micro_start:micro_start + micro_size]
                rewards = rm.score_ids([chosen_ids[i] for i in micro] + [rejected_ids[i] for i in micro])
                part_chosen, part_rejected = rewards[:len(micro)], rewards[len(micro):]
                (bradley_terry_loss(part_chosen, part_rejected) * len(micro) / len(mb)).backward()  # sums to the mean
                chosen_parts.append(part_chosen.detach())
                rejected_parts.append(part_rejected.detach())
            mb_chosen, mb_rejected = torch.cat(chosen_parts), torch.cat(rejected_parts)
            loss = bradley_terry_loss(mb_chosen, mb_rejected)
            torch.nn.utils.clip_grad_norm_(lora_params + head_params, MAX_GRAD_NORM)
            optimizer.step()
            step += 1
            mb_accuracy = (mb_chosen > mb_rejected).float().mean().item()
            if progress:      # every step (tens of seconds each on CPU): the operator page follows along
                progress({"stage": "reward", "step": step, "steps": total_steps, "rm/loss": loss.item(),
                          "rm/batch_accuracy": mb_accuracy})
            elif step % PROGRESS_EVERY == 0 or step == total_steps:
                print(f"rm step {step}/{total_steps} epoch {epoch + 1} loss {loss.item():.4f} "
                      f"acc {mb_accuracy:.2f}", flush=True)
    train_s = time.perf_counter() - train_started

    rm.trained_on.update(p["comparison_id"] for p in fit if p.get("comparison_id") is not None)

    # 4. metrics: held-out pairs decide; training accuracy (on this run's pairs) shows whether it fits at all
    rm.model.eval()
    fitted = evaluate_pairs(rm, fit)
    held = evaluate_pairs(rm, heldout) if heldout else {"accuracy": None, "loss": None, "margin": None}
    metrics = {"rm/accuracy": held["accuracy"], "rm/loss": held["loss"], "rm/margin": held["margin"],
               "rm/train_accuracy": fitted["accuracy"], "rm/train_loss": fitted["loss"],
               "rm/train_pairs": len(fit), "rm/new_pairs": len(new), "rm/replayed_pairs": len(fit) - len(new),
               "rm/heldout_pairs": len(heldout), "rm/tokenized_pairs": rm.tokenized,
               "time/reward_encode_s": encode_s, "time/reward_train_s": train_s,
               "time/reward_s": time.perf_counter() - started,
               "rm/pairs_per_s": len(fit) * reward_cfg.epochs / max(train_s, 1e-9)}
    if progress and held["accuracy"] is not None:   # shown beside PPO's figures while the run goes on
        progress({"rm/accuracy": held["accuracy"]})
    accuracy = "n/a" if held["accuracy"] is None else f"{held['accuracy']:.3f}"
    print(f"rm done: heldout acc {accuracy} on {len(heldout)} pairs, train acc {fitted['accuracy']:.3f} "
          f"on {len(fit)} ({len(new)} new), tokenised {rm.tokenized}, {metrics['time/reward_s']:.1f} s", flush=True)
    return rm, metrics
