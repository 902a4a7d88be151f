"""The vLLM engine: the app's engine interface (chat_app.app.Engine) over a vLLM OpenAI-compatible server.

vLLM owns the model and does the batching; this process only sends each answer as one streamed, seeded
/v1/chat/completions request on a thread of a pool, and names the model per answer: the served model's own name
for `base`, the version id for a version, whose LoRA adapter folder was loaded with POST /v1/load_lora_adapter
(the server started with `--enable-lora` and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True). A swap loads the new adapter
first, then new requests name it; an adapter no longer served (nor the canary's second version) is unloaded once
its last answer ends. Serving never pauses: requests meanwhile go on naming the previous version.
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from chat_app.chat import encode_prompt
from chat_app.engine import EngineBusy, Request, Result, new_request

log = logging.getLogger(__name__)


class VLLMUnavailable(RuntimeError):
    """The vLLM server does not answer, or does not serve the model asked for (one line, said at start)."""


def fit_prompt(tokenizer, messages: list[dict], max_prompt_tokens: int) -> tuple[list[dict], int, int, bool]:
    """The messages to send, cut as the in-process engine cuts them (chat.encode_prompt drops the oldest turns);
    returns (messages, prompt_tokens, turns_dropped, keep_end). keep_end: the last message alone is too long, so
    vLLM must keep the prompt's last `max_prompt_tokens` tokens (`truncate_prompt_tokens`), as encode_prompt does."""
    ids, dropped = encode_prompt(tokenizer, messages, max_prompt_tokens)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    if dropped >= len(turns):   # every turn "dropped": the last one's start was cut, the +1 is not a turn
        return system + turns[-1:], len(ids), dropped, True
    return system + turns[dropped:], len(ids), dropped, False


class VLLMEngine:
    """Serves through a vLLM server; the same public surface as GenerationEngine (see chat_app.app.Engine)."""

    weights = "vllm"
    """What /api/status reports as the serving weights: the vLLM server's own."""

    def __init__(self, url: str, tokenizer, *, model: str = "", max_context_tokens: int,
                 max_concurrent_answers: int = 16, max_queued_requests: int = 0, timeout_s: float = 600,
                 version: str = "base"):
        self.url = url.rstrip("/")
        self.tokenizer = tokenizer
        """Cuts long histories and counts prompt tokens here; the same model's tokenizer as vLLM's (`model.name`)."""
        self.base_name = model
        """The name vLLM serves the base under; resolved from GET /v1/models at start when empty."""
        self.max_context_tokens = max_context_tokens
        self.max_queued_requests = max_queued_requests
        """Submit raises EngineBusy while this many requests wait for a thread; 0: no bound."""
        self.version, self.adapter_path = version, None
        self.second_version: str | None = None
        """A version served beside `version` to the answers that name it (a canary trial)."""
        self.second_path: str | None = None
        self.loaded: dict[str, str | None] = {}
        """LoRA name -> adapter folder, as loaded in the vLLM server (read from /v1/models at start)."""
        self.answers_on: Counter = Counter()
        """Model name -> answers submitted and not ended: an adapter stays loaded while any remain."""
        self.requests_served = 0
        self.metrics = None
        """chat_app.metrics.Metrics when an App owns this engine: told of each first token, answer and swap."""
        self.threads: int | None = None
        """Kept for the interface and ignored: vLLM runs in its own process on the cores it was started with
        (VLLM_CPU_OMP_THREADS_BIND), so a training run on the same machine must be given other cores."""
        self.client = httpx.Client(base_url=self.url, timeout=httpx.Timeout(timeout_s, connect=5.0))
        self.pool = ThreadPoolExecutor(max_workers=max_concurrent_answers, thread_name_prefix="vllm-answer")
        self._lock = threading.Condition()   # the counts and names below; notified when an answer ends
        self._swap_lock = threading.Lock()   # one load, unload or swap at a time
        self._waiting = 0                    # requests none of whose answers has a thread yet
        self._running = 0                    # answers streaming now
        self._stopping = False

    # -- the engine interface, safe from any thread ------------------------------------------------------
    def start(self) -> "VLLMEngine":
        """Check the server answers and serves the base model; VLLMUnavailable (one line) if not."""
        try:
            response = self.client.get("/v1/models", timeout=10)
            response.raise_for_status()
            models = response.json()["data"]
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as error:
            raise VLLMUnavailable(f"serve.engine=vllm: no vLLM server answers at {self.url}/v1/models "
                                  f"({type(error).__name__}: {error}); start it first (README: Beyond one "
                                  "machine) or set serve.vllm_url") from None
        bases = [m["id"] for m in models if not m.get("parent")]
        if not self.base_name and len(bases) != 1:
            raise VLLMUnavailable(f"the vLLM server at {self.url} serves {bases or 'no base model'}: "
                                  "set serve.vllm_model to the one to serve as base")
        self.base_name = self.base_name or bases[0]
        if self.base_name not in bases:
            raise VLLMUnavailable(f"the vLLM server at {self.url} serves {bases}, not serve.vllm_model="
                                  f"{self.base_name!r}")
        self.loaded = {m["id"]: m.get("root") for m in models if m.get("parent")}
        log.info("serving through vLLM at %s: base %s%s", self.url, self.base_name,
                 f"; adapters already loaded there: {', '.join(self.loaded)}" if self.loaded else "")
        return self

    def stop(self, timeout: float = 30) -> None:
        """Cut the answers in flight (each ends at its next chunk), fail the queued ones, close the connections."""
        self._stopping = True
        self.pool.shutdown(wait=False)    # queued answers still run: each sees _stopping and ends at once
        with self._lock:
            self._lock.wait_for(lambda: self._running == 0 and self._waiting == 0, timeout=timeout)
        self.client.close()

    def submit(self, messages: list[dict], n: int = 2, max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.9, seeds: list[int] | None = None, ignore_eos: bool = False,
               versions: list[str | None] | None = None) -> Request:
        """Queue a request for `n` answers, one seeded vLLM request each; `versions` names the version of each."""
        request = new_request(messages, n, max_new_tokens, temperature, top_p, seeds, ignore_eos, versions)
        with self._lock:
            if self.max_queued_requests and self._waiting >= self.max_queued_requests:
                raise EngineBusy(self._waiting)
            # the versions are fixed now, as the in-process engine fixes them at admission
            row_versions = [self._version_for(wanted) for wanted in (versions or [None] * n)]
            names = [self._name_of(version) for version in row_versions]
            self.answers_on.update(names)
            self._waiting += 1
        request.state = {"version": self.version, "versions": row_versions, "names": names, "started": 0,
                         "pending": n, "prompt": None, "texts": [""] * n, "finish_reasons": [None] * n,
                         "completion_tokens": [None] * n, "prompt_tokens": None, "error": None,
                         "first_token_at": None, "sent": False, "lock": threading.Lock()}
        for index in range(n):
            self.pool.submit(self._answer, request, index)
        return request

    def cancel(self, request: Request) -> None:
        """Its client went away: queued answers are never sent, streaming ones close their connection (vLLM then
        aborts them). Its events still end with "done" (the answers cut short), or "error" if none was sent."""
        request.cancelled = True

    def queue_depth(self) -> int:
        """Requests submitted none of whose answers has a thread yet (vLLM's own queue is not counted)."""
        return self._waiting

    def rows_in_flight(self) -> int:
        """Answers streaming from vLLM now."""
        return self._running

    def swap(self, adapter_path: str | None, version: str, timeout: float = 600) -> float:
        """Serve `adapter_path` as `version` (None: the base): load it into vLLM, then name it in new requests.
        Returns the pause in ms, ~0: serving never stops (the load itself took tens of ms, logged)."""
        with self._swap_lock:
            loaded_in = self._load(adapter_path, version)
            started = time.perf_counter()
            with self._lock:
                self.version, self.adapter_path = version, adapter_path
            pause_ms = (time.perf_counter() - started) * 1000
            self._unload_unneeded()
        log.info("now serving %s through vLLM (%s)", version,
                 f"its adapter loaded in {loaded_in:.0f} ms" if loaded_in else "nothing to load")
        if self.metrics is not None:
            self.metrics.hot_swap(pause_ms / 1000)
        return pause_ms

    def set_second(self, adapter_path: str | None, version: str | None, timeout: float = 600) -> None:
        """Serve `version` (from `adapter_path`; None: the base) beside the served one, to answers that name it;
        with `version` None, stop. Answers in flight on the old second version finish on it."""
        with self._swap_lock:
            if version is not None:
                self._load(adapter_path, version)
            with self._lock:
                self.second_version, self.second_path = version, adapter_path
            self._unload_unneeded()
        if version is None:
            log.info("serving %s alone", self.version)
        else:
            log.info("serving %s beside %s to the answers that ask for it", version, self.version)

    # -- names and adapters ------------------------------------------------------------------------------
    def _version_for(self, wanted: str | None) -> str:
        """The version an answer gets: the second one when it names it, else the served one (under _lock)."""
        return self.second_version if wanted is not None and wanted == self.second_version != self.version \
            else self.version

    def _name_of(self, version: str) -> str:
        """The model name vLLM knows `version` by: the base's own name, else the version id (a LoRA name)."""
        path = self.adapter_path if version == self.version else self.second_path
        return self.base_name if path is None else version

    def _load(self, adapter_path: str | None, version: str) -> float:
        """Load `adapter_path` as LoRA `version` unless vLLM has it; returns the ms the load took (0: none)."""
        if adapter_path is None:
            return 0.0
        path = str(Path(adapter_path).resolve())   # vLLM's working folder is not ours
        if self.loaded.get(version, path) != path:  # the name was loaded from another folder (a rebuilt version)
            self._unload(version)
        if version in self.loaded:
            return 0.0
        started = time.perf_counter()
        try:
            response = self.client.post("/v1/load_lora_adapter", json={"lora_name": version, "lora_path": path})
        except httpx.HTTPError as error:
            raise RuntimeError(f"could not load {version} from {adapter_path}: vLLM at {self.url} did not "
                               f"answer ({error})") from None
        if response.status_code != 200 and "already" not in response.text:   # loaded by an earlier run of ours
            raise RuntimeError(f"could not load {version} from {adapter_path}: vLLM answered "
                               f"{response.status_code}: {response.text[:300]}")
        self.loaded[version] = path
        return (time.perf_counter() - started) * 1000

    def _unload(self, name: str) -> None:
        try:
            response = self.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            if response.status_code not in (200, 404):   # 404: it was not loaded (any more)
                log.warning("vLLM could not unload %s: %s %s", name, response.status_code, response.text[:200])
        except httpx.HTTPError as error:
            log.warning("vLLM could not unload %s: %s", name, error)
        self.loaded.pop(name, None)

    def _unload_unneeded(self) -> None:
        """Unload each adapter that is neither served nor the second version and has no answer left (under
        _swap_lock, so a swap cannot pick a name while it is being unloaded)."""
        with self._lock:
            needed = {self._name_of(self.version)} | \
                ({self._name_of(self.second_version)} if self.second_version is not None else set())
            unneeded = [name for name in self.loaded if name not in needed and not self.answers_on[name]]
        for name in unneeded:
            self._unload(name)
            log.info("unloaded %s from vLLM: no longer served", name)

    # -- one answer, on a pool thread --------------------------------------------------------------------
    def _answer(self, request: Request, index: int) -> None:
        state = request.state
        with self._lock:
            state["started"] += 1
            if state["started"] == 1:
                self._waiting -= 1
            self._running += 1
        try:
            if not (request.cancelled or self._stopping):
                self._stream(request, index)
        except Exception as error:   # one answer's failure fails its request, never the engine
            log.warning("vLLM answer failed: %s", error)
            state["error"] = state["error"] or f"generation failed: {error}"
        finally:
            with self._lock:
                self._running -= 1
                self.answers_on[state["names"][index]] -= 1
                state["pending"] -= 1
                last = state["pending"] == 0
                self._lock.notify_all()
            if last:
                self._finish(request)
                if not self._stopping:
                    with self._swap_lock:
                        self._unload_unneeded()

    def _stream(self, request: Request, index: int) -> None:
        """Stream one answer from vLLM into the request's events."""
        state = request.state
        with state["lock"]:   # the first answer's thread cuts the history for both
            if state["prompt"] is None:
                state["prompt"] = fit_prompt(self.tokenizer, request.messages,
                                             max(self.max_context_tokens - request.max_new_tokens, 16))
        messages, _, _, keep_end = state["prompt"]
        body = {"model": state["names"][index], "messages": messages, "n": 1, "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": request.max_new_tokens,
                "temperature": request.temperature, "top_p": request.top_p, "seed": int(request.seeds[index])}
        if request.ignore_eos:
            body["ignore_eos"] = True        # vLLM's own sampling parameter
        state["sent"] = True
        if keep_end:
            body["truncate_prompt_tokens"] = max(self.max_context_tokens - request.max_new_tokens, 16)
        response = self._send(body)
        with contextlib.closing(response):   # closed early, the connection drops: vLLM aborts the answer
            for line in response.iter_lines():
                if request.cancelled or self._stopping:
                    return
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"].get("message", chunk["error"]))
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        self._emit(request, index, text)
                    if choice.get("finish_reason"):
                        state["finish_reasons"][index] = choice["finish_reason"]
                if chunk.get("usage"):
                    state["completion_tokens"][index] = chunk["usage"].get("completion_tokens")
                    state["prompt_tokens"] = chunk["usage"].get("prompt_tokens")

    def _send(self, body: dict) -> httpx.Response:
        """The streamed response to `body`; once, a LoRA name vLLM does not know is loaded again (replicas sharing
        one vLLM server: another one unloaded it, serving another version for a few seconds)."""
        for attempt in (1, 2):
            response = self.client.send(self.client.build_request("POST", "/v1/chat/completions", json=body),
                                        stream=True)
            if response.status_code == 200:
                return response
            error = response.read().decode()[:300]
            response.close()
            name = body["model"]
            if attempt == 2 or response.status_code != 404 or name not in self.loaded:
                raise RuntimeError(f"vLLM answered {response.status_code}: {error}")
            log.warning("vLLM does not know %s (%s): loading it again", name, error)
            with self._swap_lock:
                path = self.loaded.pop(name, None)
                if path is not None:
                    self._load(path, name)

    def _emit(self, request: Request, index: int, text: str) -> None:
        state = request.state
        state["texts"][index] += text
        if state["first_token_at"] is None:
            state["first_token_at"] = time.perf_counter()
            if self.metrics is not None:
                self.metrics.first_token_seconds.observe(state["first_token_at"] - request.submitted_at)
        request.events.put(("token", index, text))

    def _finish(self, request: Request) -> None:
        state = request.state
        if state["error"] or not state["sent"] and (request.cancelled or self._stopping):
            reason = "cancelled: the client went away" if request.cancelled else "the engine stopped"
            request.events.put(("error", state["error"] or reason))
            return
        _, prompt_tokens, dropped, _ = state["prompt"]
        tokens = [count if count is not None else len(self.tokenizer.encode(text, add_special_tokens=False))
                  for count, text in zip(state["completion_tokens"], state["texts"])]
        done_at, first = time.perf_counter(), state["first_token_at"]
        result = Result(texts=list(state["texts"]), ended_with_eos=[r == "stop" for r in state["finish_reasons"]],
                        version=state["version"], seeds=list(request.seeds), prompt_messages=request.messages,
                        turns_dropped=dropped, prompt_tokens=state["prompt_tokens"] or prompt_tokens,
                        completion_tokens=tokens, latency_ms=(done_at - request.submitted_at) * 1000,
                        first_token_ms=(first - request.submitted_at) * 1000 if first else None,
                        versions=list(state["versions"]))
        if self.metrics is not None:
            self.metrics.generated_tokens.inc(sum(tokens))
        self.requests_served += 1
        request.events.put(("done", result))
