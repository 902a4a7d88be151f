"""Two backends behind one small interface: a SQLite file (the default) or a PostgreSQL server.

`connect(location)` picks one by the location: `postgresql://user@host:port/dbname` is a server, anything else is
a SQLite file. Both wrappers offer the same few calls, so store.py writes its SQL once, with `?` placeholders:

    execute(sql, params) -> cursor     (rowcount; fetchone() gives a tuple)
    rows(sql, params)    -> list[dict]
    insert(sql, params)  -> int        (the new row's id: lastrowid, or RETURNING id)
    atomic()                           (a transaction; nested, a savepoint)
    migrate(sqlite_migrations, postgres_migrations), applied(...) -> list[str]
    reset_id_counter(table)            (after a copy that kept the ids)

A `?` is always a placeholder (never put one inside a string literal). The SQL here is about the connection only
(settings, the record of migrations, id counters, the replicas' AdvisoryLock); the schema and every query live in
store.py. Neither wrapper is thread-safe alone: Store guards each with its lock.
"""
from __future__ import annotations

import sqlite3
import zlib
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from sqlite_utils import Database, Migrations


def is_postgres(location) -> bool:
    return str(location).startswith(("postgresql://", "postgres://"))


def connect(location) -> SqliteDB | PostgresDB:
    return PostgresDB(str(location)) if is_postgres(location) else SqliteDB(location)


class SqliteDB:
    """One SQLite file in WAL mode, through sqlite-utils (its Migrations, its atomic())."""

    kind = "sqlite"

    def __init__(self, path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
        self.db = Database(conn)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # an acknowledged vote survives a crash
        self.db.execute("PRAGMA foreign_keys=ON")

    def execute(self, sql: str, params=()) -> sqlite3.Cursor:
        return self.db.execute(sql, list(params))

    def rows(self, sql: str, params=()) -> list[dict]:
        cursor = self.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def insert(self, sql: str, params=()) -> int:
        return self.execute(sql, params).lastrowid

    def atomic(self):
        return self.db.atomic()

    def migrate(self, migrations: Migrations, postgres_migrations: PostgresMigrations) -> None:
        migrations.apply(self.db)

    def applied(self, migrations: Migrations, postgres_migrations: PostgresMigrations) -> list[str]:
        return [m.name for m in migrations.applied(self.db)]

    def reset_id_counter(self, table: str) -> None:
        """Nothing to do: SQLite's next id is MAX(id) + 1."""

    def close(self) -> None:
        self.db.close()


class PostgresDB:
    """One psycopg 3 connection in autocommit mode (each statement is its own transaction, as on SQLite), made
    anew when the server dropped it between two calls."""

    kind = "postgresql"

    def __init__(self, url: str):
        import psycopg   # only a PostgreSQL location needs the driver loaded

        self.psycopg, self.url = psycopg, url
        try:
            self.conn = psycopg.connect(url, autocommit=True)
        except psycopg.OperationalError as error:   # no server there, a wrong user or database name
            raise ConnectionError(f"cannot connect to PostgreSQL: {' '.join(str(error).split())}") from error
        self.depth = 0   # of atomic() blocks open: a broken connection is never replaced inside one

    def execute(self, sql: str, params=()):
        if self.conn.broken and self.depth == 0:   # a server restart: the call that saw it failed, this one goes on
            self.conn = self.psycopg.connect(self.url, autocommit=True)
        # ? -> %s (psycopg's placeholder), a literal % doubled; booleans go in as 0/1, the schema's integers
        query = sql.replace("%", "%%").replace("?", "%s")
        return self.conn.execute(query, [int(v) if isinstance(v, bool) else v for v in params])

    def rows(self, sql: str, params=()) -> list[dict]:
        cursor = self.execute(sql, params)
        if cursor.description is None:
            return []
        names = [d.name for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]

    def insert(self, sql: str, params=()) -> int:
        return self.execute(f"{sql} RETURNING id", params).fetchone()[0]

    @contextmanager
    def atomic(self):
        self.depth += 1
        try:
            with self.conn.transaction():
                yield self
        finally:
            self.depth -= 1

    def migrate(self, migrations: Migrations, postgres_migrations: PostgresMigrations) -> None:
        postgres_migrations.apply(self)

    def applied(self, migrations: Migrations, postgres_migrations: PostgresMigrations) -> list[str]:
        return postgres_migrations.applied(self)

    def reset_id_counter(self, table: str) -> None:
        """After rows were inserted with their ids (a copy), the identity goes on from MAX(id) + 1."""
        self.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), COALESCE(MAX(id), 0) + 1, false) "
                     f"FROM {table}")

    def close(self) -> None:
        self.conn.close()


class AdvisoryLock:
    """A PostgreSQL session-level advisory lock (`pg_try_advisory_lock`) on a connection of its own, held for as long
    as that connection lives: when the process holding it dies, the server closes its session and the lock frees.
    Keys are per database, so apps on two databases of one server never meet."""

    def __init__(self, url: str, name: str):
        import psycopg

        self.psycopg, self.url = psycopg, url
        self.key = zlib.crc32(f"lock:{name}".encode())
        self.conn = None
        self.held = False

    def try_acquire(self) -> bool:
        """Whether this process holds the lock now: take it when free, check that a held one still is (its
        connection alive). Never blocks; a server that cannot be reached means not held."""
        try:
            if self.conn is None or self.conn.broken:
                self.held = False
                self.conn = self.psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            if self.held:
                self.conn.execute("SELECT 1")
            else:
                self.held = self.conn.execute("SELECT pg_try_advisory_lock(%s)", [self.key]).fetchone()[0]
        except self.psycopg.Error:   # the server restarted or went away: the session, and the lock, are gone
            self.release()
        return self.held

    def release(self) -> None:
        """Unlock (a closed session frees it too, but only once the server has ended it) and close the session."""
        if self.conn is not None:
            if self.held and not self.conn.broken:
                try:
                    self.conn.execute("SELECT pg_advisory_unlock(%s)", [self.key])
                except self.psycopg.Error:
                    pass   # the session is gone, and the lock with it
            self.conn.close()
            self.conn = None
        self.held = False


class PostgresMigrations:
    """sqlite-utils' Migrations for PostgreSQL: named functions, each applied once, in order, recorded in the table
    `_migrations` (as `_sqlite_migrations` on SQLite) in the same transaction as its changes."""

    table = "_migrations"

    def __init__(self, name: str):
        self.name = name
        self.steps: list[tuple[str, Callable]] = []

    def __call__(self, name: str):
        def register(fn):
            if any(n == name for n, _ in self.steps):
                raise ValueError(f"migration {name!r} is already registered in set {self.name!r}")
            self.steps.append((name, fn))
            return fn
        return register

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.steps]

    def applied(self, db: PostgresDB) -> list[str]:
        if db.execute("SELECT to_regclass(?)", [self.table]).fetchone()[0] is None:
            return []
        return [r["name"] for r in db.rows(f"SELECT name FROM {self.table} WHERE migration_set = ? ORDER BY id",
                                           [self.name])]

    def apply(self, db: PostgresDB, stop_before: str | None = None) -> None:
        """Apply the pending steps (those before `stop_before`, when given), all in one transaction."""
        with db.atomic():
            # two processes starting at once (a server and its trainer): one migrates, the other waits, then skips
            db.execute("SELECT pg_advisory_xact_lock(?)", [zlib.crc32(f"migrations:{self.name}".encode())])
            db.execute(f"""CREATE TABLE IF NOT EXISTS {self.table} (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                migration_set TEXT NOT NULL, name TEXT NOT NULL, applied_at TEXT NOT NULL,
                UNIQUE (migration_set, name))""")
            done = set(self.applied(db))
            for name, fn in self.steps:
                if name == stop_before:
                    return
                if name not in done:
                    fn(db)
                    db.execute(f"INSERT INTO {self.table} (migration_set, name, applied_at) VALUES (?, ?, ?)",
                               [self.name, name, datetime.now(timezone.utc).isoformat()])
