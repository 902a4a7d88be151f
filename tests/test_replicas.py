"""Several replicas, one loop (chat_app/replicas.py): two real servers on one PostgreSQL database and one adapters
folder share the votes, serve the same versions and trials, and hand the schedule over when its holder dies."""
from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import torch

from conftest import TINY, fresh_postgres_database, start_server, stop_server

AUTH = {"Authorization": "Bearer pw"}
FAST = ["--no-ui", "--set", "serve.sync_every_seconds=0.5", "--set", "serve.schedule_lock_retry_seconds=0.5",
        "--set", "limits.requests_per_minute=0", "--set", "limits.votes_per_minute=0",
        "--set", "canary.share=1.0", "--set", "canary.min_votes=4"]


def save_random_adapters(folder, names: list[str]) -> dict[str, str]:
    """A LoRA adapter with random weights for the tiny model per name (answers differ from the base's)."""
    from peft import LoraConfig, get_peft_model

    from chat_app.config import load_config
    from chat_app.model import load_model, load_tokenizer

    config = load_config(TINY)
    tokenizer = load_tokenizer(config.model)
    paths = {}
    for seed, name in enumerate(names):
        torch.manual_seed(seed)
        model = get_peft_model(load_model(config.model, tokenizer),
                               LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj"],
                                          init_lora_weights=False))
        model.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def wait_for(condition, what: str, timeout: float = 20.0) -> float:
    """Seconds until `condition()` is true; fails after `timeout`."""
    started = time.perf_counter()
    while not condition():
        assert time.perf_counter() - started < timeout, f"not within {timeout:.0f} s: {what}"
        time.sleep(0.1)
    return time.perf_counter() - started


def status(url: str) -> dict:
    return httpx.get(url + "/api/status", timeout=10).json()


def chat(url: str, n: int = 2) -> dict:
    response = httpx.post(url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hello"}], "n": n, "max_tokens": 2})
    assert response.status_code == 200, response.text
    return response.json()


def vote(url: str, comparison_id: int, choice: str) -> httpx.Response:
    return httpx.post(url + "/v1/feedback", json={"comparison_id": comparison_id, "choice": choice}, timeout=10)


def test_the_schedule_lock_has_one_holder_per_database_and_frees_when_its_session_ends(postgres_server):
    from chat_app.db import AdvisoryLock

    with fresh_postgres_database(postgres_server) as one, fresh_postgres_database(postgres_server) as two:
        first, second, elsewhere = AdvisoryLock(one, "schedule"), AdvisoryLock(one, "schedule"), \
            AdvisoryLock(two, "schedule")
        try:
            assert first.try_acquire() and not second.try_acquire()
            assert first.try_acquire() and not second.try_acquire()    # held stays held; the other keeps trying
            assert elsewhere.try_acquire()                             # another database: its own schedule
            first.release()                                            # a clean shutdown unlocks at once
            assert second.try_acquire() and not first.try_acquire()
        finally:
            for lock in (first, second, elsewhere):
                lock.release()


def test_two_replicas_share_votes_versions_and_trials_and_the_schedule_moves_when_its_holder_dies(
        postgres_server, tmp_path):
    from chat_app.store import Store

    shared = tmp_path / "adapters"   # one adapters folder, one database, two processes
    timeline = {}
    with fresh_postgres_database(postgres_server) as db:
        store = Store(db)
        for name, path in save_random_adapters(shared, ["v1", "v2"]).items():
            store.add_version(name, path, parent="base", run_id=None, metrics={}, status="candidate")
        for name in ("one", "two"):
            (tmp_path / name).mkdir()
        args = [*FAST, "--set", f"serve.adapters_dir={shared}"]
        with ThreadPoolExecutor(2) as pool:   # both start at once: the lock, not the order, picks the holder
            starting = [pool.submit(start_server, tmp_path / name, args, {"OPERATOR_PASSWORD": "pw"}, db)
                        for name in ("one", "two")]
        servers = [s.result() for s in starting if s.exception() is None]
        try:
            assert len(servers) == 2, [s.exception() for s in starting]
            holders = [status(url)["schedule_holder"] for _, url in servers]
            assert sorted(holders) == [False, True], holders              # exactly one holds the schedule
            (process_a, a), (_, b) = sorted(servers, key=lambda s: not status(s[1])["schedule_holder"])

            # 1. a vote through A is seen through B; a comparison made on A takes its vote through B
            votes_before = status(b)["votes"]["total"]
            assert vote(a, chat(a)["comparison_id"], "a").status_code == 200
            timeline["vote through A seen on B"] = wait_for(
                lambda: status(b)["votes"]["total"] == votes_before + 1, "B counts A's vote")
            assert vote(b, chat(a)["comparison_id"], "b").status_code == 200
            assert status(a)["votes"]["total"] == votes_before + 2

            # 2. an operator serves v1 through A: both serve it, and B's answers name it
            started = time.perf_counter()
            served = httpx.post(a + "/api/operator/serve", json={"version": "v1"}, headers=AUTH, timeout=60)
            assert served.status_code == 200, served.text
            wait_for(lambda: all(status(url)["serving_version"] == "v1" for url in (a, b)), "both serve v1")
            timeline["v1 served by both after the operator's call"] = time.perf_counter() - started
            assert chat(b)["model"] == "v1" and chat(b, n=1)["model"] == "v1"

            # 3. a trial started through B (the follower); its votes go through B only; A, the holder, decides
            refused = httpx.post(b + "/api/operator/retrain", headers=AUTH, timeout=10)
            assert refused.status_code == 409 and "another replica" in refused.json()["message"]
            started = time.perf_counter()
            trial = httpx.post(b + "/api/operator/canary", json={"action": "start", "version": "v2"}, headers=AUTH,
                               timeout=60)
            assert trial.status_code == 200, trial.text
            wait_for(lambda: (status(a)["canary"]["trial"] or {}).get("candidate") == "v2", "A follows B's trial")
            trial_votes = 0
            while trial_votes < 4:                                         # canary.min_votes: all for v2
                comparison = store.comparison(chat(b)["comparison_id"])
                sides = comparison["version_a"], comparison["version_b"]
                assert set(sides) == {"v1", "v2"}, sides                   # canary.share 1: every pair a trial one
                assert vote(b, comparison["id"], "a" if sides[0] == "v2" else "b").status_code == 200
                trial_votes += 1
            wait_for(lambda: all(status(url)["serving_version"] == "v2" for url in (a, b)), "both serve v2")
            timeline["v2 promoted by B's votes, served by both after the trial began"] = \
                time.perf_counter() - started
            promote = [e for e in store.serving_events() if e["action"] == "canary-promote"]
            assert [(e["version"], e["actor"]) for e in promote] == [("v2", "votes")]
            assert promote[0]["details"]["comparisons"] == 4
            assert status(b)["canary"]["trial"]["phase"] == "watch"

            # 4. the holder dies: the schedule moves to B
            process_a.kill()
            process_a.wait()
            timeline["schedule moved to B after SIGKILL of A"] = wait_for(
                lambda: status(b)["schedule_holder"], "B takes the schedule")
            schedule = httpx.get(b + "/api/operator/schedule", headers=AUTH, timeout=10).json()
            assert schedule["schedule_holder"]                             # its checks now decide (no run here)
            assert store.get_setting("schedule_holder")["replica"].split(" ")[0].endswith(b.rsplit(":", 1)[1])
        finally:
            for process, _ in servers:
                stop_server(process)
            store.close()
    print("\nreplicas timeline: " + "; ".join(f"{k} {v:.1f} s" for k, v in timeline.items()), file=sys.stderr)
