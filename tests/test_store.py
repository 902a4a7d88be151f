import json
import sqlite3
import subprocess
import sys

import pytest

from chat_app.store import Store


def make_pair(store, answers=("first", "second")):
    cid = store.create_comparison(prompt_messages=[{"role": "user", "content": "hi"}],
                                  sampling={"temperature": 0.7}, source="test", seeds=[1, 2])
    store.complete_comparison(cid, answer_a=answers[0], answer_b=answers[1], policy_version="base",
                              latency_ms=12.0, ended_with_eos=(True, False))
    return cid


def test_schema_is_created_from_an_empty_file_with_wal(tmp_path):
    store = Store(tmp_path / "new.db")
    assert store.schema_versions() == ["m001_initial", "m002_canary_trials"]
    conn = sqlite3.connect(tmp_path / "new.db")        # readable by any SQLite tool
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"conversations", "messages", "comparisons", "demonstrations", "policy_versions", "training_runs",
            "settings"} <= tables
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    assert Store(tmp_path / "new.db").schema_versions() == ["m001_initial", "m002_canary_trials"]   # reopening applies nothing twice


def test_a_vote_is_stored_once_and_a_second_is_refused(store):
    cid = make_pair(store)
    assert store.record_vote(cid, "a", "alice") == "ok"
    assert store.record_vote(cid, "b", "bob") == "duplicate"
    assert store.record_vote(cid + 100, "a", "alice") == "unknown"
    row = store.comparison(cid)
    assert (row["choice"], row["voter"], row["policy_version"]) == ("a", "alice", "base")
    assert store.vote_counts()["total"] == 1


def test_a_pair_still_sampling_cannot_be_voted_on(store):
    cid = store.create_comparison(prompt_messages=[{"role": "user", "content": "hi"}], sampling={}, source="t")
    assert store.record_vote(cid, "a", "x") == "incomplete"


def test_bad_choice_is_an_error(store):
    with pytest.raises(ValueError, match="choice must be one of"):
        store.record_vote(make_pair(store), "c", "x")


def test_preference_pairs_skip_ties_and_orient_chosen(store):
    store.record_vote(make_pair(store, ("x", "y")), "b", None)
    store.record_vote(make_pair(store, ("p", "q")), "tie", None)
    store.record_vote(make_pair(store, ("m", "n")), "both_bad", None)
    pairs = store.preference_pairs()
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("y", "x")]
    exported = store.export_preferences()
    assert exported[0]["chosen"] == [{"role": "assistant", "content": "y"}]
    assert exported[0]["prompt"] == [{"role": "user", "content": "hi"}]


def test_an_acknowledged_vote_survives_a_killed_process(tmp_path):
    db = tmp_path / "kill.db"
    store = Store(db)
    cid = make_pair(store)
    store.close()
    code = (f"import os; from chat_app.store import Store; s = Store({str(db)!r}); "
            f"print(s.record_vote({cid}, 'b', 'k'), flush=True); os._exit(9)")  # no close, no checkpoint
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok"
    assert Store(db).comparison(cid)["choice"] == "b"


def test_versions_serving_and_rollback_are_recorded(store):
    store.add_version("v1", "/a/v1", parent="base", run_id=None, metrics={"rm/accuracy": 0.8})
    store.mark_serving("v1", actor="op", action="serve")
    assert store.serving_version()["id"] == "v1"
    store.add_version("v2", "/a/v2", parent="v1", run_id=None, metrics={})
    store.mark_serving("v2", actor="op", action="promote")
    assert store.version("v1")["status"] == "retired"
    store.mark_serving("base", actor="op", action="rollback")
    assert store.serving_version() is None
    assert [e["version"] for e in store.serving_events()] == ["v1", "v2", "base"]


def test_runs_and_settings_round_trip(store):
    run = store.start_run("test")
    store.update_run(run, progress={"stage": "ppo", "step": 3})
    store.finish_run(run, "failed", error="boom")
    row = store.run(run)
    assert row["status"] == "failed" and row["progress"]["step"] == 3 and row["error"] == "boom"
    store.set_setting("schedule", {"enabled": False})
    assert store.get_setting("schedule") == {"enabled": False}
    assert json.loads(json.dumps(store.runs()))   # plain data


def test_a_database_from_before_canary_trials_upgrades_with_nothing_lost(tmp_path):
    """m002 rebuilds policy_versions (a CHECK cannot be altered in SQLite): every row and vote must survive."""
    import sqlite3

    from sqlite_utils import Database

    from chat_app.store import Store, migrations

    path = tmp_path / "old.db"
    old = Database(sqlite3.connect(path))
    migrations.apply(old, stop_before="m002_canary_trials")          # the schema as the last release left it
    old.execute("INSERT INTO policy_versions (id, parent, adapter_path, run_id, status, reason, metrics_json, "
                "created_at) VALUES ('v1', NULL, 'adapters/v1', 1, 'serving', 'passed', '{\"x\": 1}', 't')")
    old.execute("INSERT INTO comparisons (prompt_json, answer_a, answer_b, policy_version, sampling_json, source, "
                "created_at, completed_at, choice, voted_at) VALUES ('[]', 'A', 'B', 'v1', '{}', 'ui', 't', 't', "
                "'a', 't')")
    old.conn.commit()
    old.close()
    store = Store(path)
    assert store.schema_versions()[-1] == "m002_canary_trials"
    assert store.version("v1")["status"] == "serving" and store.version("v1")["metrics"] == {"x": 1}
    pair = store.preference_pairs()[0]
    assert pair["chosen"] == "A" and pair["versions"] == {"chosen": "v1", "rejected": "v1"}   # both as served
    store.add_version("v2", "adapters/v2", parent="v1", run_id=2, metrics={}, status="canary")   # the new status
    assert store.version("v2")["status"] == "canary"
    store.close()
