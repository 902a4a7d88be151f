"""SFT on user-written better answers (demonstrations): next-token loss on the answer tokens only."""
from __future__ import annotations

import random

import torch

from chat_app.chat import encode_prompt


def sft_batch(tokenizer, demos: list[dict], max_prompt_tokens: int, max_answer_tokens: int = 256, device="cpu"):
    """(input_ids, attention_mask, labels) right-padded; labels are -100 outside the answer (+ its EOS)."""
    rows = []
    for demo in demos:
        prompt, _ = encode_prompt(tokenizer, demo["prompt_messages"], max_prompt_tokens)
        answer = tokenizer(demo["answer"], add_special_tokens=False)["input_ids"][:max_answer_tokens]
        rows.append((prompt, answer + [tokenizer.eos_token_id]))
    width = max(len(p) + len(a) for p, a in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        ids[row, :n] = torch.tensor(prompt + answer)
        mask[row, :n] = 1
        labels[row, len(prompt):n] = torch.tensor(answer)   # from lengths: pad == eos, so never by token id
    return ids.to(device), mask.to(device), labels.to(device)


def sft_loss(policy, tokenizer, demos: list[dict], max_prompt_tokens: int) -> torch.Tensor:
    device = next(policy.parameters()).device
    ids, mask, labels = sft_batch(tokenizer, demos, max_prompt_tokens, device=device)
    return policy(input_ids=ids, attention_mask=mask, labels=labels).loss


def train_sft(policy, tokenizer, demos: list[dict], cfg, max_prompt_tokens: int, progress=None, seed: int = 0) -> dict:
    """A few epochs of SFT on the LoRA parameters; returns {"sft/loss", "sft/demonstrations"}."""
    rng = random.Random(seed)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    policy.train()
    losses = []
    steps = cfg.epochs * ((len(demos) + cfg.batch_size - 1) // cfg.batch_size)
    step = 0
    for _ in range(cfg.epochs):
        order = demos[:]
        rng.shuffle(order)
        for start in range(0, len(order), cfg.batch_size):
            loss = sft_loss(policy, tokenizer, order[start:start + cfg.batch_size], max_prompt_tokens)
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss))
            step += 1
            if progress:
                progress({"stage": "sft", "step": step, "steps": steps, "sft/loss": losses[-1]})
    policy.eval()
    return {"sft/loss": sum(losses[-3:]) / len(losses[-3:]), "sft/demonstrations": len(demos)}
