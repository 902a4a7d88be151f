"""`run.py backup`: a consistent copy of feedback.db and of the adapter versions it lists, with a manifest.

Safe while the server runs, votes arrive and a retrain writes a new version: the database is copied first, as one
snapshot, and only the versions that snapshot lists are copied. The trainer registers a version only after its
folder is written whole (trainer/pipeline.py, step 7), so a folder being written at that moment is not listed yet.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from chat_app.db import is_postgres
from chat_app.store import backup_database, utc_now


def backup(config, to_dir: str | Path) -> dict:
    """Write feedback.db, adapters/<version>/ and manifest.json into the new or empty folder `to_dir`; returns the
    manifest."""
    if is_postgres(config.serve.db_path):   # the online copy below is SQLite's own
        raise ValueError("backup copies a SQLite file; serve.db_path is a PostgreSQL database: use pg_dump for it "
                         "(and copy serve.adapters_dir)")
    to = Path(to_dir)
    if to.exists() and any(to.iterdir()):
        raise FileExistsError(f"{to} is not empty: back up into a new folder")
    to.mkdir(parents=True, exist_ok=True)
    started_at = utc_now()
    # 1. the database, as of one commit
    db = backup_database(config.serve.db_path, to / "feedback.db")
    # 2. the versions it lists, each under a temporary name until whole
    copied, missing = [], []
    for version in db["versions"]:
        source = Path(version["adapter_path"])
        if not source.is_dir():   # a relative path recorded by a server started elsewhere
            source = Path(config.serve.adapters_dir) / version["id"]
        if not source.is_dir():
            missing.append(version["id"])
            continue
        target = to / "adapters" / version["id"]
        partial = target.with_name(f".{version['id']}.partial")
        shutil.copytree(source, partial)
        os.replace(partial, target)
        copied.append(version["id"])
    # 3. the manifest, last: a folder with one holds a whole backup
    manifest = {"started_at": started_at, "finished_at": utc_now(), "db_path": str(config.serve.db_path),
                "adapters_dir": str(config.serve.adapters_dir), "integrity_check": db["integrity_check"],
                "comparisons": db["rows"]["comparisons"], "votes": db["votes"], "rows": db["rows"],
                "versions": copied, "versions_missing": missing,
                "serving": next((v["id"] for v in db["versions"] if v["status"] == "serving"), "base")}
    (to / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
