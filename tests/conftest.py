"""Shared fixtures: the tiny config, a real SQLite file in tmp_path (or a throwaway PostgreSQL database), an
in-process app, a real server process."""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "configs" / "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tiny_config(tmp_path):
    from chat_app.config import load_config

    return load_config(TINY, [f"serve.db_path={tmp_path / 'feedback.db'}",
                              f"serve.adapters_dir={tmp_path / 'adapters'}"])


@pytest.fixture(scope="session")
def tokenizer():
    from chat_app.config import load_config
    from chat_app.model import load_tokenizer

    return load_tokenizer(load_config(TINY).model)


@pytest.fixture
def store(tmp_path):
    from chat_app.store import Store

    s = Store(tmp_path / "feedback.db")
    yield s
    s.close()


PG_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def postgres_server():
    """The URL of a PostgreSQL server for the whole session: $RLHF_TEST_PG_URL when set (a server someone started),
    else a throwaway one, initdb + pg_ctl in a temporary folder (its Unix socket there too) on a free port; skips
    when none can be had."""
    if os.environ.get("RLHF_TEST_PG_URL"):
        yield os.environ["RLHF_TEST_PG_URL"]
        return
    pytest.importorskip("psycopg", reason="psycopg is not installed")
    if not (PG_BIN / "initdb").is_file():
        pytest.skip(f"PostgreSQL is not installed ({PG_BIN}/initdb missing; or set RLHF_TEST_PG_URL)")
    folder = Path(tempfile.mkdtemp(prefix="rlhf-pg-"))   # not under tmp_path: pytest's folders are root's, 0700
    as_postgres = []
    if os.geteuid() == 0:   # initdb and postgres refuse to run as root
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(folder)
            pytest.skip("running as root and there is no postgres user to run PostgreSQL as")
        os.chown(folder, user.pw_uid, user.pw_gid)
        as_postgres = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    options = (f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off "
               "-c max_connections=200")
    started = time.perf_counter()
    try:
        subprocess.run([*as_postgres, PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-locale",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, text=True)
        subprocess.run([*as_postgres, PG_BIN / "pg_ctl", "-D", data, "-l", folder / "server.log", "-w", "-t", "60",
                        "-o", options, "start"], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as error:
        log = (folder / "server.log").read_text()[-1500:] if (folder / "server.log").exists() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"could not start PostgreSQL: {error} {getattr(error, 'stderr', '') or ''} {log}".strip())
    print(f"\nPostgreSQL started in {time.perf_counter() - started:.1f} s on port {port}", file=sys.stderr)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_postgres, PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def fresh_postgres_database(server_url: str):
    """A new, empty database on `server_url` (its URL), dropped afterwards."""
    import psycopg

    name = f"rlhf_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield urlsplit(server_url)._replace(path=f"/{name}").geturl()
    finally:
        with psycopg.connect(server_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')   # FORCE: a store a test left open


@pytest.fixture
def postgres_url(postgres_server):
    """A fresh, empty database on the session's server, dropped after the test."""
    with fresh_postgres_database(postgres_server) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_location(request, tmp_path):
    """Where a store lives, once per backend: a SQLite file in tmp_path, then a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "feedback.db")
    return request.getfixturevalue("postgres_url")


def nudged_policy(base_model, lora_cfg, scale: float = 0.05):
    """(policy, value_head): a LoRA policy over `base_model` whose adapter is not zero (lora_B ~ N(0, scale²)), and
    a non-zero value head."""
    import torch

    from trainer.ppo import ValueHead, make_policy

    policy = make_policy(base_model, lora_cfg)
    with torch.no_grad():
        for name, param in policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, scale)
    value_head = ValueHead(policy.config.hidden_size)
    torch.nn.init.normal_(value_head.linear.weight)
    return policy, value_head


def start_server(tmp_path: Path, extra_args: list[str] = (), env: dict | None = None, db: str | None = None):
    """`run.py serve` with the tiny model as a real process on a free port; returns (process, base_url). `db`: the
    database location (default a SQLite file in tmp_path)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "--config", TINY, "--port", str(port),
           "--db", db or str(tmp_path / "feedback.db"), "--set", f"serve.adapters_dir={tmp_path / 'adapters'}",
           *extra_args]
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")


def stop_server(process):
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()


def in_process_app(tmp_path: Path, overrides: list[str] = ()):
    """The tiny app with the API only, in this process (no server start-up: seconds): returns (app, TestClient)."""
    from starlette.testclient import TestClient

    from chat_app.app import build_app
    from chat_app.config import load_config
    from chat_app.server import create_web_app

    config = load_config(TINY, [f"serve.db_path={tmp_path / 'feedback.db'}",
                                f"serve.adapters_dir={tmp_path / 'adapters'}", *overrides])
    app = build_app(config, with_scheduler=False)
    return app, TestClient(create_web_app(app, with_ui=False))
