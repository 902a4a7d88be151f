"""PPO on a LoRA policy: rollouts with the serving decode loop, KL-penalised rewards, GAE, clipped updates.

The reference policy is the same weights with the adapter disabled, so there is one copy of the model.
Sources in brackets: [37 details] Huang et al., "The 37 Implementation Details of PPO" (2022);
[N details] Huang et al., "The N Implementation Details of RLHF with PPO" (2023); [N+ details] Huang et al.,
"The N+ Implementation Details of RLHF with PPO: TL;DR summarization" (2024); [InstructGPT] Ouyang et al. 2022;
[Ziegler et al. 2019] "Fine-Tuning Language Models from Human Preferences"; [GAE] Schulman et al. 2016.
"""
from __future__ import annotations

import itertools
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from chat_app.chat import encode_prompt
from chat_app.config import LoraConfig, PPOConfig
from chat_app.decoding import decode, left_pad
from chat_app.packed import policy_copy
from trainer import distributed
from trainer.frozen_layers import frozen_layer_count, lower_hidden, positions, upper_forward

VALUE_HEAD_FILE = "value_head.safetensors"


# -- pure tensor functions --------------------------------------------------------------------
def logprobs_from_logits(logits: Tensor, tokens: Tensor) -> Tensor:
    """log π(token) at each position; logits (batch, T, vocab), tokens (batch, T) -> (batch, T)."""
    logits = logits.float()
    # gather minus logsumexp: the same as log_softmax, without a second (batch, T, vocab) tensor
    return logits.gather(-1, tokens[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def token_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(π‖π_ref) between the two next-token distributions at each position, over the whole vocabulary; logits
    (..., vocab) already tempered -> (...). Summed over an answer's positions it has the same expectation as the
    sampled log-ratio Σ log π(y_t)/π_ref(y_t) (the KL of the answers), with less spread: it averages over every token
    the policy could have chosen at each step, not only the one it chose."""
    logp, logq = torch.log_softmax(logits.float(), -1), torch.log_softmax(ref_logits.float(), -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def response_mask(response_lengths: Tensor, resp_len: int) -> Tensor:
    """(batch, resp_len) bool, True on real answer tokens (the final EOS included)."""
    positions = torch.arange(resp_len, device=response_lengths.device)
    return positions[None, :] < response_lengths[:, None]  # from lengths, never token == pad, as pad == eos


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` where `mask` is true (a scalar)."""
    return (values * mask).sum() / mask.sum().clamp(min=1)


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """`values` scaled to unit variance (and zero mean when `shift_mean`) over the masked entries; 0 elsewhere."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)              # population variance of the real tokens
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def compute_rewards(scores: Tensor, logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor,
                    response_lengths: Tensor, kl_coef: float) -> tuple[Tensor, Tensor]:
    """(rewards, kl), both (batch, resp_len): -β·KL on every token plus the score (batch,) on the last real one."""
    kl = (logprobs - ref_logprobs) * mask                       # per-token KL to the base (adapter disabled)
    rewards = -kl_coef * kl                                     # KL penalty on every token [Ziegler et al. 2019]
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, response_lengths - 1] += scores               # RM score on the last real token (lengths >= 1)
    return rewards, kl


def prompt_baseline(scores: Tensor, prompt_ids: Tensor) -> Tensor:
    """scores (batch,) minus the mean score of the other answers to the same prompt (leave-one-out); a prompt
    answered once keeps its score. The reward model is a Bradley-Terry fit: only differences between answers to
    the same prompt are what the votes taught it, and a term that depends on the prompt alone leaves the best
    policy unchanged while removing the variance of "this prompt scores high" [Kool et al. 2019; RLOO]."""
    same = prompt_ids[:, None] == prompt_ids[None, :]             # (batch, batch) answers to one prompt
    others = same.sum(1) - 1                                      # (batch,) other answers to the same prompt
    others_sum = (same.float() @ scores) - scores
    return torch.where(others > 0, scores - others_sum / others.clamp(min=1), scores)


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """(advantages, returns), both (batch, resp_len), by generalised advantage estimation [GAE]."""
    rewards, values = rewards * mask, values * mask             # nothing after the last real token: the episode ended
    advantages = torch.zeros_like(rewards)                      # (batch, resp_len)
    last_advantage = torch.zeros_like(rewards[:, 0])            # (batch,)
    resp_len = rewards.shape[1]
    for t in reversed(range(resp_len)):                         # backwards in time, all rows at once
        next_values = values[:, t + 1] if t + 1 < resp_len else torch.zeros_like(values[:, t])
        delta = rewards[:, t] + gamma * next_values - values[:, t]      # TD error
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    returns = advantages + values                               # the value function's targets
    return advantages * mask, returns * mask


def policy_loss(new_logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                clip_range: float) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, clipfrac, approx_kl): PPO's clipped surrogate over the masked tokens; inputs (batch, resp_len)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = torch.exp(log_ratio)                                # (batch, resp_len) π_new / π_old
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.max(losses, losses_clipped), mask)            # the pessimistic bound [PPO]
    with torch.no_grad():
        clipfrac = masked_mean((losses_clipped > losses).float(), mask)   # share of tokens the clip held back
        approx_kl = masked_mean((ratio - 1) - log_ratio, mask)            # k3 estimator of KL(old‖new) [37 details]
    return loss, clipfrac, approx_kl


def value_loss(new_values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               clip_range_value: float) -> tuple[Tensor, Tensor]:
    """(loss, vf_clipfrac): clipped squared error of the values [37 details: value clipping]; inputs (batch, resp_len)."""
    values_clipped = old_values + torch.clamp(new_values - old_values, -clip_range_value, clip_range_value)
    losses = (new_values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(losses, losses_clipped), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, vf_clipfrac


class RunningMoments:
    """Mean and std of every score seen so far, merged batch by batch (Chan et al.'s parallel variance)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 0.0, 0

    def update(self, values: Tensor) -> None:
        n, batch_mean, batch_var = values.numel(), values.mean().item(), values.var(unbiased=False).item()
        delta, total = batch_mean - self.mean, self.count + n
        self.var = (self.var * self.count + batch_var * n + delta ** 2 * self.count * n / total) / total
        self.mean, self.count = self.mean + delta * n / total, total

    @property
    def std(self) -> float:
        return self.var ** 0.5


class AdaptiveKLController:
    """β that follows a KL target: β ← β·(1 + clip(KL/target − 1, ±0.2)·n/horizon) [Ziegler et al. 2019].

    With a fixed β the KL a cycle reaches depends on the reward's scale and the number of steps; a target keeps
    the policy near the KL the operator chose, and lets it move fast while it is far below."""

    def __init__(self, kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = kl_coef, target, horizon

    def update(self, kl: float, n_steps: int) -> None:
        if self.target <= 0:                                    # no target: β stays as configured
            return
        error = max(-0.2, min(0.2, kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon


# -- the model side: LoRA policy, value head, one batched forward ---------------------------------
class ValueHead(nn.Module):
    """V(state) per token: a Linear on the policy's last hidden state, (batch, T, hidden) -> (batch, T)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)                      # V = 0 at the start: no random baseline
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        return self.linear(hidden_states.float()).squeeze(-1)   # fp32 head even over a bf16 policy


def make_policy(base_model, lora_cfg: LoraConfig, init_adapter: str | None = None):
    """A trainable PeftModel over `base_model` (modified in place): a new LoRA adapter, or `init_adapter` to warm-start."""
    from peft import LoraConfig as PeftLoraConfig, PeftModel, get_peft_model

    if init_adapter:
        policy = PeftModel.from_pretrained(base_model, init_adapter, is_trainable=True)
    else:
        layers = base_model.config.num_hidden_layers
        first = layers - max(1, round(layers * lora_cfg.layer_fraction))
        peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                  target_modules=list(lora_cfg.target_modules), task_type="CAUSAL_LM",
                                  layers_to_transform=list(range(first, layers)) if first > 0 else None)
        policy = get_peft_model(base_model, peft_cfg)
    policy.eval()                                               # no dropout anywhere; gradients still flow [N+ details]
    return policy


def save_policy(policy, value_head: ValueHead, folder: str | Path) -> Path:
    """Write the adapter (PEFT `save_pretrained`) and `value_head.safetensors` into `folder`; returns it."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    policy.save_pretrained(folder)
    save_file({k: v.detach().cpu().contiguous() for k, v in value_head.state_dict().items()}, folder / VALUE_HEAD_FILE)
    return folder


def load_value_head(folder: str | Path, hidden_size: int, device="cpu") -> ValueHead | None:
    """The value head saved beside an adapter by `save_policy`; None when the folder has none (e.g. an SFT adapter)."""
    from safetensors.torch import load_file

    path = Path(folder) / VALUE_HEAD_FILE
    if not path.exists():
        return None
    value_head = ValueHead(hidden_size)
    value_head.load_state_dict(load_file(str(path)))
    return value_head.to(device)


def forward_logits_values(policy, value_head: ValueHead | None, query_response_ids: Tensor, attention_mask: Tensor,
                          context_length: int, temperature: float = 1.0, lower: Tensor | None = None,
                          lower_layers: int = 0) -> tuple[Tensor, Tensor | None]:
    """(logits / temperature, values) at the response positions: (batch, resp_len, vocab) and (batch, resp_len), the
    values None without a head; position t holds the distribution of response token t.

    Rows are left-padded prompts of width `context_length` followed by right-padded responses. `lower` is the output
    of the first `lower_layers` decoder layers for these rows (trainer/frozen_layers.py): only the layers above run.
    """
    resp_len = query_response_ids.shape[1] - context_length
    if lower is not None:                                          # the frozen lower layers ran once already
        hidden, lm_head = upper_forward(policy, lower, attention_mask, lower_layers)
        hidden = hidden[:, context_length - 1:-1]                  # (batch, resp_len, hidden): state before each token
        logits = lm_head(hidden)
    else:
        out = policy(input_ids=query_response_ids, attention_mask=attention_mask,
                     position_ids=positions(attention_mask), output_hidden_states=value_head is not None, use_cache=False,
                     logits_to_keep=resp_len + 1)                  # no logits over the prompt: the vocab is large
        logits = out.logits[:, :-1]                                # (batch, resp_len, vocab); position t predicts t+1
        hidden = out.hidden_states[-1][:, context_length - 1:-1] if value_head is not None else None
    return logits / temperature, (value_head(hidden) if value_head is not None else None)   # V of the state before


def forward_logprobs_values(policy, value_head: ValueHead | None, query_response_ids: Tensor, attention_mask: Tensor,
                            context_length: int, temperature: float = 1.0, lower: Tensor | None = None,
                            lower_layers: int = 0) -> tuple[Tensor, Tensor | None]:
    """(logprobs, values) of the response tokens, both (batch, resp_len); values None without a head
    (`forward_logits_values`'s arguments)."""
    logits, values = forward_logits_values(policy, value_head, query_response_ids, attention_mask, context_length,
                                           temperature, lower, lower_layers)
    return logprobs_from_logits(logits, query_response_ids[:, context_length:]), values


def pack_query_response(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device) -> dict:
    """Left-padded prompts followed by right-padded responses: query_response and attention_mask
    (batch, context_length + resp_len), context_length, response_lengths (batch,)."""
    response_lengths = torch.tensor([len(r) for r in responses], device=device)  # (batch,)
    resp_len = int(response_lengths.max())
    query, query_mask = left_pad(prompts, pad_id, device)         # (batch, context_length)
    response_ids = torch.full((len(responses), resp_len), pad_id, dtype=torch.long)
    for row, response in enumerate(responses):
        response_ids[row, :len(response)] = torch.tensor(response, dtype=torch.long)
    mask = response_mask(response_lengths, resp_len)              # (batch, resp_len); from lengths, pad == eos
    return {"query_response": torch.cat([query, response_ids.to(device)], dim=1),
            "attention_mask": torch.cat([query_mask, mask.long()], dim=1),
            "context_length": query.shape[1], "response_lengths": response_lengths}


# -- rollout and experience -----------------------------------------------------------------------
@torch.no_grad()
def rollout(policy, tokenizer, prompts: list[list[int]], cfg: PPOConfig, seed: int,
            served: list[dict] | None = None) -> dict:
    """One sampled answer per prompt row with the serving decode loop, then the `served` rows (answers users were
    shown, from `served_rows`) after them; tensors on the policy's device.

    Returns query_response (batch, context_length + resp_len), attention_mask (same), context_length,
    response_lengths (batch,) counting the EOS when there is one, ended_with_eos (batch,), texts.
    """
    device, batch = next(policy.parameters()).device, len(prompts)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    sampler = (policy_copy(policy) if cfg.fast_rollouts else None) or policy   # CPU: the packed serving path
    mine = distributed.row_share(list(range(batch)))            # data parallel: this process samples rows rank::world
    answers, ended = decode(sampler, [prompts[row] for row in mine], max_new_tokens=[cfg.response_length] * len(mine),
                            temperature=[cfg.temperature] * len(mine), top_p=[1.0] * len(mine),
                            seeds=[seed + row for row in mine], eos_id=eos_id, pad_id=pad_id,
                            top_k=cfg.top_k)              # 0: the whole vocabulary, as the logprobs below assume
    answers, ended = distributed.gather_rows(answers, batch), distributed.gather_rows(ended, batch)  # all, everywhere
    texts = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    for row in served or []:                                    # already sampled when users were served: free rows
        prompts, answers = prompts + [row["prompt_ids"]], answers + [row["answer_ids"]]
        ended, texts = ended + [row["ended_with_eos"]], texts + [row["text"]]
    responses = [a + [eos_id] if e else a for a, e in zip(answers, ended)]  # EOS is an action: it gets trained too
    return {**pack_query_response(prompts, responses, pad_id, device),
            "ended_with_eos": torch.tensor(ended, device=device), "texts": texts}


def served_rows(tokenizer, pairs: list[dict], max_prompt_tokens: int, response_length: int) -> list[dict]:
    """Both answers of each voted pair as rollout rows: prompt_messages, prompt_ids, answer_ids (the text tokenised
    again, at most `response_length`), ended_with_eos, text, and `pair` (its index: the two answers share a prompt
    baseline)."""
    rows = []
    for index, pair in enumerate(pairs):
        prompt_ids = encode_prompt(tokenizer, pair["prompt_messages"], max_prompt_tokens)[0]
        for side in ("chosen", "rejected"):
            answer_ids = tokenizer(pair[side], add_special_tokens=False)["input_ids"][:response_length]
            ended = bool(pair["ended_with_eos"][side]) and len(answer_ids) < response_length
            rows.append({"prompt_messages": pair["prompt_messages"], "prompt_ids": prompt_ids, "answer_ids": answer_ids,
                         "ended_with_eos": ended, "text": pair[side], "pair": index})
    return rows


@torch.no_grad()
def make_experience(policy, value_head: ValueHead, batch: dict, scores: Tensor, cfg: PPOConfig,
                    score_stats: RunningMoments | None = None, kl_coef: float | None = None) -> dict:
    """Add old logprobs, ref logprobs, values, rewards, kl, advantages and returns (batch, resp_len) to `batch`, and
    exact_kl (batch, resp_len): `token_kl` at each answer position, what the cycle measures its KL to the base by
    (the reward's penalty stays the sampled log-ratio `kl` [Ziegler et al. 2019])."""
    ids, attn, ctx = batch["query_response"], batch["attention_mask"], batch["context_length"]
    chunks = [slice(i, i + cfg.minibatch_size) for i in range(0, len(ids), cfg.minibatch_size)]  # bounds memory
    frozen = frozen_layer_count(policy) if cfg.cache_frozen_layers else 0
    lowers = [lower_hidden(policy, ids[c], attn[c], frozen) for c in chunks]   # the same with or without the adapter
    if any(lower is None for lower in lowers):
        lowers, frozen = [None] * len(chunks), 0
    parts: dict[str, list[Tensor]] = {"logprobs": [], "values": [], "ref_logprobs": [], "token_kl": []}
    for c, lower in zip(chunks, lowers):                        # a chunk's two distributions side by side
        targets = ids[c][:, ctx:]
        logits, values = forward_logits_values(policy, value_head, ids[c], attn[c], ctx, cfg.temperature, lower, frozen)
        with policy.disable_adapter():                          # the reference: same weights, no adapter
            ref_logits, _ = forward_logits_values(policy, None, ids[c], attn[c], ctx, cfg.temperature, lower, frozen)
        for key, value in (("logprobs", logprobs_from_logits(logits, targets)), ("values", values),
                           ("ref_logprobs", logprobs_from_logits(ref_logits, targets)),
                           ("token_kl", token_kl(logits, ref_logits))):
            parts[key].append(value)
        del logits, ref_logits                                  # (chunk, resp_len, vocab) each: free before the next
    logprobs, values, ref_logprobs = (torch.cat(parts[k]) for k in ("logprobs", "values", "ref_logprobs"))
    mask = response_mask(batch["response_lengths"], logprobs.shape[1])
    exact_kl = torch.cat(parts["token_kl"]) * mask              # (batch, resp_len) the per-position KL, measured
    scores = scores.to(logprobs.device).float()                 # (batch,)
    if cfg.normalize_reward and score_stats is not None:       # scale by the running std of scores [37 details]
        score_stats.update(scores)
        scores = scores / score_stats.std if score_stats.std > 1e-6 else scores  # all equal so far: leave them
    if cfg.penalize_no_eos:                                     # cut-off answers lose [N+ details]
        scores = scores - cfg.no_eos_penalty * (~batch["ended_with_eos"]).float()
    beta = cfg.kl_coef if kl_coef is None else kl_coef          # the adaptive controller's β when there is one
    rewards, kl = compute_rewards(scores, logprobs, ref_logprobs, mask, batch["response_lengths"], beta)
    advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.gae_lambda)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)            # advantage normalisation [37 details]
    return {**batch, "logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "mask": mask,
            "rewards": rewards, "kl": kl, "exact_kl": exact_kl, "advantages": advantages, "returns": returns,
            "lower": torch.cat(lowers) if frozen else None, "lower_layers": frozen}   # (batch, T, hidden) or None


# -- the update ----------------------------------------------------------------------------------
def ppo_step(policy, value_head: ValueHead, optimizer: torch.optim.Optimizer, exp: dict, cfg: PPOConfig,
             generator: torch.Generator | None = None, ptx_loss: Callable[[], Tensor] | None = None,
             pace: Callable[[], object] | None = None) -> dict:
    """Epochs of shuffled minibatches over one experience batch; returns the mean losses and diagnostics.

    Data parallel (trainer/distributed.py): every process holds the whole batch and draws the same minibatches,
    computes its rows' share of each, and all step with the summed gradient, so the update is one process's. The
    PPO-ptx term is the same on every process and the token shares sum to 1: the sum counts it once. `pace` is
    called before each minibatch (trainer/threads.py: the thread budget follows the server's load)."""
    params = [p for p in itertools.chain(policy.parameters(), value_head.parameters()) if p.requires_grad]
    batch_size, ctx = len(exp["query_response"]), exp["context_length"]
    stats: dict[str, list[float]] = {k: [] for k in ("loss", "policy_loss", "value_loss", "clipfrac",
                                                     "vf_clipfrac", "approx_kl", "ptx_loss")}
    epochs_run = 0
    for _ in range(cfg.epochs):
        epoch_kl = []
        order = torch.randperm(batch_size, generator=generator).to(exp["query_response"].device)
        for start in range(0, batch_size, cfg.minibatch_size):
            if pace is not None:
                pace()
            mb = distributed.row_share(order[start:start + cfg.minibatch_size])   # this process's rows of the minibatch
            lower = exp["lower"][mb] if exp.get("lower") is not None else None   # frozen layers: computed once
            new_logprobs, new_values = forward_logprobs_values(
                policy, value_head, exp["query_response"][mb], exp["attention_mask"][mb], ctx, cfg.temperature,
                lower, exp.get("lower_layers", 0))
            mb_mask = exp["mask"][mb]
            share = mb_mask.sum() / distributed.all_sum(mb_mask.sum())  # of the minibatch's tokens; 1 in one process
            pg_loss, clipfrac, approx_kl = policy_loss(new_logprobs, exp["logprobs"][mb], exp["advantages"][mb],
                                                       mb_mask, cfg.clip_range)
            vf_loss, vf_clipfrac = value_loss(new_values, exp["values"][mb], exp["returns"][mb], mb_mask,
                                              cfg.clip_range_value)
            loss = pg_loss + cfg.value_coef * vf_loss
            if ptx_loss is not None and cfg.ptx_coef > 0:       # PPO-ptx: keep the demonstrations likely [InstructGPT]
                mb_ptx_loss = ptx_loss()
                loss = loss + cfg.ptx_coef * mb_ptx_loss
                stats["ptx_loss"].append(mb_ptx_loss.item())
            optimizer.zero_grad(set_to_none=True)
            (share * loss).backward()                           # masked means as global token sum / global count
            distributed.sum_gradients(params)                   # the whole minibatch's gradient, on every process
            nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)  # global grad-norm clipping [37 details]
            optimizer.step()
            for key, value in (("loss", loss), ("policy_loss", pg_loss), ("value_loss", vf_loss),
                               ("clipfrac", clipfrac), ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl)):
                stats[key].append(distributed.all_sum(share * value.detach()).item())   # the whole minibatch's
            epoch_kl.append(stats["approx_kl"][-1])
        epochs_run += 1
        if cfg.target_kl > 0 and sum(epoch_kl) / len(epoch_kl) > cfg.target_kl:
            break                                               # early stop: the policy moved enough [37 details]
    metrics = {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items() if v}
    metrics["ppo/epochs"] = epochs_run
    return metrics


def _served_pair_cycle(served: list[dict] | None, per_iteration: int, seed: int):
    """Endless slices of `per_iteration` voted pairs (each the list of its two rows), shuffled, then again; empty
    slices when there are none or `per_iteration` is 0."""
    pairs = {}
    for row in served or []:
        pairs.setdefault(row["pair"], []).append(row)
    pairs = list(pairs.values())
    if not pairs or per_iteration <= 0:
        return itertools.repeat([])
    random.Random(seed + 1).shuffle(pairs)                      # its own generator: the prompt picks stay as they were
    size = min(per_iteration, len(pairs))
    return ([pairs[(start + i) % len(pairs)] for i in range(size)] for start in itertools.count(0, size))


def train_ppo(policy, value_head: ValueHead, tokenizer, prompts_messages: list[list[dict]],
              reward_fn: Callable[[list[list[dict]], list[str]], Tensor], cfg: PPOConfig,
              progress: Callable[[dict], None] | None = None,
              ptx_batches: tuple[list[dict], Callable[[list[dict]], Tensor]] | None = None,
              *, seed: int = 0, max_context_tokens: int = 2048, pace: Callable[[], object] | None = None,
              served: list[dict] | None = None) -> dict:
    """Run cfg.iterations PPO iterations on the prompts; returns the last iteration's metrics plus time totals.

    Args:
        reward_fn: (prompt messages per row, answer texts) -> scores (batch,), higher is better.
        ptx_batches: (demonstrations, loss_fn) for PPO-ptx: each minibatch adds cfg.ptx_coef · loss_fn(a shuffled
            slice of minibatch_size demonstrations), e.g. trainer.sft.sft_loss. Used when cfg.ptx_coef > 0.
        pace: called before each rollout, experience and minibatch (trainer/threads.py: borrow the idle server's core).
        served: rows of voted answer pairs (`served_rows`); each iteration adds cfg.served_pairs of them, cycled.
    """
    pace = pace or (lambda: None)
    if not prompts_messages or cfg.temperature <= 0:
        raise ValueError("PPO needs at least one prompt and a sampling temperature > 0")
    device = next(policy.parameters()).device
    value_head.to(device)
    policy.eval()                                               # dropout off for rollouts and losses alike
    max_prompt_tokens = max(max_context_tokens - cfg.response_length, 16)
    prompt_ids = [encode_prompt(tokenizer, m, max_prompt_tokens)[0] for m in prompts_messages]
    params = [p for p in itertools.chain(policy.parameters(), value_head.parameters()) if p.requires_grad]
    distributed.broadcast_from_main(params)                     # data parallel: every process starts from rank 0's
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)   # LoRA and value head only
    rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
    score_stats = RunningMoments()
    ptx_loss = None
    if ptx_batches is not None and ptx_batches[0]:             # PPO-ptx: demonstrations in shuffled slices, cycled
        demos, demo_loss_fn = ptx_batches
        demos = rng.sample(demos, len(demos))
        slices = itertools.cycle([demos[i:i + cfg.minibatch_size] for i in range(0, len(demos), cfg.minibatch_size)])
        ptx_loss = lambda: demo_loss_fn(next(slices))           # noqa: E731
    metrics: dict = {"time/rollout_s": 0.0, "time/update_s": 0.0}
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    served_pairs = _served_pair_cycle(served, cfg.served_pairs, seed)
    loop_started = time.perf_counter()
    before_update = None                                        # the trainable weights before the last update
    kept = 0                                                    # updates made and not undone
    for iteration in range(cfg.iterations):
        if cfg.max_minutes > 0 and iteration > 0:                # the cycle's budget: an iteration costs about the last
            spent = time.perf_counter() - loop_started
            if distributed.broadcast_object(spent + spent / iteration > cfg.max_minutes * 60):  # rank 0's clock rules
                print(f"ppo: stopping after {iteration} iterations, {spent:.0f} s of a {cfg.max_minutes:g} min budget",
                      flush=True)
                break
        # 1. rollout: pick prompts, answer each samples_per_prompt times, score the answers
        started = time.perf_counter()
        pace()
        many = len(prompt_ids) >= cfg.rollout_prompts
        picks = rng.sample(range(len(prompt_ids)), cfg.rollout_prompts) if many else \
            rng.choices(range(len(prompt_ids)), k=cfg.rollout_prompts)
        rows = [i for i in picks for _ in range(cfg.samples_per_prompt)]
        extra = [row for pair in next(served_pairs) for row in pair]   # answers users saw: no sampling needed
        batch = rollout(policy, tokenizer, [prompt_ids[i] for i in rows], cfg, seed=seed * 1_000_003 + iteration * 1000,
                        served=extra)
        generated = time.perf_counter()
        messages = [prompts_messages[i] for i in rows] + [row["prompt_messages"] for row in extra]
        all_scores = torch.as_tensor(reward_fn(messages, batch["texts"])).detach().float()
        groups = torch.tensor(rows + [len(prompt_ids) + row["pair"] for row in extra])   # a pair shares its prompt
        scores = prompt_baseline(all_scores, groups) if cfg.baseline_per_prompt else all_scores
        fresh = slice(0, len(rows))                             # the policy's own answers: what its metrics describe
        raw_scores = all_scores[fresh]
        scored = time.perf_counter()
        # 2. experience: old and reference logprobs, values, rewards, advantages
        pace()
        exp = make_experience(policy, value_head, batch, scores, cfg, score_stats, kl_coef=kl_ctl.value)
        rollout_kl = exp["exact_kl"][fresh].sum(1).mean().item()   # nats per answer, this policy's own answers
        kl_ctl.update(rollout_kl, len(rows))                    # β for the next batch
        rollout_s = time.perf_counter() - started
        for key, seconds in (("generate", generated - started), ("score", scored - generated),
                             ("experience", started + rollout_s - scored)):
            metrics[f"time/{key}_s"] = metrics.get(f"time/{key}_s", 0.0) + seconds   # the rollout's three parts
        metrics["time/rollout_s"] += rollout_s
        if iteration == 0:
            metrics["objective/kl_initial"] = rollout_kl              # where the cycle started: 0 from the base
        if cfg.kl_budget > 0 and distributed.broadcast_object(rollout_kl >= cfg.kl_budget):   # the cycle's ceiling
            undone = before_update is not None                  # an update since the last check carried it there
            if undone:                                          # back to the policy whose rollouts were within it
                with torch.no_grad():
                    for p, saved in zip(params, before_update):
                        p.copy_(saved)
                kept, before_update = kept - 1, None
                metrics["ppo/updates_undone"] = metrics.get("ppo/updates_undone", 0) + 1
            metrics.update({"objective/kl_over_budget": rollout_kl, "ppo/iterations": kept})
            what = f"the rollouts' KL to the base ({rollout_kl:.1f} nats) reached ppo.kl_budget ({cfg.kl_budget:g})"
            if not undone or metrics["ppo/updates_undone"] > cfg.kl_backtracks:   # no update to undo: at the ceiling
                print(f"ppo: stopping at iteration {iteration + 1}: {what}"
                      f"{'; the last update undone' if undone else ''}", flush=True)
                metrics["ppo/stopped_by_kl_budget"] = 1.0
                break
            for group in optimizer.param_groups:                # a shorter step from the policy within the ceiling
                group["lr"] *= 0.5
            metrics["ppo/learning_rate_final"] = optimizer.param_groups[0]["lr"]
            print(f"ppo: iteration {iteration + 1}: {what}; the last update undone, going on at step "
                  f"{optimizer.param_groups[0]['lr']:.2g}", flush=True)
            continue
        if cfg.kl_budget > 0:                                   # what the ceiling restores (LoRA + value head: small)
            before_update = [p.detach().clone() for p in params]
        # 3. update: epochs of clipped PPO on shuffled minibatches
        started = time.perf_counter()
        update = ppo_step(policy, value_head, optimizer, exp, cfg, generator, ptx_loss, pace)
        kept += 1
        update_s = time.perf_counter() - started
        metrics["time/update_s"] += update_s
        metrics.update(update)
        metrics.update({
            "objective/score": raw_scores.mean().item(),
            "objective/kl": rollout_kl, "objective/kl_sampled": exp["kl"][fresh].sum(1).mean().item(),
            "objective/length": exp["response_lengths"][fresh].float().mean().item(),
            "objective/eos_rate": exp["ended_with_eos"][fresh].float().mean().item(),
            "objective/served_rows": len(extra),
            "objective/score_std": raw_scores.std().item() if len(raw_scores) > 1 else 0.0,
            "objective/kl_coef": kl_ctl.value, "ppo/iterations": kept})
        if iteration == 0:
            metrics["objective/score_initial"] = metrics["objective/score"]
        if distributed.is_main():                               # one log line per iteration, not one per process
            print(f"ppo {iteration + 1}/{cfg.iterations}  score {metrics['objective/score']:+.3f}  "
                  f"kl {metrics['objective/kl']:.3f}  len {metrics['objective/length']:.1f}  "
                  f"eos {metrics['objective/eos_rate']:.2f}  loss {metrics['ppo/loss']:+.3f}  "
                  f"approx_kl {metrics['ppo/approx_kl']:.4f}  clipfrac {metrics['ppo/clipfrac']:.3f}  "
                  f"epochs {metrics['ppo/epochs']}  beta {kl_ctl.value:.3f}  ({rollout_s:.1f}s + {update_s:.1f}s)",
                  flush=True)
        if progress is not None:
            progress({"stage": "ppo", "step": iteration + 1, "steps": cfg.iterations,
                      **{k: metrics[k] for k in ("objective/score", "objective/kl", "objective/length", "ppo/loss",
                                                 "ppo/approx_kl", "ppo/clipfrac", "objective/kl_coef")}})
    return metrics

