"""Prometheus metrics: one registry per App, fed by the engine, the scheduler and an HTTP middleware; GET /metrics."""
from __future__ import annotations

import time
from datetime import datetime

from fastapi import FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily

METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"}
# Seconds; CPU decode is ~50-700 ms a step, so the first token can take seconds behind a queue.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
SWAP_BUCKETS = (0.0001, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5)   # a prepared swap is one assignment: ~0 ms
RUN_BUCKETS = (30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200)


class Metrics:
    """One app's metrics in its own CollectorRegistry, so several apps in one process (tests) do not collide."""

    def __init__(self):
        self.registry = registry = CollectorRegistry()
        self.http_requests = Counter("rlhf_http_requests", "HTTP requests by route template, method and status",
                                     ["route", "method", "status"], registry=registry)
        self.http_seconds = Histogram("rlhf_http_request_duration_seconds", "HTTP request time to the last body "
                                      "byte (a stream counts whole)", ["route", "method"], registry=registry,
                                      buckets=LATENCY_BUCKETS)
        self.first_token_seconds = Histogram("rlhf_time_to_first_token_seconds", "Engine submit to the first "
                                             "streamed text of a request (UI and API alike)", registry=registry,
                                             buckets=LATENCY_BUCKETS)
        self.step_rows = Histogram("rlhf_decode_step_rows", "Rows (answers) sampled together in one decode step",
                                   registry=registry, buckets=ROW_BUCKETS)
        self.step_seconds = Histogram("rlhf_decode_step_duration_seconds", "Time of one decode step",
                                      registry=registry, buckets=STEP_BUCKETS)
        self.generated_tokens = Counter("rlhf_generated_tokens", "Answer tokens sampled (rate() gives tokens/s)",
                                        registry=registry)
        self.hot_swaps = Counter("rlhf_hot_swaps", "Versions swapped into the running engine", registry=registry)
        self.swap_pause_seconds = Histogram("rlhf_hot_swap_pause_seconds", "How long a hot-swap paused serving",
                                            registry=registry, buckets=SWAP_BUCKETS)
        self.training_runs = Counter("rlhf_training_runs", "Finished training runs by outcome (the run's status: "
                                     "succeeded, rejected, skipped, failed)", ["outcome"], registry=registry)
        self.training_seconds = Histogram("rlhf_training_run_duration_seconds", "Wall time of a training run",
                                          registry=registry, buckets=RUN_BUCKETS)

    def watch(self, app) -> None:
        """Read `app` at scrape time (queue depth, serving version, votes) and have its engine report to us."""
        app.engine.metrics = self
        self.registry.register(AppCollector(app))

    # -- the engine thread, the scheduler and the middleware call these ----------------------
    def decode_step(self, rows: int, tokens: int, seconds: float) -> None:
        self.step_rows.observe(rows)
        self.step_seconds.observe(seconds)
        self.generated_tokens.inc(tokens)

    def hot_swap(self, pause_seconds: float) -> None:
        self.hot_swaps.inc()
        self.swap_pause_seconds.observe(pause_seconds)

    def training_run(self, run: dict) -> None:
        """Count a finished run (a store row) by its status and time it from started_at to ended_at."""
        self.training_runs.labels(outcome=run["status"]).inc()
        if run.get("started_at") and run.get("ended_at"):
            seconds = datetime.fromisoformat(run["ended_at"]) - datetime.fromisoformat(run["started_at"])
            self.training_seconds.observe(seconds.total_seconds())

    def http_request(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"      # a client picks the method: bound it
        self.http_requests.labels(route=route, method=method, status=str(status)).inc()
        self.http_seconds.labels(route=route, method=method).observe(seconds)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class AppCollector:
    """Values the app already holds, read when scraped rather than mirrored (they cannot drift)."""

    def __init__(self, app):
        self.app = app

    def collect(self):
        engine = self.app.engine
        yield GaugeMetricFamily("rlhf_engine_queue_depth", "Requests waiting for the engine to admit them",
                                value=engine.queue_depth())
        yield GaugeMetricFamily("rlhf_engine_rows_in_flight", "Answers being decoded now (all versions)",
                                value=engine.rows_in_flight())
        yield InfoMetricFamily("rlhf_serving", "The version the engine serves", value={"version": engine.version})
        # Votes from feedback.db, not a process counter: UI and API votes both land there, and a restart keeps them.
        votes = CounterMetricFamily("rlhf_votes", "Votes recorded in feedback.db by choice", labels=["choice"])
        counts = self.app.store.vote_counts()
        for choice in ("a", "b", "tie", "both_bad"):
            votes.add_metric([choice], counts[choice])
        yield votes
        scheduler = self.app.scheduler
        yield GaugeMetricFamily("rlhf_training_running", "1 while a training run is in progress",
                                value=int(scheduler is not None and scheduler.is_running()))


class HttpMetrics:
    """ASGI middleware: count and time each HTTP request by its route template (bounded labels), to the last byte."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500   # 500 unless a response starts: an exception escaped

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            # routing stores the matched route in the scope; the innermost wins (a Gradio route under the mount)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.http_request(route, scope["method"], status, time.perf_counter() - started)


def register_metrics(api: FastAPI, metrics: Metrics) -> None:
    """GET /metrics, public and read-only like /api/status (scrapers send no auth; the app binds to localhost)."""
    api.add_middleware(HttpMetrics, metrics=metrics)

    @api.get("/metrics", include_in_schema=False)
    def scrape():   # sync: FastAPI runs it in a thread, and the scrape reads SQLite
        return Response(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
