"""The feedback store: every SQL statement of the project, over one SQLite file (WAL, migrations) or, when the
location is a `postgresql://` URL, a PostgreSQL database with the same schema (chat_app/db.py holds both backends)."""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import uuid
from datetime import datetime, timezone
from pathlib import Path

from sqlite_utils import Migrations

from chat_app.db import PostgresMigrations, connect, is_postgres

CHOICES = ("a", "b", "tie", "both_bad")
VERSION_STATUSES = ("candidate", "canary", "serving", "rejected", "retired")


log = logging.getLogger(__name__)
migrations = Migrations("feedback")                     # SQLite
postgres_migrations = PostgresMigrations("feedback")    # the same steps, by the same names, for PostgreSQL


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


# Append-only: a shipped migration is never edited; add m00N_what below.
@migrations()
def m001_initial(db):
    db.execute("""CREATE TABLE conversations (id TEXT PRIMARY KEY, source TEXT NOT NULL,
        session TEXT, created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE messages (id INTEGER PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id), role TEXT NOT NULL
        CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL,
        comparison_id INTEGER REFERENCES comparisons(id), created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE comparisons (id INTEGER PRIMARY KEY,
        conversation_id TEXT REFERENCES conversations(id), prompt_json TEXT NOT NULL,
        answer_a TEXT NOT NULL DEFAULT '', answer_b TEXT NOT NULL DEFAULT '', policy_version TEXT,
        sampling_json TEXT NOT NULL, seed_a INTEGER, seed_b INTEGER, latency_ms REAL,
        ended_with_eos_a INTEGER, ended_with_eos_b INTEGER, turns_dropped INTEGER NOT NULL DEFAULT 0,
        source TEXT NOT NULL, created_at TEXT NOT NULL, completed_at TEXT,
        choice TEXT CHECK (choice IN ('a', 'b', 'tie', 'both_bad')), voter TEXT, voted_at TEXT)""")
    db.execute("CREATE INDEX comparisons_voted_at ON comparisons(voted_at)")
    db.execute("""CREATE TABLE demonstrations (id INTEGER PRIMARY KEY,
        comparison_id INTEGER REFERENCES comparisons(id), prompt_json TEXT NOT NULL,
        answer TEXT NOT NULL, author TEXT, created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE policy_versions (id TEXT PRIMARY KEY, parent TEXT,
        adapter_path TEXT NOT NULL, reward_adapter_path TEXT, run_id INTEGER,
        status TEXT NOT NULL CHECK (status IN ('candidate', 'serving', 'rejected', 'retired')),
        reason TEXT, metrics_json TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE training_runs (id INTEGER PRIMARY KEY, trigger TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'rejected', 'skipped', 'failed')),
        started_at TEXT NOT NULL, ended_at TEXT, votes_total INTEGER, pairs INTEGER,
        demonstrations INTEGER, candidate_version TEXT, progress_json TEXT NOT NULL DEFAULT '{}',
        metrics_json TEXT NOT NULL DEFAULT '{}', error TEXT, pid INTEGER)""")
    db.execute("""CREATE TABLE serving_events (id INTEGER PRIMARY KEY, version TEXT NOT NULL,
        action TEXT NOT NULL, actor TEXT, at TEXT NOT NULL)""")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value_json TEXT NOT NULL)")


@migrations()
def m002_canary_trials(db):
    """Each answer's version and length (a canary comparison pits two versions), a `canary` status, and the
    figures behind each serving event."""
    for column in ("version_a TEXT", "version_b TEXT", "tokens_a INTEGER", "tokens_b INTEGER"):
        db.execute(f"ALTER TABLE comparisons ADD COLUMN {column}")
    db.execute("UPDATE comparisons SET version_a = policy_version, version_b = policy_version")
    db.execute("CREATE INDEX comparisons_versions ON comparisons(version_a, version_b)")
    db.execute("ALTER TABLE serving_events ADD COLUMN details_json TEXT NOT NULL DEFAULT '{}'")
    # SQLite cannot change a CHECK constraint: rebuild policy_versions with the new status allowed
    db.execute("ALTER TABLE policy_versions RENAME TO policy_versions_m001")
    db.execute("""CREATE TABLE policy_versions (id TEXT PRIMARY KEY, parent TEXT,
        adapter_path TEXT NOT NULL, reward_adapter_path TEXT, run_id INTEGER,
        status TEXT NOT NULL CHECK (status IN ('candidate', 'canary', 'serving', 'rejected', 'retired')),
        reason TEXT, metrics_json TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)""")
    db.execute("INSERT INTO policy_versions SELECT * FROM policy_versions_m001")
    db.execute("DROP TABLE policy_versions_m001")


# The PostgreSQL twins: the same tables, columns (in the same order), CHECKs and indexes. INTEGER PRIMARY KEY ->
# an identity; INTEGER -> BIGINT (SQLite's integers are 64-bit); REAL -> DOUBLE PRECISION; booleans stay 0/1.
# Parents come first: PostgreSQL resolves REFERENCES when the table is created.
@postgres_migrations("m001_initial")
def pg_m001_initial(db):
    db.execute("""CREATE TABLE conversations (id TEXT PRIMARY KEY, source TEXT NOT NULL,
        session TEXT, created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE comparisons (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        conversation_id TEXT REFERENCES conversations(id), prompt_json TEXT NOT NULL,
        answer_a TEXT NOT NULL DEFAULT '', answer_b TEXT NOT NULL DEFAULT '', policy_version TEXT,
        sampling_json TEXT NOT NULL, seed_a BIGINT, seed_b BIGINT, latency_ms DOUBLE PRECISION,
        ended_with_eos_a BIGINT, ended_with_eos_b BIGINT, turns_dropped BIGINT NOT NULL DEFAULT 0,
        source TEXT NOT NULL, created_at TEXT NOT NULL, completed_at TEXT,
        choice TEXT CHECK (choice IN ('a', 'b', 'tie', 'both_bad')), voter TEXT, voted_at TEXT)""")
    db.execute("CREATE INDEX comparisons_voted_at ON comparisons(voted_at)")
    db.execute("""CREATE TABLE messages (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        conversation_id TEXT NOT NULL REFERENCES conversations(id), role TEXT NOT NULL
        CHECK (role IN ('system', 'user', 'assistant')), content TEXT NOT NULL,
        comparison_id BIGINT REFERENCES comparisons(id), created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE demonstrations (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        comparison_id BIGINT REFERENCES comparisons(id), prompt_json TEXT NOT NULL,
        answer TEXT NOT NULL, author TEXT, created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE policy_versions (id TEXT PRIMARY KEY, parent TEXT,
        adapter_path TEXT NOT NULL, reward_adapter_path TEXT, run_id BIGINT, status TEXT NOT NULL
        CONSTRAINT policy_versions_status_check CHECK (status IN ('candidate', 'serving', 'rejected', 'retired')),
        reason TEXT, metrics_json TEXT NOT NULL DEFAULT '{}', created_at TEXT NOT NULL)""")
    db.execute("""CREATE TABLE training_runs (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        trigger TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('running', 'succeeded', 'rejected', 'skipped', 'failed')),
        started_at TEXT NOT NULL, ended_at TEXT, votes_total BIGINT, pairs BIGINT,
        demonstrations BIGINT, candidate_version TEXT, progress_json TEXT NOT NULL DEFAULT '{}',
        metrics_json TEXT NOT NULL DEFAULT '{}', error TEXT, pid BIGINT)""")
    db.execute("""CREATE TABLE serving_events (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
        version TEXT NOT NULL, action TEXT NOT NULL, actor TEXT, at TEXT NOT NULL)""")
    db.execute("CREATE TABLE settings (key TEXT PRIMARY KEY, value_json TEXT NOT NULL)")


@postgres_migrations("m002_canary_trials")
def pg_m002_canary_trials(db):
    for column in ("version_a TEXT", "version_b TEXT", "tokens_a BIGINT", "tokens_b BIGINT"):
        db.execute(f"ALTER TABLE comparisons ADD COLUMN {column}")
    db.execute("UPDATE comparisons SET version_a = policy_version, version_b = policy_version")
    db.execute("CREATE INDEX comparisons_versions ON comparisons(version_a, version_b)")
    db.execute("ALTER TABLE serving_events ADD COLUMN details_json TEXT NOT NULL DEFAULT '{}'")
    db.execute("""ALTER TABLE policy_versions DROP CONSTRAINT policy_versions_status_check,
        ADD CONSTRAINT policy_versions_status_check
        CHECK (status IN ('candidate', 'canary', 'serving', 'rejected', 'retired'))""")


if [m.name for m in migrations._migrations] != postgres_migrations.names:   # a new migration needs both
    raise RuntimeError("every SQLite migration needs its PostgreSQL twin, by the same name, in the same order")


class Store:
    """Thread-safe access to feedback.db (or a postgresql:// database); returns plain dicts."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self.db = connect(self.path)   # one connection, used under self.lock
        self.lock = threading.RLock()
        self.vote_listeners: list = []
        """Called with {id, version_a, version_b} after each vote is stored (chat_app.canary listens)."""
        with self.lock:
            self.db.migrate(migrations, postgres_migrations)

    def close(self):
        self.db.close()

    def _rows(self, sql: str, params=()) -> list[dict]:
        with self.lock:
            return self.db.rows(sql, params)

    def _one(self, sql: str, params=()) -> dict | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    def schema_versions(self) -> list[str]:
        with self.lock:
            return self.db.applied(migrations, postgres_migrations)

    # -- conversations and comparisons -------------------------------------------------------
    def create_conversation(self, source: str = "ui", session: str | None = None) -> str:
        conversation_id = uuid.uuid4().hex
        with self.lock:
            self.db.execute("INSERT INTO conversations (id, source, session, created_at) VALUES (?, ?, ?, ?)",
                            [conversation_id, source, session, utc_now()])
        return conversation_id

    def add_message(self, conversation_id: str, role: str, content: str, comparison_id: int | None = None) -> int:
        with self.lock:
            return self.db.insert(
                "INSERT INTO messages (conversation_id, role, content, comparison_id, created_at) VALUES (?, ?, ?, ?, ?)",
                [conversation_id, role, content, comparison_id, utc_now()])

    def messages(self, conversation_id: str) -> list[dict]:
        return self._rows("SELECT role, content, comparison_id FROM messages WHERE conversation_id = ? ORDER BY id",
                          [conversation_id])

    def create_comparison(self, *, prompt_messages: list[dict], sampling: dict, source: str,
                          conversation_id: str | None = None, seeds: list[int] | None = None) -> int:
        """Reserve a comparison row before sampling (so a stream can name it); answers come with complete_comparison."""
        seeds = list(seeds or []) + [None, None]
        with self.lock:
            return self.db.insert(
                """INSERT INTO comparisons (conversation_id, prompt_json, sampling_json, seed_a, seed_b, source,
                   created_at) VALUES (?, ?, ?, ?, ?, ?, ?)""",
                [conversation_id, json.dumps(prompt_messages), json.dumps(sampling), seeds[0], seeds[1], source,
                 utc_now()])

    def complete_comparison(self, comparison_id: int, *, answer_a: str, answer_b: str, policy_version: str,
                            latency_ms: float | None = None, ended_with_eos: tuple[bool, bool] | None = None,
                            turns_dropped: int = 0, seeds: tuple[int, int] | None = None,
                            sampling_extra: dict | None = None, versions: tuple[str, str] | None = None,
                            tokens: tuple[int, int] | None = None) -> None:
        """Store both sampled answers; only then can the comparison be voted on. `seeds`: the shown answers' seeds
        when they were picked from more candidates; `sampling_extra` is merged into the sampling settings.
        `versions`: each answer's version when they differ (a canary comparison; default both `policy_version`,
        the version served); `tokens`: each answer's length in tokens."""
        eos = list(ended_with_eos or (None, None))
        versions, tokens = versions or (policy_version, policy_version), tokens or (None, None)
        with self.lock, self.db.atomic():
            self.db.execute(
                """UPDATE comparisons SET answer_a = ?, answer_b = ?, policy_version = ?, latency_ms = ?,
                   ended_with_eos_a = ?, ended_with_eos_b = ?, turns_dropped = ?, completed_at = ?, version_a = ?,
                   version_b = ?, tokens_a = ?, tokens_b = ? WHERE id = ?""",
                [answer_a, answer_b, policy_version, latency_ms, eos[0], eos[1], turns_dropped, utc_now(),
                 versions[0], versions[1], tokens[0], tokens[1], comparison_id])
            if seeds is not None:
                self.db.execute("UPDATE comparisons SET seed_a = ?, seed_b = ? WHERE id = ?",
                                [seeds[0], seeds[1], comparison_id])
            if sampling_extra:
                row = self._one("SELECT sampling_json FROM comparisons WHERE id = ?", [comparison_id])
                sampling = {**json.loads(row["sampling_json"] or "{}"), **sampling_extra}
                self.db.execute("UPDATE comparisons SET sampling_json = ? WHERE id = ?",
                                [json.dumps(sampling), comparison_id])

    def delete_comparison(self, comparison_id: int) -> None:
        """Forget a reserved comparison whose sampling failed (never one with a vote)."""
        with self.lock:
            self.db.execute("DELETE FROM comparisons WHERE id = ? AND choice IS NULL", [comparison_id])

    def comparison(self, comparison_id: int) -> dict | None:
        row = self._one("SELECT * FROM comparisons WHERE id = ?", [comparison_id])
        if row:
            row["prompt_messages"] = json.loads(row.pop("prompt_json"))
            row["sampling"] = json.loads(row.pop("sampling_json"))
        return row

    def record_vote(self, comparison_id: int, choice: str, voter: str | None) -> str:
        """Store a vote once: `ok`, `unknown` (no such comparison), `duplicate` (voted) or `incomplete` (still sampling)."""
        if choice not in CHOICES:
            raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")
        with self.lock:
            cursor = self.db.execute(
                "UPDATE comparisons SET choice = ?, voter = ?, voted_at = ? "
                "WHERE id = ? AND choice IS NULL AND completed_at IS NOT NULL",
                [choice, voter, utc_now(), comparison_id])
            if cursor.rowcount == 1:
                voted = self._one("SELECT id, version_a, version_b FROM comparisons WHERE id = ?", [comparison_id])
            else:
                voted = None
        if voted is not None:
            for listener in self.vote_listeners:   # after the commit, outside the lock
                try:
                    listener(voted)
                except Exception:   # a listener's bug must not turn a stored vote into an error
                    log.exception("vote listener failed")
            return "ok"
        row = self._one("SELECT choice, completed_at FROM comparisons WHERE id = ?", [comparison_id])
        if row is None:
            return "unknown"
        return "duplicate" if row["choice"] is not None else "incomplete"

    def add_demonstration(self, prompt_messages: list[dict], answer: str, author: str | None,
                          comparison_id: int | None = None) -> int:
        with self.lock:
            return self.db.insert(
                "INSERT INTO demonstrations (comparison_id, prompt_json, answer, author, created_at) VALUES (?, ?, ?, ?, ?)",
                [comparison_id, json.dumps(prompt_messages), answer, author, utc_now()])

    # -- what the trainer reads --------------------------------------------------------------
    def vote_counts(self) -> dict:
        counts = {c: 0 for c in CHOICES}
        for row in self._rows("SELECT choice, COUNT(*) AS n FROM comparisons WHERE choice IS NOT NULL GROUP BY choice"):
            counts[row["choice"]] = row["n"]
        counts["total"] = sum(counts[c] for c in CHOICES)
        counts["pairs"] = counts["a"] + counts["b"]
        counts["demonstrations"] = self._one("SELECT COUNT(*) AS n FROM demonstrations")["n"]
        return counts

    def votes_since(self, since: str | None) -> int:
        if since is None:
            return self._one("SELECT COUNT(*) AS n FROM comparisons WHERE choice IS NOT NULL")["n"]
        return self._one("SELECT COUNT(*) AS n FROM comparisons WHERE voted_at > ?", [since])["n"]

    def preference_pairs(self, include_ties: bool = False) -> list[dict]:
        """Every A/B vote as {comparison_id, prompt_messages, chosen, rejected, versions, ended_with_eos}; both-bad are
        not pairs. With
        `include_ties`, ties too, marked `"tie": True` (chosen = answer A, rejected = answer B)."""
        choices = ("a", "b", "tie") if include_ties else ("a", "b", "a")
        rows = self._rows("SELECT id, prompt_json, answer_a, answer_b, choice, version_a, version_b, ended_with_eos_a, "
                          "ended_with_eos_b FROM comparisons WHERE choice IN (?, ?, ?) ORDER BY id", list(choices))
        b_won = [r["choice"] == "b" for r in rows]
        return [{"comparison_id": r["id"], "prompt_messages": json.loads(r["prompt_json"]),
                 "chosen": r["answer_b"] if b else r["answer_a"],
                 "rejected": r["answer_a"] if b else r["answer_b"],
                 "versions": {"chosen": r["version_b"] if b else r["version_a"],
                              "rejected": r["version_a"] if b else r["version_b"]},
                 "ended_with_eos": {"chosen": bool(r["ended_with_eos_b"] if b else r["ended_with_eos_a"]),
                                    "rejected": bool(r["ended_with_eos_a"] if b else r["ended_with_eos_b"])},
                 **({"tie": True} if r["choice"] == "tie" else {})} for r, b in zip(rows, b_won)]

    def cross_version_votes(self, since: str | None = None, versions: tuple[str, str] | None = None) -> list[dict]:
        """Votes on comparisons whose two answers came from different versions (canary trials), oldest first;
        only those voted after `since`, only those between `versions` (either side), when given."""
        sql = ("SELECT id, version_a, version_b, choice, tokens_a, tokens_b, voted_at FROM comparisons "
               "WHERE choice IS NOT NULL AND version_a != version_b")
        params: list = []
        if since is not None:
            sql += " AND voted_at > ?"
            params.append(since)
        if versions is not None:
            sql += " AND ((version_a = ? AND version_b = ?) OR (version_a = ? AND version_b = ?))"
            params += [versions[0], versions[1], versions[1], versions[0]]
        return self._rows(sql + " ORDER BY voted_at, id", params)

    def cross_version_vote_count(self, since: str | None, versions: tuple[str, str]) -> tuple[int, int | None]:
        """(How many, the newest id) of the votes between `versions` voted after `since`, whichever replica took
        them: a cheap look that tells the replica deciding a trial whether there is anything new to decide on."""
        row = self._one("SELECT COUNT(*) AS n, MAX(id) AS last FROM comparisons WHERE choice IS NOT NULL "
                        "AND voted_at > ? AND ((version_a = ? AND version_b = ?) OR (version_a = ? AND version_b = ?))",
                        [since or "", versions[0], versions[1], versions[1], versions[0]])
        return row["n"], row["last"]

    def demonstrations(self) -> list[dict]:
        rows = self._rows("SELECT id, prompt_json, answer FROM demonstrations ORDER BY id")
        return [{"id": r["id"], "prompt_messages": json.loads(r["prompt_json"]), "answer": r["answer"]} for r in rows]

    def user_prompts(self, limit: int = 1000) -> list[list[dict]]:
        """Distinct prompt contexts users actually sent, newest first."""
        rows = self._rows("SELECT prompt_json FROM comparisons WHERE completed_at IS NOT NULL "
                          "GROUP BY prompt_json ORDER BY MAX(id) DESC LIMIT ?",
                          [limit])
        return [json.loads(r["prompt_json"]) for r in rows]

    def votes_by_day(self) -> list[dict]:
        return self._rows("SELECT substr(voted_at, 1, 13) AS hour, choice, COUNT(*) AS n FROM comparisons "
                          "WHERE choice IS NOT NULL GROUP BY hour, choice ORDER BY hour")

    def vote_times(self) -> list[str]:
        return [r["voted_at"] for r in self._rows(
            "SELECT voted_at FROM comparisons WHERE choice IS NOT NULL ORDER BY voted_at")]

    def export_preferences(self) -> list[dict]:
        """A/B votes in the conversational preference format TRL reads: prompt, chosen, rejected (message lists)."""
        return [{"prompt": p["prompt_messages"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
                 "rejected": [{"role": "assistant", "content": p["rejected"]}], "versions": p["versions"]}
                for p in self.preference_pairs()]

    # -- policy versions ---------------------------------------------------------------------
    def next_version_id(self) -> str:
        row = self._one("SELECT COUNT(*) AS n FROM policy_versions")
        return f"v{row['n'] + 1}"

    def add_version(self, version: str, adapter_path: str, parent: str | None, run_id: int | None,
                    metrics: dict, status: str = "candidate", reason: str | None = None,
                    reward_adapter_path: str | None = None) -> None:
        with self.lock:
            self.db.execute(
                """INSERT INTO policy_versions (id, parent, adapter_path, reward_adapter_path, run_id, status, reason,
                   metrics_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                [version, parent, adapter_path, reward_adapter_path, run_id, status, reason, json.dumps(metrics),
                 utc_now()])

    def set_version_status(self, version: str, status: str, reason: str | None = None) -> None:
        assert status in VERSION_STATUSES, status
        with self.lock:
            self.db.execute("UPDATE policy_versions SET status = ?, reason = COALESCE(?, reason) WHERE id = ?",
                            [status, reason, version])

    def version(self, version: str) -> dict | None:
        row = self._one("SELECT * FROM policy_versions WHERE id = ?", [version])
        if row:
            row["metrics"] = json.loads(row.pop("metrics_json"))
        return row

    def versions(self) -> list[dict]:
        rows = self._rows("SELECT * FROM policy_versions ORDER BY created_at")
        for row in rows:
            row["metrics"] = json.loads(row.pop("metrics_json"))
        return rows

    def serving_version(self) -> dict | None:
        """The version marked serving, or None for the base model."""
        row = self._one("SELECT id FROM policy_versions WHERE status = 'serving'")
        return self.version(row["id"]) if row else None

    def mark_serving(self, version: str, actor: str | None, action: str, details: dict | None = None) -> None:
        """Record that `version` (or `base`) is served now; the one served before becomes retired."""
        with self.lock, self.db.atomic():
            self.db.execute("UPDATE policy_versions SET status = 'retired' WHERE status = 'serving' AND id != ?",
                            [version])
            if version != "base":
                self.db.execute("UPDATE policy_versions SET status = 'serving' WHERE id = ?", [version])
            self.add_serving_event(version, action, actor, details)

    def add_serving_event(self, version: str, action: str, actor: str | None, details: dict | None = None) -> None:
        """One row of the serving history: what happened to `version`, who did it, the figures behind it."""
        with self.lock:
            self.db.execute("INSERT INTO serving_events (version, action, actor, at, details_json) VALUES (?, ?, ?, ?, ?)",
                            [version, action, actor, utc_now(), json.dumps(details or {})])

    def serving_events(self) -> list[dict]:
        rows = self._rows("SELECT * FROM serving_events ORDER BY id")
        for row in rows:
            row["details"] = json.loads(row.pop("details_json") or "{}")
        return rows

    # -- training runs -----------------------------------------------------------------------
    def start_run(self, trigger: str, pid: int | None = None) -> int:
        with self.lock:
            return self.db.insert(
                "INSERT INTO training_runs (trigger, status, started_at, pid) VALUES (?, 'running', ?, ?)",
                [trigger, utc_now(), pid])

    def update_run(self, run_id: int, **fields) -> None:
        """Set columns of a run; dict values (progress, metrics) are stored as JSON."""
        allowed = {"status", "ended_at", "votes_total", "pairs", "demonstrations", "candidate_version",
                   "progress", "metrics", "error", "pid"}
        sets, values = [], []
        for key, value in fields.items():
            if key not in allowed:
                raise KeyError(key)
            column = f"{key}_json" if key in ("progress", "metrics") else key
            sets.append(f"{column} = ?")
            values.append(json.dumps(value) if key in ("progress", "metrics") else value)
        with self.lock:
            self.db.execute(f"UPDATE training_runs SET {', '.join(sets)} WHERE id = ?", [*values, run_id])

    def finish_run(self, run_id: int, status: str, error: str | None = None, **fields) -> None:
        self.update_run(run_id, status=status, error=error, ended_at=utc_now(), **fields)

    def run(self, run_id: int) -> dict | None:
        row = self._one("SELECT * FROM training_runs WHERE id = ?", [run_id])
        return _decode_run(row) if row else None

    def runs(self, limit: int = 50) -> list[dict]:
        return [_decode_run(r) for r in self._rows("SELECT * FROM training_runs ORDER BY id DESC LIMIT ?", [limit])]

    def last_finished_run(self) -> dict | None:
        return self.last_run(("succeeded", "rejected", "skipped", "failed"))

    def last_run(self, statuses: tuple[str, ...]) -> dict | None:
        """The newest run with one of these statuses."""
        marks = ", ".join("?" for _ in statuses)
        row = self._one(f"SELECT * FROM training_runs WHERE status IN ({marks}) ORDER BY id DESC LIMIT 1",
                        list(statuses))
        return _decode_run(row) if row else None

    def row_counts(self) -> dict[str, int]:
        """Rows per table, every table of the schema."""
        return {t: self._one(f"SELECT COUNT(*) AS n FROM {t}")["n"] for t in TABLES}

    # -- settings ----------------------------------------------------------------------------
    def get_setting(self, key: str, default=None):
        row = self._one("SELECT value_json FROM settings WHERE key = ?", [key])
        return json.loads(row["value_json"]) if row else default

    def set_setting(self, key: str, value) -> None:
        with self.lock:
            self.db.execute("INSERT INTO settings (key, value_json) VALUES (?, ?) "
                            "ON CONFLICT(key) DO UPDATE SET value_json = excluded.value_json",
                            [key, json.dumps(value)])


def _decode_run(row: dict) -> dict:
    row["progress"] = json.loads(row.pop("progress_json"))
    row["metrics"] = json.loads(row.pop("metrics_json"))
    return row


TABLES = ("conversations", "comparisons", "messages", "demonstrations", "policy_versions", "training_runs",
          "serving_events", "settings")   # every table of the schema, each after those it references
ID_TABLES = ("comparisons", "messages", "demonstrations", "training_runs", "serving_events")   # integer ids


def copy_database(source: str | Path, target: str | Path, batch_rows: int = 500) -> dict[str, int]:
    """Copy every table of the store at `source` into the empty store at `target` (either backend), row for row with
    the same ids, in one transaction; returns the row counts per table. Refuses a target that holds any row."""
    if not is_postgres(source) and not Path(source).is_file():
        raise FileNotFoundError(f"no database at {source}")
    if str(source) == str(target):
        raise ValueError("the source and the target are the same database")
    src, dst = Store(source), Store(target)   # both migrated to the same, latest, schema
    try:
        held = {t: n for t, n in dst.row_counts().items() if n}
        if held:
            raise ValueError(f"the target already holds rows ({', '.join(f'{t}: {n}' for t, n in held.items())}): "
                             "copy into an empty database")
        with src.lock, dst.lock, src.db.atomic(), dst.db.atomic():   # one snapshot of the source, all or nothing
            for table in TABLES:
                cursor = src.db.execute(f"SELECT * FROM {table} ORDER BY 1")
                names = [d[0] for d in cursor.description]
                insert = (f"INSERT INTO {table} ({', '.join(names)}) "
                          f"VALUES ({', '.join('?' for _ in names)})")
                while batch := cursor.fetchmany(batch_rows):
                    for row in batch:
                        dst.db.execute(insert, row)
                if table in ID_TABLES:
                    dst.db.reset_id_counter(table)   # new rows go on after the copied ids
        counts, copied = src.row_counts(), dst.row_counts()
        if copied != counts:
            raise RuntimeError(f"the copy differs from the source: {copied} != {counts}")
        return copied
    finally:
        src.close()
        dst.close()


def backup_database(source: str | Path, target: str | Path) -> dict:
    """Copy the SQLite file `source` to `target` as one consistent snapshot while writers go on; returns what the copy
    holds: its integrity check, row counts per table, votes, and the policy versions it lists."""
    if not Path(source).is_file():
        raise FileNotFoundError(f"no database at {source}")
    partial = Path(f"{target}.partial")   # renamed once whole and checked: a crash never leaves a half backup
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(source, timeout=30)   # its own connection, reading only: WAL writers never wait for it
    src.execute("PRAGMA query_only=ON")
    dst = sqlite3.connect(partial)
    try:
        # SQLite's online backup in one step (pages=-1) reads every page inside one read transaction, so the copy
        # is the database as of one commit; a stepwise copy would restart whenever a vote lands between steps
        src.backup(dst, pages=-1)
        dst.execute("PRAGMA journal_mode=DELETE")   # a single self-contained file, no -wal beside it
        integrity = dst.execute("PRAGMA integrity_check").fetchone()[0]
        if integrity != "ok":
            raise RuntimeError(f"the copy of {source} fails PRAGMA integrity_check: {integrity}")
        tables = ("conversations", "messages", "comparisons", "demonstrations", "policy_versions", "training_runs")
        rows = {t: dst.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
        votes = dst.execute("SELECT COUNT(*) FROM comparisons WHERE choice IS NOT NULL").fetchone()[0]
        versions = [{"id": v, "adapter_path": p, "status": s} for v, p, s in dst.execute(
            "SELECT id, adapter_path, status FROM policy_versions ORDER BY created_at")]
    finally:
        dst.close()
        src.close()
    os.replace(partial, target)
    return {"integrity_check": integrity, "rows": rows, "votes": votes, "versions": versions}
