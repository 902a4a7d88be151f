"""Shared fixtures: the tiny config, a real SQLite file in tmp_path, an in-process app, a real server process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def start_server(tmp_path: Path, extra_args: list[str] = (), env: dict | None = None):
    """`run.py serve` with the tiny model as a real process on a free port; returns (process, base_url)."""
    port = free_port()
    cmd = [sys.executable, str(ROOT / "run.py"), "serve", "--config", TINY, "--port", str(port),
           "--db", str(tmp_path / "feedback.db"), "--set", f"serve.adapters_dir={tmp_path / 'adapters'}",
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
