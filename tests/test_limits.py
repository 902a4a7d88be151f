"""Each limit of chat_app/limits.py and the engine's queue bound, on the tiny app with small limits."""
from __future__ import annotations

import logging
import threading

import pytest

from conftest import in_process_app

SMALL = ["limits.max_body_bytes=4000", "limits.max_message_chars=100", "limits.max_turns=3",
         "limits.requests_per_minute=5", "limits.requests_in_flight=1", "limits.votes_per_minute=2",
         "limits.max_queued_requests=2", "serve.max_new_tokens_limit=4"]
HI = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, client = in_process_app(tmp_path_factory.mktemp("limits"), SMALL)
    yield app, client
    app.close()


def key(name: str) -> dict:
    """A client of its own: each test throttles a different key, so tests do not see each other's counts."""
    return {"Authorization": f"Bearer {name}"}


def error(response, status: int) -> str:
    assert response.status_code == status, response.text[:300]
    return response.json()["error"]["message"]


def test_a_body_over_the_cap_is_413_declared_or_not(served):
    _, client = served
    assert "larger than 4000 bytes" in error(client.post("/v1/chat/completions", content=b"x" * 5000), 413)
    chunks = (b"x" * 1000 for _ in range(5))   # a generator: sent chunked, with no Content-Length
    assert "larger than" in error(client.post("/v1/feedback", content=chunks), 413)
    # operator routes too, before the password is even looked at
    assert "larger than" in error(client.put("/api/operator/schedule", content=b"x" * 5000), 413)


def test_long_messages_and_long_conversations_are_400(served):
    _, client = served
    long = {"messages": [{"role": "user", "content": "x" * 101}]}
    assert "101 characters; the most is 100" in error(client.post("/v1/chat/completions", json=long,
                                                                  headers=key("long")), 400)
    turns = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}] * 2}
    assert "at most 3 messages" in error(client.post("/v1/chat/completions", json=turns, headers=key("long")), 400)
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * 60}] * 2}]}   # joined: 120
    assert "120 characters" in error(client.post("/v1/chat/completions", json=parts, headers=key("long")), 400)


def test_the_chat_page_refuses_what_the_api_refuses():
    from chat_app.chat import turn_refusal
    from chat_app.config import LimitsConfig

    limits = LimitsConfig(max_message_chars=100, max_turns=3)
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert turn_refusal(history, "x" * 100, limits) is None
    assert "101 characters; the most is 100" in turn_refusal(history, "x" * 101, limits)
    assert "press New chat" in turn_refusal([*history, *history[:1]], "again", limits)
    assert turn_refusal(history * 10, "x" * 10**5, LimitsConfig(max_message_chars=0, max_turns=0)) is None


def test_requests_per_minute_are_capped_per_client(served, caplog):
    _, client = served
    for _ in range(5):
        assert client.get("/v1/models", headers=key("busy-key")).status_code == 200
    with caplog.at_level(logging.WARNING, logger="chat_app.limits"):
        refused = client.get("/v1/models", headers=key("busy-key"))
    assert "5 requests a minute" in error(refused, 429)
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    line = caplog.records[-1].getMessage()
    assert "requests_per_minute" in line and "/v1/models" in line and "busy-key" not in line   # the key is hashed
    # another key, and the address itself, are other clients
    assert client.get("/v1/models", headers=key("calm-key")).status_code == 200
    assert client.get("/v1/models").status_code == 200


def test_requests_in_flight_are_capped_per_client(served, monkeypatch):
    from chat_app.engine import Request, Result

    app, client = served
    held = []
    monkeypatch.setattr(app.engine, "submit", lambda messages, **kw: held.append(Request(messages)) or held[-1])
    answer = {}
    first = threading.Thread(target=lambda: answer.update(
        response=client.post("/v1/chat/completions", json=HI, headers=key("slow-key"))))
    first.start()
    while not held:   # the first request waits in the (stand-in) engine
        first.join(0.01)
    refused = client.post("/v1/chat/completions", json=HI, headers=key("slow-key"))
    assert "at most 1 requests at once" in error(refused, 429) and refused.headers["Retry-After"] == "1"
    assert client.get("/v1/models", headers=key("other-key")).status_code == 200
    held[0].events.put(("done", Result(["ok"], [True], "base", [1], [], 0, 1, [1], 1.0, 1.0)))
    first.join(10)
    assert answer["response"].status_code == 200
    assert client.get("/v1/models", headers=key("slow-key")).status_code == 200   # released


def test_votes_per_minute_are_capped_per_client(served):
    _, client = served
    vote = {"comparison_id": 999_999, "choice": "a"}
    for _ in range(2):   # unknown comparisons: 404, but attempts count
        assert client.post("/v1/feedback", json=vote, headers=key("voter-key")).status_code == 404
    refused = client.post("/v1/feedback", json=vote, headers=key("voter-key"))
    assert "2 votes a minute" in error(refused, 429) and int(refused.headers["Retry-After"]) >= 1
    assert client.post("/v1/feedback", json=vote, headers=key("voter-2")).status_code == 404


def test_a_full_engine_queue_is_503_with_retry_after(served, monkeypatch):
    from chat_app.chat import start_pair
    from chat_app.engine import EngineBusy

    app, client = served
    monkeypatch.setattr(app.engine, "queue_depth", lambda: 2)   # max_queued_requests=2 are waiting
    count = lambda: app.store.db.execute("SELECT COUNT(*) FROM comparisons").fetchone()[0]   # noqa: E731
    before = count()
    for n in (1, 2):
        refused = client.post("/v1/chat/completions", json={**HI, "n": n}, headers=key(f"queue-{n}"))
        assert "server is busy" in error(refused, 503) and refused.headers["Retry-After"] == "10"
    with pytest.raises(EngineBusy, match="try again"):   # what the chat page shows, in its "could not ask" notice
        start_pair(app.store, app.engine, HI["messages"], source="ui", max_new_tokens=2, temperature=1.0, top_p=1.0)
    assert count() == before   # no half comparison left behind


def test_the_engine_refuses_past_its_queue_bound(served):
    from chat_app.engine import EngineBusy, GenerationEngine

    app, _ = served
    engine = GenerationEngine(app.engine.base_model, app.engine.tokenizer, max_context_tokens=64,
                              max_queued_requests=2)   # not started: what is submitted stays queued
    for _ in range(2):
        engine.submit(HI["messages"], n=2, max_new_tokens=2)
    with pytest.raises(EngineBusy, match="2 requests are waiting") as busy:
        engine.submit(HI["messages"], n=2, max_new_tokens=2)
    assert busy.value.retry_after_s == 10 and engine.queue_depth() == 2


def test_the_window_slides_and_forgets_idle_clients():
    from chat_app.config import LimitsConfig
    from chat_app.limits import ClientLimiter, Refused

    now = [0.0]
    limiter = ClientLimiter(LimitsConfig(requests_per_minute=2), clock=lambda: now[0])
    for t in (0.0, 30.0):
        now[0] = t
        limiter.acquire("a", is_vote=False)
        limiter.release("a")
    with pytest.raises(Refused) as refused:
        limiter.acquire("a", is_vote=False)
    assert refused.value.retry_after_s == 30
    now[0] = 60.5   # the first request left the window
    limiter.acquire("a", is_vote=False)
    limiter.release("a")
    now[0] = 200.0
    limiter.acquire("b", is_vote=False)
    assert "a" not in limiter.requests and "a" not in limiter.in_flight


def test_limits_are_validated_like_any_config_key():
    from chat_app.config import ConfigError, load_config

    assert load_config(None, ["limits.votes_per_minute=5"]).limits.votes_per_minute == 5
    with pytest.raises(ConfigError, match="limits.votes_per_minute"):
        load_config(None, ["limits.votes_per_minute=many"])
    with pytest.raises(ConfigError, match="limits.max_turns: expected 0"):
        load_config(None, ["limits.max_turns=-1"])
    with pytest.raises(ConfigError, match="limits.per_hour"):
        load_config(None, ["limits.per_hour=5"])
