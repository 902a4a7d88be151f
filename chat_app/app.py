"""The App: built once at start-up and passed down; the only holder of long-lived state."""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chat_app.canary import Canary
from chat_app.config import Config
from chat_app.db import is_postgres
from chat_app.engine import GenerationEngine, Request
from chat_app.metrics import Metrics
from chat_app.model import load_model, load_tokenizer
from chat_app.replicas import Replicas
from chat_app.store import Store

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the UI, the API, the scheduler, the canary, the replicas and the metrics use of an engine. Two serve:
    GenerationEngine (this process owns the model, chat_app/engine.py) and VLLMEngine (a vLLM server samples and
    loads each version's LoRA adapter at run time, chat_app/vllm_engine.py); `serve.engine` picks one."""

    version: str
    """The served version; a pair's answers come from it unless they name `second_version`."""
    second_version: str | None
    """A canary trial's other version, served to the answers that name it."""
    threads: int | None
    """Serving threads from the next batch on (the scheduler lowers them while a training run shares the cores)."""
    metrics: object | None
    """chat_app.metrics.Metrics, set by Metrics.watch."""
    weights: str
    """What serves the weights, for /api/status: packed, model, bf16, or vllm."""

    def start(self) -> "Engine": ...
    def stop(self) -> None: ...
    def submit(self, messages: list[dict], n: int = 2, max_new_tokens: int = 128, temperature: float = 0.7,
               top_p: float = 0.9, seeds: list[int] | None = None, ignore_eos: bool = False,
               versions: list[str | None] | None = None) -> Request: ...
    def cancel(self, request: Request) -> None: ...
    def swap(self, adapter_path: str | None, version: str, timeout: float = 600) -> float: ...
    def set_second(self, adapter_path: str | None, version: str | None, timeout: float = 600) -> None: ...
    def queue_depth(self) -> int: ...
    def rows_in_flight(self) -> int: ...


@dataclass
class App:
    config: Config
    store: Store
    engine: Engine              # GenerationEngine (owns the policy; hot-swap is a queue message) or VLLMEngine
    scheduler: object | None = None  # chat_app.scheduler.RetrainScheduler, owns the retrain job
    canary: object | None = None     # chat_app.canary.Canary: the live A/B of a new version and its decisions
    replicas: object | None = None   # chat_app.replicas.Replicas: holds the schedule? follows the database
    serving_lock: threading.RLock = field(default_factory=threading.RLock)
    """Held while the served version changes (swap, then its record), so the sync loop never sees half of it."""
    started_at: float = field(default_factory=time.time)
    metrics: Metrics = field(default_factory=Metrics)   # this app's own Prometheus registry, served at /metrics

    def __post_init__(self):
        self.metrics.watch(self)   # the engine reports steps and swaps; queue depth and version read at scrape

    @property
    def operator_password(self) -> str | None:
        return os.environ.get(self.config.serve.operator_password_env) or None

    def serving_version(self) -> str:
        return self.engine.version

    @property
    def is_schedule_holder(self) -> bool:
        """Whether this replica runs the retrain schedule and the canary's decisions (always, on SQLite)."""
        return self.replicas is None or self.replicas.is_holder

    def close(self):
        if self.replicas is not None:
            self.replicas.stop()   # first: the lock frees, another replica takes the schedule
        if self.canary is not None:
            self.canary.stop()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        self.engine.stop()
        self.store.close()


def serving_threads(config: Config, training: bool) -> int:
    """Torch threads for serving: oversubscribed cores made a decode step ~10x slower (DESIGN.md, Serving)."""
    if config.model.torch_threads:
        return config.model.torch_threads
    cores = os.cpu_count() or 1
    return max(1, cores - config.schedule.trainer_threads) if training else cores


def engine_weights(config: Config) -> str:
    """Packed and bf16 copies are CPU paths; on CUDA the model serves as loaded (bf16, or 4-bit bitsandbytes).
    `auto` is resolved by the engine, from the loaded model (`engine.resolve_weights`)."""
    on_gpu = config.model.quantization != "none" or torch.cuda.is_available() and config.model.device != "cpu"
    if config.serve.weights in ("bf16", "packed") and on_gpu:
        log.warning("serve.weights=%s is for CPU serving; serving the model as loaded", config.serve.weights)
        return "model"
    return config.serve.weights


def engine_merges(config: Config) -> bool:
    """Merge adapters into a serving copy, except over a quantized base: merging into 4-bit weights requantizes
    them, and a trained LoRA delta is small beside NF4's steps. Measured on SmolLM2 with a real v1 adapter: the
    merged 4-bit model was 0.25 nats/token from the adapter it came from, whose whole effect was 0.27 nats/token
    from the base. So over a quantized base LoRA serves unmerged."""
    return config.serve.merge_adapters and config.model.quantization == "none"


def build_engine(config: Config, tokenizer) -> Engine:
    """The engine `serve.engine` names, started on the base: this process's own, or a vLLM server's (which must
    answer now: VLLMUnavailable, one line, if not)."""
    if config.serve.engine == "vllm":
        from chat_app.vllm_engine import VLLMEngine

        return VLLMEngine(config.serve.vllm_url, tokenizer, model=config.serve.vllm_model,
                          max_context_tokens=config.model.max_context_tokens,
                          max_concurrent_answers=2 * config.serve.max_batch_requests,   # vLLM batches them
                          max_queued_requests=config.limits.max_queued_requests).start()
    model = load_model(config.model, tokenizer)
    return GenerationEngine(model, tokenizer, max_context_tokens=config.model.max_context_tokens,
                            max_batch_requests=config.serve.max_batch_requests,
                            weights=engine_weights(config),
                            merge_adapters=engine_merges(config),
                            max_queued_requests=config.limits.max_queued_requests).start()


def build_app(config: Config, with_scheduler: bool = True) -> App:
    """Open the store, start the engine (loading the model, or reaching the vLLM server), serve the version the
    store says is serving."""
    torch.set_num_threads(serving_threads(config, training=False))
    store = Store(config.serve.db_path)
    engine = build_engine(config, load_tokenizer(config.model))
    serving = store.serving_version()
    if serving is not None:
        try:
            engine.swap(serving["adapter_path"], serving["id"])
        except RuntimeError as error:  # a missing adapter folder must not stop the app: serve the base
            log.error("could not restore %s (%s); serving base", serving["id"], error)
            if not is_postgres(config.serve.db_path):   # one replica's missing folder must not roll back them all
                store.mark_serving("base", actor="startup", action="restore-failed")
    app = App(config=config, store=store, engine=engine)
    app.replicas = Replicas(app)       # on PostgreSQL: tries for the schedule's lock now (on SQLite: holds it)
    app.canary = Canary(app).start()   # restores a trial in progress: its other version loads beside the served one
    if with_scheduler:
        from chat_app.scheduler import RetrainScheduler

        app.scheduler = RetrainScheduler(app)
        app.scheduler.start()
    app.replicas.start()               # on PostgreSQL: follow the database, take the schedule when it frees
    return app
