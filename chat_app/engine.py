"""The generation engine: one thread owns the policy model, batches waiting requests, streams tokens, swaps adapters."""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from chat_app.chat import encode_prompt

log = logging.getLogger(__name__)
TOP_K = 50  # sample among the 50 likeliest tokens first: a full sort of a 49k vocabulary per step costs more


# -- the decode loop (used by the engine and by PPO rollouts) ----------------------------------
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
    probs = probs.cpu()
    picks = [torch.multinomial(probs[row], 1, generator=generators[row]) for row in range(len(generators))]
    choice = torch.cat(picks).to(logits.device)
    if top_ids is None:
        return torch.where(greedy, logits.argmax(-1), choice)
    choice = torch.where(greedy, torch.zeros_like(choice), choice)
    return top_ids.gather(1, choice[:, None]).squeeze(1)


@torch.no_grad()
def decode(model, prompts: list[list[int]], *, max_new_tokens: list[int], temperature: list[float],
           top_p: list[float], seeds: list[int], eos_id: int, pad_id: int, ignore_eos: list[bool] | None = None,
           top_k: int = TOP_K, on_step: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> tuple[list[list[int]], list[bool]]:
    """Sample answers for a batch of prompts; returns (token ids per row, ended_with_eos per row).

    Each row stops at EOS or at its own `max_new_tokens`; `on_step(tokens, active)` sees every step.
    Rows with `ignore_eos` never sample EOS (benchmarks use it to decode a fixed length).
    """
    device = next(model.parameters()).device
    batch = len(prompts)
    ids, mask = left_pad(prompts, pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    temps = torch.tensor(temperature, dtype=torch.float32, device=device)
    top_ps = torch.tensor(top_p, dtype=torch.float32, device=device)
    limits = torch.tensor(max_new_tokens, device=device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache, logits = out.past_key_values, out.logits[:, -1]
    answers: list[list[int]] = [[] for _ in range(batch)]
    ended_with_eos = [False] * batch
    active = torch.ones(batch, dtype=torch.bool, device=device)
    position = positions[:, -1:]
    no_eos = torch.tensor(ignore_eos or [False] * batch, device=device)
    for step in range(int(limits.max())):
        if no_eos.any():
            logits[no_eos, eos_id] = float("-inf")
        tokens = sample_tokens(logits, temps, top_ps, generators, top_k)
        tokens = torch.where(active, tokens, torch.full_like(tokens, pad_id))
        if on_step is not None:
            on_step(tokens, active)
        for row in active.nonzero().flatten().tolist():
            token = int(tokens[row])
            if token == eos_id:
                ended_with_eos[row] = True
            else:
                answers[row].append(token)
        active = active & (tokens != eos_id) & (limits > step + 1)
        if not bool(active.any()):
            break
        mask = torch.cat([mask, torch.ones((batch, 1), dtype=mask.dtype, device=device)], dim=1)
        position = position + 1
        out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=position,
                    past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
    return answers, ended_with_eos


# -- requests, events and the engine thread ----------------------------------------------------
@dataclass
class Result:
    texts: list[str]
    ended_with_eos: list[bool]
    version: str
    seeds: list[int]
    prompt_messages: list[dict]
    turns_dropped: int
    prompt_tokens: int
    completion_tokens: list[int]
    latency_ms: float
    first_token_ms: float | None


@dataclass
class Request:
    messages: list[dict]
    n: int = 2
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seeds: list[int] | None = None
    ignore_eos: bool = False
    events: queue.Queue = field(default_factory=queue.Queue)
    """("token", index, text) ... then ("done", Result) or ("error", message)."""
    submitted_at: float = field(default_factory=time.perf_counter)

    def stream(self, timeout: float | None = 600) -> Iterator[tuple]:
        """Events until done or error."""
        while True:
            event = self.events.get(timeout=timeout)
            yield event
            if event[0] in ("done", "error"):
                return

    def result(self, timeout: float | None = 600) -> Result:
        for event in self.stream(timeout):
            if event[0] == "error":
                raise RuntimeError(event[1])
            if event[0] == "done":
                return event[1]
        raise RuntimeError("no result")


@dataclass
class Swap:
    adapter_path: str | None
    """PEFT adapter folder, or None to serve the base model."""
    version: str
    prepared: object | None = None
    """A whole model built outside the engine thread (int8 serving); swapping it in is one assignment."""
    done: queue.Queue = field(default_factory=queue.Queue)
    """Receives ("ok", pause_ms) or ("error", message)."""


def int8_copy(base_model, adapter_path: str | None = None):
    """A copy of the base with the LoRA adapter merged in and every Linear dynamically quantized to int8 (CPU).

    The linear layers are most of a CPU decode step; int8 weights cut them ~4x (DESIGN.md, Serving).
    """
    import copy

    model = copy.deepcopy(base_model)
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    return model.eval()


class GenerationEngine:
    """The only thread that touches the policy model. Submit requests; swaps apply between batches."""

    def __init__(self, model, tokenizer, *, max_context_tokens: int, max_batch_requests: int = 8,
                 kept_adapters: int = 3, version: str = "base", weights: str = "model"):
        if weights not in ("model", "int8"):
            raise ValueError(f"weights must be 'model' or 'int8', got {weights!r}")
        self.weights = weights
        self.base_model = model
        """The full-precision base; int8 serving builds each version's merged copy from it."""
        self.model = int8_copy(model) if weights == "int8" else model
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self.max_batch_requests = max_batch_requests
        self.kept_adapters = kept_adapters
        self.version = version
        self.loaded_adapters: list[str] = []
        self.inbox: queue.Queue = queue.Queue()
        self.batches_run = 0
        self.requests_served = 0
        self.threads: int | None = None
        """Torch threads for the next batch (None: leave as is); lowered while a training run shares the cores."""
        self.thread = threading.Thread(target=self._loop, name="generation-engine", daemon=True)
        self._stopping = False

    # public API, safe from any thread
    def start(self) -> "GenerationEngine":
        self.thread.start()
        return self

    def stop(self):
        self._stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=30)

    def submit(self, messages: list[dict], n: int = 2, max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.9, seeds: list[int] | None = None, ignore_eos: bool = False) -> Request:
        request = Request(messages=messages, n=n, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, seeds=seeds or [random.randrange(2**31) for _ in range(n)],
                          ignore_eos=ignore_eos)
        self.inbox.put(request)
        return request

    def swap(self, adapter_path: str | None, version: str, timeout: float = 600) -> float:
        """Serve `adapter_path` as `version` (None: the base) after the current batch; returns the pause in ms."""
        swap = Swap(adapter_path, version)
        if self.weights == "int8":     # build the merged int8 model here, so serving pauses only for the switch
            try:
                swap.prepared = int8_copy(self.base_model, adapter_path)
            except Exception as error:
                raise RuntimeError(f"could not load {version} from {adapter_path}: {error}") from None
        self.inbox.put(swap)
        status, value = swap.done.get(timeout=timeout)
        if status == "error":
            raise RuntimeError(value)
        return value

    # the engine thread
    def _loop(self):
        while not self._stopping:
            item = self.inbox.get()
            if item is None:
                break
            pending = [item]
            while len([p for p in pending if isinstance(p, Request)]) < self.max_batch_requests:
                try:
                    pending.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            # a swap splits the batch: what came before it is served by the old version
            batch: list[Request] = []
            for entry in pending:
                if isinstance(entry, Request):
                    batch.append(entry)
                    continue
                self._run_batch(batch)
                batch = []
                if entry is None:
                    self._stopping = True
                    break
                self._apply_swap(entry)
            self._run_batch(batch)

    def _apply_swap(self, swap: Swap):
        started = time.perf_counter()
        try:
            if swap.prepared is not None:
                self.model = swap.prepared
            elif swap.adapter_path is not None:
                from peft import PeftModel

                if swap.version not in self.loaded_adapters:
                    if not isinstance(self.model, PeftModel):
                        self.model = PeftModel.from_pretrained(self.model, swap.adapter_path,
                                                               adapter_name=swap.version, is_trainable=False)
                    else:
                        self.model.load_adapter(swap.adapter_path, adapter_name=swap.version, is_trainable=False)
                    self.loaded_adapters.append(swap.version)
                self.model.set_adapter(swap.version)
                self.model.eval()
            self.version = swap.version
            self._unload_old_adapters()
            pause_ms = (time.perf_counter() - started) * 1000
            log.info("now serving %s (swap paused serving %.0f ms)", swap.version, pause_ms)
            swap.done.put(("ok", pause_ms))
        except Exception as error:  # a bad adapter must not stop the engine
            log.exception("swap to %s failed", swap.version)
            swap.done.put(("error", f"could not load {swap.version} from {swap.adapter_path}: {error}"))

    def _unload_old_adapters(self):
        while len(self.loaded_adapters) > self.kept_adapters:
            oldest = next((a for a in self.loaded_adapters if a != self.version), None)
            if oldest is None:
                break
            self.model.delete_adapter(oldest)
            self.loaded_adapters.remove(oldest)

    def _run_batch(self, batch: list[Request]):
        if not batch:
            return
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        try:
            self._generate(batch)
        except Exception as error:
            log.exception("generation failed")
            for request in batch:
                request.events.put(("error", f"generation failed: {error}"))

    def _generate(self, batch: list[Request]):
        tokenizer = self.tokenizer
        rows: list[tuple[Request, int]] = []        # (request, answer index) per batch row
        prompts, limits, temps, top_ps, seeds, no_eos = [], [], [], [], [], []
        encoded = {}
        for request in batch:
            room = self.max_context_tokens - request.max_new_tokens
            ids, dropped = encode_prompt(tokenizer, request.messages, max(room, 16))
            encoded[id(request)] = (len(ids), dropped)
            for index in range(request.n):
                rows.append((request, index))
                prompts.append(ids)
                limits.append(request.max_new_tokens)
                temps.append(request.temperature)
                top_ps.append(request.top_p)
                seeds.append(request.seeds[index])
                no_eos.append(request.ignore_eos)
        started = time.perf_counter()
        first_token_at: dict[int, float] = {}
        tokens_so_far: list[list[int]] = [[] for _ in rows]
        text_so_far = [""] * len(rows)
        offsets = [[0, 0] for _ in rows]       # (prefix, read): decode a short window, not the whole answer per step
        eos_id = tokenizer.eos_token_id

        def on_step(tokens: torch.Tensor, active: torch.Tensor):
            for row in active.nonzero().flatten().tolist():
                token = int(tokens[row])
                if token == eos_id:
                    continue
                tokens_so_far[row].append(token)
                prefix, read = offsets[row]
                seen = tokenizer.decode(tokens_so_far[row][prefix:read], skip_special_tokens=True)
                text = tokenizer.decode(tokens_so_far[row][prefix:], skip_special_tokens=True)
                if text.endswith("\ufffd") or len(text) <= len(seen):   # half a multi-byte character: wait
                    continue
                delta = text[len(seen):]
                offsets[row] = [read, len(tokens_so_far[row])]
                text_so_far[row] += delta
                request, index = rows[row]
                first_token_at.setdefault(id(request), time.perf_counter())
                if delta:
                    request.events.put(("token", index, delta))

        context = self.model.disable_adapter() if self.version == "base" and self.loaded_adapters else _nothing()
        with context:
            answers, ended = decode(self.model, prompts, max_new_tokens=limits, temperature=temps, top_p=top_ps,
                                    seeds=seeds, eos_id=eos_id, pad_id=tokenizer.pad_token_id, ignore_eos=no_eos,
                                    on_step=on_step)
        done_at = time.perf_counter()
        self.batches_run += 1
        for request in batch:
            mine = [row for row, (r, _) in enumerate(rows) if r is request]
            texts = [tokenizer.decode(answers[row], skip_special_tokens=True) for row in mine]
            for row, text in zip(mine, texts):          # flush what the stream held back
                if text != text_so_far[row] and text.startswith(text_so_far[row]):
                    request.events.put(("token", rows[row][1], text[len(text_so_far[row]):]))
            prompt_tokens, dropped = encoded[id(request)]
            first = first_token_at.get(id(request))
            result = Result(texts=texts, ended_with_eos=[ended[row] for row in mine], version=self.version,
                            seeds=list(request.seeds), prompt_messages=request.messages, turns_dropped=dropped,
                            prompt_tokens=prompt_tokens, completion_tokens=[len(answers[row]) for row in mine],
                            latency_ms=(done_at - request.submitted_at) * 1000,
                            first_token_ms=(first - request.submitted_at) * 1000 if first else None)
            self.requests_served += 1
            request.events.put(("done", result))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
