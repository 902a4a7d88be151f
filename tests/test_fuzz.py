"""Malformed input on every route is a 4xx in our error shape, never a 500: named cases, then a hypothesis fuzzer.

The fuzzer sends random JSON of random shapes, valid bodies with fields replaced by random JSON, and random bytes
to the tiny app in-process; answers stay cheap (serve.max_new_tokens_limit=4). `pytest -s` prints the count.
"""
from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import in_process_app

PASSWORD = "fuzz-password"
AUTH = {"Authorization": f"Bearer {PASSWORD}"}
VALID = {   # (method, path) -> a body that route accepts
    ("POST", "/v1/chat/completions"): {"model": "base", "messages": [{"role": "system", "content": "be brief"},
                                                                     {"role": "user", "content": "hi"}],
                                       "n": 2, "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "stream": False,
                                       "stop": None},
    ("POST", "/v1/feedback"): {"comparison_id": "chatcmpl-1", "choice": "a", "voter": "fuzz"},
    ("PUT", "/api/operator/schedule"): {"enabled": False, "retrain_every_minutes": 30, "min_new_votes": 20},
    ("POST", "/api/operator/serve"): {"version": "v1"},
}
# routes that read no body still get random ones; retrain goes without the password (it would start a real run)
ROUTES = [*VALID, ("GET", "/v1/models"), ("GET", "/api/status"), ("POST", "/api/operator/retrain"),
          ("GET", "/api/operator/schedule"), ("GET", "/api/operator/runs"), ("GET", "/api/operator/versions"),
          ("GET", "/api/operator/export"), ("GET", "/healthz")]
sent = Counter()   # answers by status code

# strings with any code point, lone surrogates included (json.dumps writes them as "\ud800" escapes)
texts = st.text(st.characters(codec=None, exclude_categories=()), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(min_value=2**62) | st.floats() | texts,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=16)


@pytest.fixture(scope="module")
def served(tmp_path_factory, monkeypatch_module):
    from chat_app.scheduler import RetrainScheduler

    monkeypatch_module.setenv("OPERATOR_PASSWORD", PASSWORD)
    app, client = in_process_app(tmp_path_factory.mktemp("fuzz"), [
        "serve.max_new_tokens_limit=4", "limits.requests_per_minute=0", "limits.votes_per_minute=0",
        "limits.requests_in_flight=0"])
    app.scheduler = RetrainScheduler(app)   # not started: schedule changes are stored, no job runs
    yield app, client
    print(f"\nfuzz: {sum(sent.values())} requests, none answered 5xx; by status: {dict(sorted(sent.items()))}")
    app.close()


@pytest.fixture
def client(served):
    return served[1]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def send(client, method: str, path: str, content: bytes):
    headers = {"content-type": "application/json", **(AUTH if path.startswith("/api/operator/") and
                                                       not path.endswith("retrain") else {})}
    response = client.request(method, path, content=content, headers=headers)
    sent[response.status_code] += 1
    assert response.status_code < 500, (method, path, content[:300], response.text[:300])
    if response.status_code >= 400:
        assert "error" in response.json(), response.text[:300]
    return response


# -- the kinds of input that were a 500 or wrongly accepted -------------------------------------
def chat(content) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": content}], "max_tokens": 2}).encode()


@pytest.mark.parametrize("path, body, status, words", [
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),   # was RecursionError
    ("/v1/feedback", b'{"comparison_id": 18446744073709551616, "choice": "a"}', 400, "2^63-1"),  # SQLite overflow
    ("/v1/feedback", b'{"comparison_id": "chatcmpl-\xc2\xb2", "choice": "a"}', 400, "comparison_id must"),  # "2"
    ("/v1/chat/completions", chat("x" * 10_000_000), 413, "larger than"),
    ("/v1/chat/completions", chat(5), 400, "messages[0].content must be a string"),  # was stringified: "5"
    ("/v1/chat/completions", chat({"text": "hi"}), 400, "content must be"),           # a dict without a type
    ("/v1/chat/completions", chat([["hi"]]), 400, "content must be"),                 # nested lists
    ("/v1/chat/completions", chat([{"type": "image_url", "image_url": {"url": "x"}}]), 400, "content must be"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "not valid JSON"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\xff"}]}', 400, "not valid JSON"),
    ("/v1/chat/completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),   # > 4300 digits
    ("/v1/chat/completions", chat("hi")[:-1] + b', "temperature": NaN}', 400, "temperature must be"),
    ("/v1/chat/completions", chat("hi")[:-1] + b', "max_tokens": 1e999}', 400, "max_tokens must be"),
    ("/v1/chat/completions", chat("hi")[:-1] + b', "messages": [{"role": ["user"]}]}', 400, "role must be"),
    ("/v1/chat/completions", chat("hi")[:-1] + b', "tools": [{"type": "function"}]}', 400, "tools is not supported"),
    ("/v1/chat/completions", chat("hi")[:-1] + b', "stop": ["\\n"]}', 400, "stop is not supported"),   # was ignored
    ("/api/operator/schedule", b'{"retrain_every_minutes": 1e999}', 400, "at most a week"),   # overflowed APScheduler
    ("/api/operator/schedule", b'{"retrain_every_minutes": NaN}', 400, "at most a week"),
    ("/v1/chat/completions", chat("hi").decode().encode("utf-16"), 400, "not valid JSON in UTF-8"),  # was accepted
    ("/v1/chat/completions", chat("a\u0000b"), 400, "NUL character"),      # PostgreSQL's text cannot hold it
    ("/v1/feedback", b'{"comparison_id": 1, "choice": "a", "voter": "x\\u0000"}', 400, "voter must be"),
    ("/v1/chat/completions", chat("hi")[:-1] + b', "max_tokens": ' + b"9" * 4000 + b"}", 400, "got an integer of 4000 digits"),
])
def test_each_kind_of_bad_input_is_a_clear_4xx(client, path, body, status, words):
    method = "PUT" if path == "/api/operator/schedule" else "POST"
    response = send(client, method, path, body)
    assert response.status_code == status and words in response.json()["error"]["message"], response.text[:300]


def test_text_parts_are_still_accepted(client):
    body = chat([{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}])
    assert send(client, "POST", "/v1/chat/completions", body).status_code == 200


def test_an_unexpected_error_is_still_a_json_500(served, monkeypatch):
    from starlette.testclient import TestClient

    app, client = served

    def broken():
        raise KeyError("a bug")

    monkeypatch.setattr(app.store, "versions", broken)
    response = TestClient(client.app, raise_server_exceptions=False).get("/v1/models")
    assert response.status_code == 500 and response.json()["error"]["type"] == "server_error"


# -- the fuzzer ------------------------------------------------------------------------------------
def paths_in(value, prefix=()):
    """Every (key or index) path in a JSON value, the value itself first."""
    yield prefix
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield from paths_in(child, (*prefix, key))


@st.composite
def mutated_bodies(draw):
    route = draw(st.sampled_from(list(VALID)))
    body = copy.deepcopy(VALID[route])
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in paths_in(body) if p]
        if not paths:   # every field deleted
            break
        path = draw(st.sampled_from(paths))
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()) and isinstance(parent, dict):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(json_values)
    return route, json.dumps(body).encode()


FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                        HealthCheck.too_slow])


@FUZZ
@given(route=st.sampled_from(ROUTES), body=json_values)
def test_random_json_is_never_a_500(client, route, body):
    send(client, *route, json.dumps(body).encode())


@FUZZ
@given(case=mutated_bodies())
def test_valid_bodies_with_a_field_replaced_are_never_a_500(client, case):
    (method, path), body = case
    send(client, method, path, body)


@FUZZ
@given(route=st.sampled_from(ROUTES), body=st.binary(max_size=200))
def test_random_bytes_are_never_a_500(client, route, body):
    send(client, *route, body)
