"""The store, every test on both backends (db_location: a SQLite file, then a fresh PostgreSQL database)."""
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest

from chat_app.db import connect
from chat_app.store import TABLES, Store, migrations, postgres_migrations

ROOT = Path(__file__).resolve().parent.parent
VERSIONS = ["m001_initial", "m002_canary_trials"]


@pytest.fixture
def store(db_location):   # conftest's store, on both backends
    s = Store(db_location)
    yield s
    s.close()


def make_pair(store, answers=("first", "second")):
    cid = store.create_comparison(prompt_messages=[{"role": "user", "content": "hi"}],
                                  sampling={"temperature": 0.7}, source="test", seeds=[1, 2])
    store.complete_comparison(cid, answer_a=answers[0], answer_b=answers[1], policy_version="base",
                              latency_ms=12.0, ended_with_eos=(True, False))
    return cid


def columns(store, table: str) -> list[str]:
    return [d[0] for d in store.db.execute(f"SELECT * FROM {table} LIMIT 0").description]


def test_schema_is_created_from_an_empty_database(db_location, tmp_path):
    store = Store(db_location)
    assert store.schema_versions() == VERSIONS
    if store.db.kind == "sqlite":
        conn = sqlite3.connect(db_location)        # readable by any SQLite tool
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.close()
    else:
        tables = {r[0] for r in store.db.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        indexes = {r[0] for r in store.db.execute("SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
        reference = Store(tmp_path / "reference.db")   # the same columns, in the same order, as on SQLite
        assert {t: columns(store, t) for t in TABLES} == {t: columns(reference, t) for t in TABLES}
        reference.close()
    assert set(TABLES) <= tables
    assert {"comparisons_voted_at", "comparisons_versions"} <= indexes
    store.close()
    assert Store(db_location).schema_versions() == VERSIONS   # reopening applies nothing twice


def test_check_constraints_hold_the_m002_status_list(store):
    store.add_version("v1", "/a/v1", parent=None, run_id=None, metrics={}, status="canary")
    with pytest.raises(Exception, match="(?i)check"):
        store.add_version("v2", "/a/v2", parent=None, run_id=None, metrics={}, status="bogus")
    cid = store.create_comparison(prompt_messages=[], sampling={}, source="t")
    with pytest.raises(Exception, match="(?i)check"):
        store.db.execute("UPDATE comparisons SET choice = 'c' WHERE id = ?", [cid])
    assert store.version("v1")["status"] == "canary"


def test_every_sqlite_migration_has_a_postgresql_twin():
    assert [m.name for m in migrations._migrations] == postgres_migrations.names == VERSIONS


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


def test_an_acknowledged_vote_survives_a_killed_process(db_location):
    db = db_location
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


def test_a_database_from_before_canary_trials_upgrades_with_nothing_lost(db_location):
    """m002 rebuilds policy_versions (a CHECK cannot be altered in SQLite): every row and vote must survive."""
    path = db_location
    old = connect(path)
    if old.kind == "sqlite":                                          # the schema as the last release left it
        migrations.apply(old.db, stop_before="m002_canary_trials")
    else:
        postgres_migrations.apply(old, stop_before="m002_canary_trials")
    assert old.applied(migrations, postgres_migrations) == ["m001_initial"]
    old.execute("INSERT INTO policy_versions (id, parent, adapter_path, run_id, status, reason, metrics_json, "
                "created_at) VALUES ('v1', NULL, 'adapters/v1', 1, 'serving', 'passed', '{\"x\": 1}', 't')")
    old.execute("INSERT INTO comparisons (prompt_json, answer_a, answer_b, policy_version, sampling_json, source, "
                "created_at, completed_at, choice, voted_at) VALUES ('[]', 'A', 'B', 'v1', '{}', 'ui', 't', 't', "
                "'a', 't')")
    old.close()
    store = Store(path)
    assert store.schema_versions()[-1] == "m002_canary_trials"
    assert store.version("v1")["status"] == "serving" and store.version("v1")["metrics"] == {"x": 1}
    pair = store.preference_pairs()[0]
    assert pair["chosen"] == "A" and pair["versions"] == {"chosen": "v1", "rejected": "v1"}   # both as served
    store.add_version("v2", "adapters/v2", parent="v1", run_id=2, metrics={}, status="canary")   # the new status
    assert store.version("v2")["status"] == "canary"
    store.close()


@pytest.mark.parametrize("connections", [1, 2], ids=["one_store", "two_stores"])
def test_two_votes_at_once_on_one_comparison_exactly_one_wins(db_location, connections):
    """Two threads vote on the same pair at the same moment, through one store or two (as two processes would)."""
    stores = [Store(db_location) for _ in range(connections)]
    cids = [make_pair(stores[0]) for _ in range(10)]
    results = {cid: [] for cid in cids}
    barrier = threading.Barrier(2)

    def vote(i: int):
        for cid in cids:
            barrier.wait()
            results[cid].append(stores[i % connections].record_vote(cid, "ab"[i], f"voter{i}"))

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert all(sorted(r) == ["duplicate", "ok"] for r in results.values()), results
    assert stores[0].vote_counts()["total"] == len(cids)
    for s in stores:
        s.close()


def fill_every_table(store) -> None:
    conversation = store.create_conversation(source="ui", session="s1")
    cid = make_pair(store)
    store.add_message(conversation, "user", "hi", comparison_id=cid)
    store.complete_comparison(cid, answer_a="x", answer_b="y", policy_version="v1", latency_ms=3.5,
                              ended_with_eos=(True, False), versions=("v1", "base"), tokens=(4, 7),
                              sampling_extra={"top_p": 0.9})
    store.record_vote(cid, "b", "alice")
    make_pair(store)                                                   # one without a vote
    store.add_demonstration([{"role": "user", "content": "hi"}], "hello", author="bob", comparison_id=cid)
    run = store.start_run("test", pid=42)
    store.finish_run(run, "succeeded", metrics={"rm/accuracy": 0.75})
    store.add_version("v1", "/a/v1", parent="base", run_id=run, metrics={"rm/accuracy": 0.75}, status="canary")
    store.mark_serving("v1", actor="op", action="promote", details={"eval/win_rate": 0.6})
    store.set_setting("schedule", {"enabled": True})


def dump(store) -> dict[str, list[dict]]:
    return {t: store._rows(f"SELECT * FROM {t} ORDER BY 1") for t in TABLES}


def test_migrate_db_copies_every_row_and_refuses_a_target_with_rows(tmp_path, db_location):
    from chat_app.store import copy_database

    source = Store(tmp_path / "source.db")
    fill_every_table(source)
    rows = dump(source)
    source.close()
    assert all(rows.values())                                          # a row in every table
    counts = copy_database(tmp_path / "source.db", db_location)
    assert counts == {t: len(r) for t, r in rows.items()}
    target = Store(db_location)
    assert dump(target) == rows                                        # same ids, same values, column for column
    assert target.preference_pairs() == Store(tmp_path / "source.db").preference_pairs()
    assert target.start_run("after") == rows["training_runs"][-1]["id"] + 1   # new ids go on after the copied ones
    target.close()
    with pytest.raises(ValueError, match="already holds rows"):
        copy_database(tmp_path / "source.db", db_location)
    with pytest.raises(FileNotFoundError):
        copy_database(tmp_path / "missing.db", db_location)


def test_run_py_migrate_db_prints_the_row_counts(tmp_path, db_location):
    source = Store(tmp_path / "source.db")
    fill_every_table(source)
    source.close()
    cmd = [sys.executable, str(ROOT / "run.py"), "migrate-db", "--from", str(tmp_path / "source.db"),
           "--to", db_location]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["comparisons"] == 2
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 1 and "already holds rows" in again.stderr.splitlines()[-1]


def test_backup_refuses_a_postgresql_location(tmp_path):
    from chat_app.backup import backup

    config = SimpleNamespace(serve=SimpleNamespace(db_path="postgresql://rlhf@db:5432/feedback"))
    with pytest.raises(ValueError, match="pg_dump"):
        backup(config, tmp_path / "backup")
    assert not (tmp_path / "backup").exists()
