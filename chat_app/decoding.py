"""The decode loop shared by serving and PPO rollouts: continuous batching over one KV cache.

Rows join between steps (their prompts are prefilled, then their cache is merged in, left-padded) and leave as
soon as they end, so a new user never waits for another's answer to finish, and finished rows cost nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

TOP_K = 50  # sample among the 50 likeliest tokens first: a full sort of a 49k vocabulary per step costs more


def left_pad(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (batch, longest prompt), left-padded."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                  generators: list[torch.Generator], top_k: int = TOP_K) -> torch.Tensor:
    """One token per row from logits (batch, vocab), each row with its own temperature, top-p and generator.

    `top_k=0` samples from the whole vocabulary (PPO rollouts: their logprobs are over all of it).
    """
    greedy = temperature <= 0
    k = logits.shape[-1] if top_k <= 0 else min(top_k, logits.shape[-1])
    if k == logits.shape[-1] and bool((top_p >= 1).all()):
        top_logits, top_ids = logits.float(), None                  # nothing cut: no sort needed
    else:
        top_logits, top_ids = logits.float().topk(k, dim=-1)        # (batch, k), sorted
    probs = torch.softmax(top_logits / temperature.clamp(min=1e-5)[:, None], dim=-1)
    if top_ids is not None:
        outside_p = probs.cumsum(-1) - probs > top_p[:, None]       # keep the smallest set reaching top_p
        probs = probs.masked_fill(outside_p, 0.0)
    # inverse-CDF sampling: one uniform per row from that row's generator, then a vectorised search of the
    # cumulative distribution (torch.multinomial per row cost 1.8 ms a row over the whole 49k vocabulary)
    cdf = probs.double().cumsum(-1)
    uniforms = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    choice = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(1)
    choice = choice.clamp(max=probs.shape[-1] - 1)
    if top_ids is None:
        return torch.where(greedy, logits.argmax(-1), choice)
    choice = torch.where(greedy, torch.zeros_like(choice), choice)
    return top_ids.gather(1, choice[:, None]).squeeze(1)


@dataclass
class Row:
    """One answer being sampled."""
    key: object
    """Whatever the caller uses to find its answer again (the engine: (request, answer index))."""
    max_new_tokens: int
    temperature: float
    top_p: float
    generator: torch.Generator
    ignore_eos: bool = False
    tokens: list[int] = field(default_factory=list)
    ended_with_eos: bool = False
    adapter: str | None = None
    """In a batch mixing versions over one PEFT model: this row's LoRA adapter ("__base__": none); else None."""


def adapter_kwargs(adapters: list[str | None]) -> dict:
    """PEFT's mixed-adapter batches: `adapter_names=` one per row where the rows name their adapters, else nothing
    (a plain or merged model takes no such argument)."""
    return {"adapter_names": list(adapters)} if adapters and adapters[0] is not None else {}


def _pad_left(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class DecodeBatch:
    """Rows sampled together: `add` rows at any step boundary, `step` samples one token for every row."""

    def __init__(self, model, eos_id: int, pad_id: int, top_k: int = TOP_K):
        self.model, self.eos_id, self.pad_id, self.top_k = model, eos_id, pad_id, top_k
        self.device = next(model.parameters()).device
        self.rows: list[Row] = []
        self.cache = None                  # the model's KV cache, batch dimension in `rows` order
        self.mask: torch.Tensor | None = None       # (rows, columns) 1 on real tokens
        self.position: torch.Tensor | None = None   # (rows, 1) position of each row's last token
        self.logits: torch.Tensor | None = None     # (rows, vocab) the next token's logits
        self.prefills = 0

    def __len__(self) -> int:
        return len(self.rows)

    def clear(self) -> None:
        """No rows: the next `add` starts a fresh cache."""
        self.rows = []
        self.cache = self.mask = self.position = self.logits = None

    @torch.no_grad()
    def add(self, prompts: list[list[int]], rows: list[Row]) -> None:
        """Prefill the new rows' prompts and merge their cache into the batch's (left-padded to one width).

        A prompt shared by several rows (the two answers of a pair) is prefilled once and its cache copied:
        prefill is compute-bound on CPU, so this halves the time to the first token. Rows that read different
        adapters (two versions in one batch) do not share a prompt's cache: it depends on the adapter.
        """
        distinct: dict[tuple, int] = {}                       # (prompt, adapter) -> its row in the prefill
        source = [distinct.setdefault((tuple(p), r.adapter), len(distinct)) for p, r in zip(prompts, rows)]
        ids, mask = left_pad([list(p) for p, _ in distinct], self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **adapter_kwargs([adapter for _, adapter in distinct]))
        self.prefills += 1
        logits, position = out.logits[:, -1].float(), positions[:, -1:]
        if len(distinct) < len(prompts):                      # one cache row per answer row
            rows_of = torch.tensor(source, device=self.device)
            logits, position, mask = logits[rows_of], position[rows_of], mask[rows_of]
            for layer in out.past_key_values.layers:
                layer.keys, layer.values = layer.keys[rows_of], layer.values[rows_of]
        if not self.rows:
            self.cache, self.mask, self.position, self.logits = out.past_key_values, mask, position, logits
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for old, new in zip(self.cache.layers, out.past_key_values.layers):   # (rows, heads, columns, dim)
                old.keys = torch.cat([_pad_left(old.keys, width, 2), _pad_left(new.keys, width, 2)])
                old.values = torch.cat([_pad_left(old.values, width, 2), _pad_left(new.values, width, 2)])
            self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(mask, width, 1)])
            self.position = torch.cat([self.position, position])
            self.logits = torch.cat([self.logits, logits])
        self.rows += rows

    @torch.no_grad()
    def step(self) -> tuple[list[tuple[Row, int | None]], list[Row]]:
        """Sample one token per row; returns ([(row, token or None at EOS)], rows that ended this step)."""
        rows, logits = self.rows, self.logits
        no_eos = torch.tensor([r.ignore_eos for r in rows], device=self.device)
        if bool(no_eos.any()):
            logits[no_eos, self.eos_id] = float("-inf")
        temperature = torch.tensor([r.temperature for r in rows], device=self.device)
        top_p = torch.tensor([r.top_p for r in rows], device=self.device)
        tokens = sample_tokens(logits, temperature, top_p, [r.generator for r in rows], self.top_k)
        emitted, ended, keep = [], [], []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if token == self.eos_id:
                row.ended_with_eos = True
                emitted.append((row, None))
            else:
                row.tokens.append(token)
                emitted.append((row, token))
            if row.ended_with_eos or len(row.tokens) >= row.max_new_tokens:
                ended.append(row)
            else:
                keep.append(i)
        self._keep(keep)
        if self.rows:
            index = torch.tensor(keep, device=self.device)
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=1)
            self.position = self.position + 1
            out = self.model(input_ids=tokens[index][:, None], attention_mask=self.mask, position_ids=self.position,
                             past_key_values=self.cache, use_cache=True,
                             **adapter_kwargs([r.adapter for r in self.rows]))
            self.cache, self.logits = out.past_key_values, out.logits[:, -1].float()
        return emitted, ended

    def _keep(self, keep: list[int]) -> None:
        """Drop the rows that ended, and the cache columns no remaining row uses."""
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.clear()
            return
        self.rows = [self.rows[i] for i in keep]
        index = torch.tensor(keep, device=self.device)
        self.mask, self.position, self.logits = self.mask[index], self.position[index], self.logits[index]
        first = int(self.mask.argmax(dim=1).min())          # the oldest column a remaining row still reads
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[index, :, first:], layer.values[index, :, first:]


def decode(model, prompts: list[list[int]], *, max_new_tokens: list[int], temperature: list[float],
           top_p: list[float], seeds: list[int], eos_id: int, pad_id: int, ignore_eos: list[bool] | None = None,
           top_k: int = TOP_K) -> tuple[list[list[int]], list[bool]]:
    """Sample answers for a batch of prompts; returns (token ids per row without EOS, ended_with_eos per row)."""
    rows = [Row(key=i, max_new_tokens=max_new_tokens[i], temperature=temperature[i], top_p=top_p[i],
                generator=torch.Generator().manual_seed(int(seeds[i])),
                ignore_eos=bool(ignore_eos[i]) if ignore_eos else False) for i in range(len(prompts))]
    batch = DecodeBatch(model, eos_id, pad_id, top_k)
    batch.add(prompts, rows)
    while len(batch):
        batch.step()
    return [r.tokens for r in rows], [r.ended_with_eos for r in rows]
