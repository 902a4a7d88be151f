"""An acknowledged vote survives the server being killed outright (SIGKILL: no shutdown, no checkpoint)."""
import signal

import httpx

from conftest import start_server, stop_server

from chat_app.store import Store

PASSWORD = "durable-test"


def test_votes_acknowledged_just_before_a_sigkill_are_there_after_a_restart(tmp_path):
    process, url = start_server(tmp_path, ["--no-ui"])
    votes = {}
    try:
        for i, choice in enumerate(["a", "b", "tie", "both_bad", "b"]):
            reply = httpx.post(url + "/v1/chat/completions", timeout=60, json={
                "messages": [{"role": "user", "content": f"question {i}"}], "n": 2, "max_tokens": 4})
            assert reply.status_code == 200, reply.text
            comparison_id = int(reply.json()["id"].removeprefix("chatcmpl-"))
            vote = httpx.post(url + "/v1/feedback", json={"comparison_id": comparison_id, "choice": choice})
            assert vote.status_code == 200, vote.text
            votes[comparison_id] = choice
    finally:
        process.send_signal(signal.SIGKILL)   # right after the last 200: nothing gets to flush or close
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    process, url = start_server(tmp_path, ["--no-ui"], env={"OPERATOR_PASSWORD": PASSWORD})
    try:
        counts = httpx.get(url + "/api/status").json()["votes"]
        assert counts["total"] == len(votes) and counts["b"] == 2
        export = httpx.get(url + "/api/operator/export", headers={"Authorization": f"Bearer {PASSWORD}"})
        assert export.status_code == 200 and len(export.text.splitlines()) == 3   # the A/B votes as pairs
    finally:
        stop_server(process)
    store = Store(tmp_path / "feedback.db")
    assert {cid: store.comparison(cid)["choice"] for cid in votes} == votes
    store.close()
