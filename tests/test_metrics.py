"""GET /metrics through a real server process (tiny model): the counters move by what was done, and no more."""
import subprocess
import sys

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_server, stop_server

PASSWORD = "s3cret-metrics"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("metrics")
    process, url = start_server(tmp, ["--no-ui"], env={"OPERATOR_PASSWORD": PASSWORD})
    yield url
    stop_server(process)


def parse(text: str) -> dict:
    """{(sample name, sorted label pairs): value} of a Prometheus text exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(url: str) -> dict:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_requests_votes_tokens_and_swaps_are_counted(server):
    before = scrape(server)
    reply = httpx.post(server + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    vote = httpx.post(server + "/v1/feedback", json={"comparison_id": reply.json()["comparison_id"], "choice": "a"})
    assert vote.status_code == 200, vote.text
    assert httpx.post(server + "/v1/chat/completions", content=b"{not json").status_code == 400
    assert httpx.get(server + "/v1/embeddings/abc123").status_code == 404
    swap = httpx.post(server + "/api/operator/serve", json={"version": "base"},
                      headers={"Authorization": f"Bearer {PASSWORD}"}, timeout=120)
    assert swap.status_code == 200, swap.text
    after = scrape(server)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    requests = "rlhf_http_requests_total"
    assert moved(requests, route="/v1/chat/completions", method="POST", status="200") == 1
    assert moved(requests, route="/v1/chat/completions", method="POST", status="400") == 1
    assert moved(requests, route="/v1/feedback", method="POST", status="200") == 1
    assert moved(requests, route="/v1/{rest:path}", method="GET", status="404") == 1   # the template, not the path
    assert moved(requests, route="/metrics", method="GET", status="200") == 1          # the first scrape
    assert not any(dict(labels).get("route", "").startswith("/v1/embeddings") for _, labels in after)
    assert moved("rlhf_http_request_duration_seconds_count", route="/v1/chat/completions", method="POST") == 2
    assert value(after, "rlhf_votes_total", choice="a") == 1 and value(after, "rlhf_votes_total", choice="b") == 0
    assert moved("rlhf_generated_tokens_total") == reply.json()["usage"]["completion_tokens"] > 0
    assert moved("rlhf_time_to_first_token_seconds_count") >= 1
    assert moved("rlhf_decode_step_rows_count") >= 1 and value(after, "rlhf_decode_step_rows_sum") >= 2
    assert moved("rlhf_hot_swaps_total") == 1 and moved("rlhf_hot_swap_pause_seconds_count") == 1
    assert ("rlhf_engine_queue_depth", ()) in after and ("rlhf_engine_rows_in_flight", ()) in after
    assert value(after, "rlhf_serving_info", version="base") == 1
    assert value(after, "rlhf_training_running") == 0


def test_a_finished_training_run_is_counted_by_outcome_and_timed(tiny_config, tmp_path):
    """The scheduler's watcher counts a run once it ends; a process that dies without reporting is `failed`."""
    from chat_app.app import build_app
    from chat_app.metrics import Metrics
    from chat_app.scheduler import RetrainScheduler

    app = build_app(tiny_config, with_scheduler=False)
    try:
        Metrics()                                        # a second registry in this process: no name clash
        scheduler = RetrainScheduler(app)
        run_id = app.store.start_run("test")
        log_path = tmp_path / "run.log"
        process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
        scheduler._watch(process, run_id, log_path, open(log_path, "w"))
        samples = parse(app.metrics.exposition().decode())
        assert value(samples, "rlhf_training_runs_total", outcome="failed") == 1
        assert value(samples, "rlhf_training_run_duration_seconds_count") == 1
        assert value(samples, "rlhf_training_runs_total", outcome="succeeded") == 0
    finally:
        app.close()
