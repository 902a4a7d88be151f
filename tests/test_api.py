"""The HTTP API through a real server process (tiny model): the official openai client, votes, bad input."""
import contextlib
import time

import httpx
import pytest

from conftest import fresh_postgres_database, start_server, stop_server

PASSWORD = "s3cret-test"


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """The server over each store backend: a SQLite file, then a PostgreSQL database (skipped without one)."""
    tmp = tmp_path_factory.mktemp("api")
    with contextlib.ExitStack() as stack:
        db = None
        if request.param == "postgresql":
            db = stack.enter_context(fresh_postgres_database(request.getfixturevalue("postgres_server")))
        process, url = start_server(tmp, ["--no-ui"], env={"OPERATOR_PASSWORD": PASSWORD}, db=db)
        yield url
        stop_server(process)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server + "/v1", api_key="unused")


def test_openai_client_gets_two_answers_and_can_vote(server, client):
    reply = client.chat.completions.create(model="anything", messages=[{"role": "user", "content": "hi"}], n=2,
                                           max_tokens=8)
    assert len(reply.choices) == 2 and reply.model == "base"
    assert reply.id.startswith("chatcmpl-")
    vote = httpx.post(server + "/v1/feedback", json={"comparison_id": reply.id, "choice": "b"})
    assert vote.status_code == 200, vote.text
    again = httpx.post(server + "/v1/feedback", json={"comparison_id": reply.id, "choice": "a"})
    assert again.status_code == 409 and "already has a vote" in again.json()["error"]["message"]
    status = httpx.get(server + "/api/status").json()
    assert status["serving_version"] == "base" and status["votes"]["b"] >= 1
    assert status["serving"]["weights"] == "packed"         # the CPU default: the packed fp32 serving copy


def test_openai_client_streams_both_answers(server, client):
    stream = client.chat.completions.create(model="base", messages=[{"role": "user", "content": "tell me"}],
                                            n=2, stream=True, max_tokens=8, temperature=1.0)
    texts, finished, ids = {0: "", 1: ""}, set(), set()
    for chunk in stream:
        ids.add(chunk.id)
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and len(ids) == 1
    assert any(texts.values())
    vote = httpx.post(server + "/v1/feedback", json={"comparison_id": ids.pop(), "choice": "tie"})
    assert vote.status_code == 200


def test_single_answer_and_models(server, client):
    reply = client.chat.completions.create(model="base", messages=[{"role": "system", "content": "be brief"},
                                                                    {"role": "user", "content": "hi"}], max_tokens=4)
    assert len(reply.choices) == 1 and reply.usage.completion_tokens <= 4
    assert client.models.list().data[0].id == "base"


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b'{"messages": []}', 400, "non-empty list"),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "role must be one of"),
    (b'{"messages": [{"role": "user", "content": "  "}]}', 400, "last user message is empty"),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', 400, "n must be 1 or 2"),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', 400, "temperature must be"),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens must be between"),
    (b'{"messages": [{"role": "user", "content": 5}]}', 400, "content must be a string"),
    (b'{"messages": [{"role": "user", "content": "' + b"x" * 10_000_000 + b'"}]}', 413, "larger than"),
])
def test_bad_completion_requests_get_a_clear_4xx(server, body, status, words):
    reply = httpx.post(server + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert reply.status_code == status and words in reply.json()["error"]["message"]


def test_a_chunked_body_over_the_cap_is_413_under_uvicorn(server):
    chunks = (b"x" * 65536 for _ in range(80))   # 5.2 MB with no Content-Length: counted as it arrives
    reply = httpx.post(server + "/v1/feedback", content=chunks)
    assert reply.status_code == 413 and "larger than" in reply.json()["error"]["message"]


@pytest.mark.parametrize("body, status, words", [
    ({"comparison_id": 999999, "choice": "a"}, 404, "No comparison"),
    ({"comparison_id": 2**64, "choice": "a"}, 400, "comparison_id must be"),
    ({"comparison_id": 1, "choice": "maybe"}, 400, "choice must be one of"),
    ({"choice": "a"}, 400, "comparison_id is required"),
    ({"comparison_id": "abc", "choice": "a"}, 400, "comparison_id must be"),
])
def test_bad_votes_get_a_clear_4xx_and_the_server_stays_up(server, body, status, words):
    reply = httpx.post(server + "/v1/feedback", json=body)
    assert reply.status_code == status and words in reply.json()["error"]["message"]
    assert httpx.get(server + "/healthz").status_code == 200


@pytest.mark.parametrize("method, path, status, words", [
    ("POST", "/api/operator/schedule", 405, "takes GET or PUT, not POST"),
    ("GET", "/v1/chat/completions", 405, "takes POST"),
    ("GET", "/v1/embeddings", 404, "no endpoint /v1/embeddings"),
    ("DELETE", "/api/nothing/here", 404, "no endpoint")])
def test_a_wrong_method_or_path_gets_our_error_shape(server, method, path, status, words):
    response = httpx.request(method, server + path)
    assert response.status_code == status and words in response.json()["error"]["message"]


@pytest.mark.parametrize("method, path", [("POST", "/api/operator/retrain"), ("POST", "/api/operator/serve"),
                                          ("GET", "/api/operator/schedule"), ("PUT", "/api/operator/schedule"),
                                          ("GET", "/api/operator/runs"), ("GET", "/api/operator/export")])
def test_operator_endpoints_refuse_without_the_password(server, method, path):
    assert httpx.request(method, server + path, json={}).status_code == 401
    wrong = httpx.request(method, server + path, json={}, headers={"Authorization": "Bearer wrong"})
    assert wrong.status_code == 401


def test_operator_endpoints_work_with_the_password(server):
    auth = {"Authorization": f"Bearer {PASSWORD}"}
    schedule = httpx.put(server + "/api/operator/schedule", json={"min_new_votes": 7, "enabled": False},
                         headers=auth)
    assert schedule.status_code == 200 and schedule.json()["min_new_votes"] == 7
    assert httpx.get(server + "/api/operator/schedule", headers=auth).json()["enabled"] is False
    bad = httpx.put(server + "/api/operator/schedule", json={"every": 3}, headers=auth)
    assert bad.status_code == 400
    missing = httpx.post(server + "/api/operator/serve", json={"version": "v42"}, headers=auth)
    assert missing.status_code == 404
    assert httpx.post(server + "/api/operator/serve", json={"version": "base"}, headers=auth).status_code == 200
    export = httpx.get(server + "/api/operator/export", headers=auth)
    assert export.status_code == 200


def test_a_dropped_stream_stops_its_sampling_and_leaves_no_half_comparison(server):
    """A client that opens streams and hangs up must not keep the engine busy: each stream asks for 1024 tokens a
    row (the tiny random model rarely ends earlier); dropped after the first text, the rows stop at once."""
    from prometheus_client.parser import text_string_to_metric_families

    def tokens_generated() -> float:
        text = httpx.get(server + "/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "rlhf_generated_tokens_total")

    before, ids = tokens_generated(), []
    body = {"messages": [{"role": "user", "content": "tell me a long story"}], "n": 2, "stream": True,
            "max_tokens": 1024, "temperature": 1.0}
    for user in range(4):
        with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30,
                          headers={"Authorization": f"Bearer dropper-{user}"}) as reply:
            for line in reply.iter_lines():
                if '"content": "' in line and '"content": ""' not in line:   # some text arrived: hang up
                    ids.append(line.split('"id": "')[1].split('"')[0])
                    break
    deadline = time.time() + 60
    while time.time() < deadline:   # the engine drains what it had: rows in flight back to 0
        rows = [s.value for f in text_string_to_metric_families(httpx.get(server + "/metrics").text)
                for s in f.samples if s.name == "rlhf_engine_rows_in_flight"]
        if rows == [0.0]:
            break
        time.sleep(0.2)
    sampled = tokens_generated() - before
    assert len(ids) == 4 and sampled < 8 * 1024 / 4, sampled   # seen: all 8 rows ran to 1024 tokens before the fix
    for completion_id in ids:                                   # the half-sampled comparison is gone, not stuck
        vote = httpx.post(server + "/v1/feedback", json={"comparison_id": completion_id, "choice": "a"})
        assert vote.status_code == 404, vote.text
