"""The generation engine: one thread owns the policy model, batches waiting requests, streams tokens, swaps adapters."""
from __future__ import annotations

import copy
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from collections import deque
from typing import Iterator, NamedTuple

import torch

from chat_app.chat import encode_prompt
from chat_app.decoding import DecodeBatch, Row
from chat_app.packed import adapter_deltas, available as packed_available, delta_weight, serving_copy

log = logging.getLogger(__name__)


# -- requests, events and the engine thread ----------------------------------------------------
class EngineBusy(RuntimeError):
    """The engine's queue is full: try again in `retry_after_s` seconds (the API answers 503, the chat page says so)."""

    def __init__(self, waiting: int, retry_after_s: int = 10):
        super().__init__(f"the server is busy: {waiting} requests are waiting for the model; "
                         f"try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


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
    versions: list[str] = field(default_factory=list)
    """The version that wrote each answer: the served one, or the second one for rows that asked for it."""


@dataclass
class Request:
    messages: list[dict]
    n: int = 2
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_p: float = 0.9
    seeds: list[int] | None = None
    ignore_eos: bool = False
    versions: list[str | None] | None = None
    """Per answer, the version to write it (a canary trial's rows); None or an unknown name: the served version."""
    events: queue.Queue = field(default_factory=queue.Queue)
    """("token", index, text) ... then ("done", Result) or ("error", message)."""
    submitted_at: float = field(default_factory=time.perf_counter)
    state: dict | None = None
    """The engine's bookkeeping while the request is in flight."""
    cancelled: bool = False
    """Set by `GenerationEngine.cancel`: its client went away, so its rows stop at the next step."""

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
    version: str
    prepared: object
    """The version's whole serving model, built outside the engine thread; swapping it in is one assignment."""
    done: queue.Queue = field(default_factory=queue.Queue)
    """Receives how long serving paused, in ms."""
    second: bool = False
    """Install as the second version (served beside the first to rows that name it) instead of swapping."""
    adapter_path: str | None = None
    """The version's adapter (None: the base)."""
    mixed: Mixed | None = None
    """Over unmerged LoRA, while two versions are served: the model their one batch runs on."""


def new_request(messages: list[dict], n: int, max_new_tokens: int, temperature: float, top_p: float,
                seeds: list[int] | None, ignore_eos: bool, versions: list[str | None] | None) -> Request:
    """A Request for `n` answers (random seeds unless given); either engine's `submit` queues it."""
    if versions is not None and len(versions) != n:
        raise ValueError(f"versions names {len(versions)} answers, n is {n}")
    return Request(messages=messages, n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                   seeds=seeds or [random.randrange(2**31) for _ in range(n)], ignore_eos=ignore_eos,
                   versions=versions)


def merged_copy(base_model, adapter_path: str | None = None, dtype: torch.dtype | None = torch.bfloat16):
    """A copy of the base with the LoRA adapter merged in (cast to `dtype` unless None): what a swap serves.

    Built outside the engine thread, so a swap pauses serving for one assignment; a merged adapter costs nothing
    per decode step (unmerged LoRA cost 1.1x on CPU, 2x on an H100: DESIGN.md, Serving). Dynamic int8 was tried
    and dropped: it moved SmolLM2's next-token distribution by 1.3-1.7 nats per token.
    """
    model = copy.deepcopy(base_model)
    deltas = adapter_deltas(model, adapter_path) if adapter_path is not None else None
    if deltas is not None:                     # plain LoRA: add scaling·B·A to each weight, no PEFT model needed
        with torch.no_grad():
            for module, factors in deltas.items():
                module.weight.add_(delta_weight(factors, module.weight))
    elif adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path).merge_and_unload()
    return (model.to(dtype) if dtype is not None else model).eval()


def unmerged_copy(base_model, adapter_path: str):
    """A copy of the base with the LoRA adapter loaded beside its layers, not merged (a 4-bit base: merging would
    requantize the weights and lose most of the adapter; see app.engine_merges). A 4-bit copy of SmolLM2 is 160 MB."""
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_path, is_trainable=False).eval()


class Mixed(NamedTuple):
    model: object
    """One PEFT model holding both versions' LoRA adapters over one copy of the base."""
    adapters: dict[str, str]
    """The adapter name the "first" (served) and "second" version's rows pass ("__base__": no adapter)."""
    paths: tuple[str | None, str | None]
    """The (served, second) adapter paths it was built from."""


def mixed_model(base_model, served_path: str | None, second_path: str | None) -> Mixed:
    """Two versions in one model: PEFT's mixed-adapter batches, where a forward given `adapter_names` (one per row)
    adds each row's own LoRA over the shared layers, so a step with rows of both versions reads the (4-bit) base
    once, not once per version. Built off the engine thread, like any serving copy."""
    from peft import PeftModel

    model, names = copy.deepcopy(base_model), {}
    for name, path in (("first", served_path), ("second", second_path)):
        names[name] = "__base__" if path is None else name
        if path is not None and isinstance(model, PeftModel):
            model.load_adapter(path, adapter_name=name, is_trainable=False)
        elif path is not None:
            model = PeftModel.from_pretrained(model, path, adapter_name=name, is_trainable=False)
    return Mixed(model.eval(), names, (served_path, second_path))


def serving_model(base_model, weights: str, adapter_path: str | None = None, merge: bool = True):
    """What serves a version (`weights` resolved), built from the base off the engine thread; the engine swaps to it
    in one assignment. With no adapter, `model` is the base itself."""
    if not merge and adapter_path is not None and weights == "model":
        return unmerged_copy(base_model, adapter_path)
    if weights == "packed":
        return serving_copy(base_model, adapter_path)
    if weights == "bf16":
        return merged_copy(base_model, adapter_path, torch.bfloat16)
    return base_model if adapter_path is None else merged_copy(base_model, adapter_path, None)


WEIGHTS = ("auto", "model", "packed", "bf16")


def resolve_weights(weights: str, model) -> str:
    """`auto`: the packed fp32 copy where it applies (CPU, fp32, oneDNN), else the model as loaded."""
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}; got {weights!r}")
    if weights == "auto":
        return "packed" if packed_available(model) else "model"
    if weights == "packed" and not packed_available(model):
        raise ValueError("serve.weights=packed needs an fp32 model on CPU and a torch built with oneDNN")
    return weights


class GenerationEngine:
    """The only thread that touches the policy model. Submit requests; swaps apply between batches."""

    def __init__(self, model, tokenizer, *, max_context_tokens: int, max_batch_requests: int = 8,
                 version: str = "base", weights: str = "model", merge_adapters: bool = True,
                 max_queued_requests: int = 0):
        self.weights = resolve_weights(weights, model)
        self.merge_adapters = merge_adapters or self.weights != "model"
        """Serve each version as a merged copy of the base; else as a copy with the LoRA adapter unmerged."""
        self.base_model = model
        """The base as loaded; each version's copy is built from it, off the engine thread."""
        self.model = serving_model(model, self.weights)
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self.max_batch_requests = max_batch_requests
        self.version = version
        self.max_queued_requests = max_queued_requests
        """Submit raises EngineBusy while this many requests wait to be admitted; 0: no bound."""
        self._submit_lock = threading.Lock()   # check-then-put: two callers must not both take the last place
        self.inbox: queue.Queue = queue.Queue()
        self.batch = DecodeBatch(self.model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.adapter_path: str | None = None
        """The served version's adapter (None: the base)."""
        self.second_version: str | None = None
        """A version served beside `version` to rows that name it (a canary trial). Over merged copies it has its own
        model and batch, so a step runs one forward per version; over unmerged LoRA (`mixes_adapters`) its rows join
        `batch`, whose model then holds both adapters, and a step runs one forward."""
        self.second_path: str | None = None
        self.second_batch: DecodeBatch | None = None
        self.mixes_adapters = not self.merge_adapters
        """Every version is the base plus an unmerged LoRA adapter, so two versions can share one batch (PEFT's
        mixed-adapter batches): over a 4-bit base a step then dequantizes its weights once, not once per version."""
        self.row_adapters: dict[str, str] | None = None
        """While `batch` mixes versions: the adapter name its "first" and "second" version's rows pass."""
        self.draining: list[DecodeBatch] = []
        """Batches of the previous versions, finishing their rows beside the new version's batch."""
        self.batches_run = 0
        """Admissions: groups of waiting requests prefilled into the running batch together."""
        self.requests_served = 0
        self.waiting: deque = deque()
        """Requests (and swaps) taken from the inbox but not yet admitted; the engine thread's own."""
        self.metrics = None
        """chat_app.metrics.Metrics when an App owns this engine: told of each step, first token and swap."""
        self.threads: int | None = None
        """Torch threads from the next admission on (None: as is); lowered while a training run shares the cores."""
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
               top_p: float = 0.9, seeds: list[int] | None = None, ignore_eos: bool = False,
               versions: list[str | None] | None = None) -> Request:
        """Queue a request for `n` answers; `versions` names the version of each (see Request.versions)."""
        request = new_request(messages, n, max_new_tokens, temperature, top_p, seeds, ignore_eos, versions)
        with self._submit_lock:
            waiting = self.queue_depth()
            if self.max_queued_requests and waiting >= self.max_queued_requests:
                raise EngineBusy(waiting)
            self.inbox.put(request)
        return request

    def cancel(self, request: Request) -> None:
        """Stop sampling for a client that went away (a dropped stream): a queued request is never admitted and the
        rows of one in flight end at the next step, so a client cannot fill the batch by opening and dropping
        streams. Its events still end with "done" (the answers cut short)."""
        request.cancelled = True

    def queue_depth(self) -> int:
        """Requests (and swaps) submitted but not yet admitted into a batch."""
        return len(self.waiting) + self.inbox.qsize()

    def swap(self, adapter_path: str | None, version: str, timeout: float = 600) -> float:
        """Serve `adapter_path` as `version` (None: the base) after the current batch; returns the pause in ms."""
        try:                          # build the version's copy here, so serving pauses only for the switch
            prepared = serving_model(self.base_model, self.weights, adapter_path, merge=self.merge_adapters)
            mixed = self._prepare_mixed(adapter_path, version, self.second_path, self.second_version)
        except Exception as error:    # a bad adapter must not stop the engine
            raise RuntimeError(f"could not load {version} from {adapter_path}: {error}") from None
        swap = Swap(version, prepared, adapter_path=adapter_path, mixed=mixed)
        self.inbox.put(swap)
        return swap.done.get(timeout=timeout)

    def set_second(self, adapter_path: str | None, version: str | None, timeout: float = 600) -> None:
        """Serve `version` (from `adapter_path`; None: the base) beside the served one, to rows that name it; with
        `version` None, stop. Built here, off the engine thread; rows in flight on the old second one finish."""
        prepared = mixed = None
        try:
            if self.mixes_adapters:
                mixed = self._prepare_mixed(self.adapter_path, self.version, adapter_path, version)
            elif version is not None:
                prepared = serving_model(self.base_model, self.weights, adapter_path, merge=self.merge_adapters)
        except Exception as error:
            raise RuntimeError(f"could not load {version} from {adapter_path}: {error}") from None
        swap = Swap(version, prepared, second=True, adapter_path=adapter_path, mixed=mixed)
        self.inbox.put(swap)
        swap.done.get(timeout=timeout)

    def _mixes(self, served: str | None, second: str | None) -> bool:
        return self.mixes_adapters and second not in (None, served)

    def _prepare_mixed(self, served_path, served, second_path, second) -> Mixed | None:
        """The model for a batch mixing `served` and `second` (see `mixed_model`); None where no batch mixes."""
        return mixed_model(self.base_model, served_path, second_path) if self._mixes(served, second) else None

    # the engine thread
    def _loop(self):
        """Admit waiting requests between steps, step the batches, apply swaps.

        A swap to a copy built off-thread applies at once: rows in flight finish on their version's copy
        (`draining`) while new requests start on the new one, so no one waits for a long answer to end.
        """
        waiting = self.waiting                 # an attribute so /metrics can read the queue depth
        while True:
            idle = not self._rows_in_flight() and not waiting
            try:
                waiting.append(self.inbox.get(block=idle))
                while True:
                    waiting.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            # requests ahead of a swap join the running batch; those behind it wait for the new version
            admitted = []
            room = self.max_batch_requests * 2 - self._rows_in_flight()
            while waiting and isinstance(waiting[0], Request) and waiting[0].n <= room:
                if waiting[0].cancelled:         # its client left while it waited
                    waiting.popleft().events.put(("error", "cancelled: the client went away"))
                    continue
                room -= waiting[0].n
                admitted.append(waiting.popleft())
            if admitted:
                self._admit(admitted)
            if waiting and waiting[0] is None and not self._rows_in_flight():
                return
            if waiting and isinstance(waiting[0], Swap):
                self._apply_swap(waiting.popleft())
                continue
            for batch in self._batches():
                self._step(batch)
            self.draining = [b for b in self.draining if len(b)]

    def _batches(self) -> list[DecodeBatch]:
        return [b for b in (*self.draining, self.batch, self.second_batch) if b is not None and len(b)]

    def _rows_in_flight(self) -> int:
        return sum(len(b) for b in self._batches())

    def rows_in_flight(self) -> int:
        """Answers being decoded now, all versions (for /metrics; read from another thread, so an estimate)."""
        return self._rows_in_flight()

    def _admit(self, requests: list[Request]):
        """Encode the prompts (cutting long histories) and prefill them into the running batch."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        groups = {"first": ([], []), "second": ([], [])}   # (prompts, rows) for each version's batch
        for request in requests:
            room = self.max_context_tokens - request.max_new_tokens
            ids, dropped = encode_prompt(self.tokenizer, request.messages, max(room, 16))
            request.state = {"prompt_tokens": len(ids), "turns_dropped": dropped, "version": self.version,
                             "rows": [None] * request.n, "pending": request.n, "first_token_at": None,
                             "versions": [self.version] * request.n}
            for index in range(request.n):
                wanted = request.versions[index] if request.versions else None
                group = "second" if wanted is not None and wanted == self.second_version != self.version else "first"
                request.state["versions"][index] = self.second_version if group == "second" else self.version
                row = Row(key=(request, index), max_new_tokens=request.max_new_tokens,
                          temperature=request.temperature, top_p=request.top_p,
                          generator=torch.Generator().manual_seed(int(request.seeds[index])),
                          ignore_eos=request.ignore_eos)
                row.stream = {"prefix": 0, "read": 0, "text": ""}
                row.adapter = self.row_adapters[group] if self.row_adapters else None
                request.state["rows"][index] = row
                groups[group][0].append(ids)
                groups[group][1].append(row)
        try:
            if self.row_adapters:    # one batch mixing both versions: each row names its adapter
                (first_prompts, first_rows), (second_prompts, second_rows) = groups["first"], groups["second"]
                plan = [(self.batch, first_prompts + second_prompts, first_rows + second_rows)]
            else:
                plan = [(self.batch, *groups["first"]), (self.second_batch, *groups["second"])]
            for batch, prompts, rows in plan:
                if rows:
                    batch.add(prompts, rows)
            self.batches_run += 1
        except Exception as error:
            log.exception("prefill failed")
            for request in requests:
                request.events.put(("error", f"generation failed: {error}"))

    def _step(self, batch: DecodeBatch):
        started = time.perf_counter()
        for row in batch.rows:
            if row.key[0].cancelled:             # its client went away: this step is its last
                row.max_new_tokens = 0
        try:
            emitted, ended = batch.step()
        except Exception as error:   # fail what is in flight, keep the engine alive
            log.exception("decode step failed")
            failed = {id(row.key[0]): row.key[0] for row in batch.rows}
            batch.clear()                            # an empty batch: dropped or refilled by the next admission
            for request in failed.values():
                request.events.put(("error", f"generation failed: {error}"))
            return
        if self.metrics is not None:
            self.metrics.decode_step(rows=len(emitted), tokens=sum(t is not None for _, t in emitted),
                                     seconds=time.perf_counter() - started)
        for row, token in emitted:
            if token is not None:
                self._stream(row)
        for row in ended:
            request, _ = row.key
            request.state["pending"] -= 1
            if request.state["pending"] == 0:
                self._finish(request)

    def _stream(self, row: Row):
        """Send the new text of a row: decode a short window, not the whole answer, each step."""
        request, index = row.key
        stream = row.stream
        seen = self.tokenizer.decode(row.tokens[stream["prefix"]:stream["read"]], skip_special_tokens=True)
        text = self.tokenizer.decode(row.tokens[stream["prefix"]:], skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(seen):     # half a multi-byte character: wait for the rest
            return
        delta = text[len(seen):]
        stream["prefix"], stream["read"] = stream["read"], len(row.tokens)
        stream["text"] += delta
        if request.state["first_token_at"] is None:
            request.state["first_token_at"] = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token_seconds.observe(request.state["first_token_at"] - request.submitted_at)
        request.events.put(("token", index, delta))

    def _finish(self, request: Request):
        state = request.state
        texts = []
        for index, row in enumerate(state["rows"]):
            text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
            if text != row.stream["text"] and text.startswith(row.stream["text"]):   # what the stream held back
                request.events.put(("token", index, text[len(row.stream["text"]):]))
            texts.append(text)
        done_at, first = time.perf_counter(), state["first_token_at"]
        result = Result(texts=texts, ended_with_eos=[r.ended_with_eos for r in state["rows"]],
                        version=state["version"], seeds=list(request.seeds), prompt_messages=request.messages,
                        turns_dropped=state["turns_dropped"], prompt_tokens=state["prompt_tokens"],
                        completion_tokens=[len(r.tokens) for r in state["rows"]],
                        latency_ms=(done_at - request.submitted_at) * 1000,
                        first_token_ms=(first - request.submitted_at) * 1000 if first else None,
                        versions=list(state["versions"]))
        self.requests_served += 1
        request.events.put(("done", result))

    def _apply_swap(self, swap: Swap):
        """Serve the prepared copy from now on; the old copy's rows finish beside it, then it is freed."""
        started = time.perf_counter()
        if swap.second:
            if self.second_batch is not None and len(self.second_batch):
                self.draining.append(self.second_batch)
            self.second_version, self.second_path = swap.version, swap.adapter_path
            if self.mixes_adapters:
                self._restart_batch(swap.mixed)
            else:
                self.second_batch = None if swap.version is None else \
                    DecodeBatch(swap.prepared, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            if swap.version is None:
                log.info("serving %s alone", self.version)
            else:
                log.info("serving %s beside %s to the rows that ask for it", swap.version, self.version)
            swap.done.put(0.0)
            return
        self.model, self.version, self.adapter_path = swap.prepared, swap.version, swap.adapter_path
        self._restart_batch(swap.mixed)
        pause_ms = (time.perf_counter() - started) * 1000
        log.info("now serving %s (swap paused serving %.0f ms)", swap.version, pause_ms)
        if self.metrics is not None:
            self.metrics.hot_swap(pause_ms / 1000)
        swap.done.put(pause_ms)

    def _restart_batch(self, mixed: Mixed | None):
        """New rows join a new batch on the served model, or on `mixed` while a second version mixes into it; the old
        batch's rows finish beside it (`draining`)."""
        if not self._mixes(self.version, self.second_version):
            mixed = None
        elif mixed is None or mixed.paths != (self.adapter_path, self.second_path):   # a swap and a set_second raced
            log.warning("building the two-version model on the engine thread: it was built for other versions")
            mixed = mixed_model(self.base_model, self.adapter_path, self.second_path)
        model = self.model if mixed is None else mixed.model
        self.row_adapters = None if mixed is None else mixed.adapters
        if model is self.batch.model:
            return
        if len(self.batch):
            self.draining.append(self.batch)
        self.batch = DecodeBatch(model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
