"""`run.py backup` while votes arrive: every acknowledged vote is in the copy, the copy is sound, and restores."""
import json
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import ROOT, TINY

from chat_app.store import Store


def vote_continuously(db_path: str, acknowledged: list[int], stop: threading.Event) -> None:
    """A second writer, as the server is: new pair, vote, acknowledge; until told to stop."""
    store = Store(db_path)
    while not stop.is_set():
        cid = store.create_comparison(prompt_messages=[{"role": "user", "content": "hi"}], sampling={}, source="t")
        store.complete_comparison(cid, answer_a="x", answer_b="y", policy_version="base")
        assert store.record_vote(cid, "b" if cid % 2 else "a", "writer") == "ok"
        acknowledged.append(cid)
    store.close()


def test_a_backup_taken_while_votes_arrive_holds_every_acknowledged_vote(tmp_path, tiny_config):
    db_path, adapters = tiny_config.serve.db_path, Path(tiny_config.serve.adapters_dir)
    store = Store(db_path)
    (adapters / "v1").mkdir(parents=True)
    (adapters / "v1" / "adapter_model.safetensors").write_bytes(b"w" * 4096)
    store.add_version("v1", str(adapters / "v1"), parent="base", run_id=None, metrics={}, status="serving")
    (adapters / "v2").mkdir()                      # a version still being written: its row comes after the folder
    (adapters / "v2" / "adapter_model.safetensors").write_bytes(b"half")

    acknowledged, stop = [], threading.Event()
    writer = threading.Thread(target=vote_continuously, args=(db_path, acknowledged, stop))
    writer.start()
    try:
        while len(acknowledged) < 50:
            time.sleep(0.01)
        before = list(acknowledged)                  # acknowledged before the backup started
        out = subprocess.run([sys.executable, str(ROOT / "run.py"), "backup", "--to", str(tmp_path / "bk"),
                              "--config", TINY, "--db", db_path, "--set", f"serve.adapters_dir={adapters}"],
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        during = len(acknowledged) - len(before)
    finally:
        stop.set()
        writer.join()
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads(out.stdout)
    assert manifest == json.loads((tmp_path / "bk" / "manifest.json").read_text())
    assert during > 0, "the writer should have kept voting while the backup ran"
    assert manifest["integrity_check"] == "ok" and manifest["versions"] == ["v1"] and manifest["serving"] == "v1"
    assert len(before) <= manifest["votes"] <= len(acknowledged)
    assert not (tmp_path / "bk" / "adapters" / "v2").exists()          # not listed, so not copied half-written

    # restore as the README says (server stopped): the files back in place of the live ones
    restored = tmp_path / "restored"
    restored.mkdir()
    shutil.copy(tmp_path / "bk" / "feedback.db", restored / "feedback.db")
    shutil.copytree(tmp_path / "bk" / "adapters", restored / "adapters")
    with sqlite3.connect(restored / "feedback.db") as db:                # any SQLite tool reads it
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    copy = Store(restored / "feedback.db")
    assert all(copy.comparison(cid)["choice"] == ("b" if cid % 2 else "a") for cid in before)
    assert copy.vote_counts()["total"] == manifest["votes"]
    assert copy.serving_version()["id"] == "v1"
    assert (restored / "adapters" / "v1" / "adapter_model.safetensors").read_bytes() == b"w" * 4096
    copy.close()

    again = subprocess.run([sys.executable, str(ROOT / "run.py"), "backup", "--to", str(tmp_path / "bk"),
                            "--config", TINY, "--db", db_path], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "not empty" in again.stderr      # never mixed into an older backup
    store.close()
