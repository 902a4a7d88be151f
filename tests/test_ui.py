"""The Gradio UI in a real browser: the app runs in-process on localhost, headless Chromium drives it."""
from __future__ import annotations

import json
import os
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
TINY = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml")
PASSWORD = "op-test-password"
WAIT_MS = 60_000  # the first pair includes the engine's warm-up

if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is missing: install it with `apt-get install chromium`", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="install the test extra: `pip install playwright` "
                               "(it drives Debian's chromium; no `playwright install` needed)")
expect = sync_api.expect


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The real app (tiny model, real SQLite file) served by uvicorn in a background thread; yields (app, url)."""
    import uvicorn

    from chat_app.app import build_app
    from chat_app.config import load_config
    from chat_app.server import create_web_app

    tmp = tmp_path_factory.mktemp("ui")
    app = build_app(load_config(TINY, [f"serve.db_path={tmp / 'f.db'}", f"serve.adapters_dir={tmp / 'adapters'}",
                                       "schedule.retrain_every_minutes=600", "schedule.min_new_votes=1000"]))
    # a real scheduler for the operator's controls, set so that it never starts a run by itself here
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(create_web_app(app), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=web.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not web.started:
        assert thread.is_alive() and time.time() < deadline, "the web server did not start"
        time.sleep(0.1)
    yield app, f"http://127.0.0.1:{port}"
    web.should_exit = True
    thread.join(timeout=10)
    app.close()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    _, url = server
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    expect(page.locator("#msg-box textarea")).to_be_visible(timeout=30_000)
    yield page
    page.close()


def squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_chat_streams_two_answers_and_records_the_vote(server, page):
    app, _ = server
    expect(page.locator("#serving-line")).to_contain_text("Serving base")
    page.locator("#send-btn").click()  # an empty message is refused with a visible notice
    expect(page.locator("#vote-status")).to_contain_text("Type a message first")

    vote_buttons = [page.locator(f"#vote-{c}") for c in ("a", "b", "tie", "both_bad")]
    for button in vote_buttons:
        expect(button).to_be_disabled()
    page.locator("#msg-box textarea").fill('Hello there <img src=x onerror="window.__xss = 1">')
    page.locator("#msg-box textarea").press("Enter")
    for button in vote_buttons:  # enabled only once both answers are complete
        expect(button).to_be_enabled(timeout=WAIT_MS)
    shown_a = squash(page.locator("#answer-a").inner_text())
    assert shown_a and page.locator("#answer-b").inner_text().strip()

    page.locator("#vote-a").click()
    expect(page.locator("#vote-status")).to_contain_text("Vote recorded: A is better")
    for button in vote_buttons:
        expect(button).to_be_disabled()

    with sqlite3.connect(app.config.serve.db_path) as db:  # the vote is in the file, readable by any SQLite tool
        rows = db.execute("SELECT id, answer_a, voter, source, ended_with_eos_a FROM comparisons "
                          "WHERE choice = 'a'").fetchall()
        assert len(rows) == 1 and rows[0][2] and rows[0][3] == "ui"
        messages = db.execute("SELECT role, content, comparison_id FROM messages ORDER BY id").fetchall()
    assert [m[0] for m in messages] == ["user", "assistant"]
    assert messages[1][1] == rows[0][1] and messages[1][2] == rows[0][0]  # A joined the conversation

    cut = f"(cut at {app.config.serve.max_new_tokens} tokens)"   # the random tiny model rarely says EOS in 16
    assert shown_a.endswith(cut) != bool(rows[0][4]) and cut not in rows[0][1]   # marked on the page, not stored
    shown_a = shown_a.removesuffix(cut).strip()
    bubbles = page.locator("#conversation .message-row")
    expect(bubbles).to_have_count(2)
    assert "Hello there" in bubbles.nth(0).inner_text()
    if shown_a != "(empty answer)":  # the chosen answer continues the conversation
        # the Markdown panel and the Chatbot render a random answer's backslash escapes differently (seen: "\\'"
        # shown as "'" in one and "\\'" in the other), so compare the text without backslashes
        assert squash(bubbles.nth(1).inner_text()).replace("\\", "") == shown_a.replace("\\", "")
    assert page.evaluate("window.__xss") is None  # user text is rendered, never executed
    expect(page.locator("#serving-line")).to_contain_text("1 vote so far")


def test_a_refused_send_or_regenerate_leaves_the_page_as_it_was(server, page):
    from chat_app.chat import VOTE_LABELS

    vote_buttons = {c: page.locator(f"#vote-{c}") for c in ("a", "b", "tie", "both_bad")}
    box = page.locator("#msg-box textarea")

    def labels_intact():
        for choice, button in vote_buttons.items():
            expect(button).to_have_text(VOTE_LABELS[choice])

    page.locator("#regenerate-btn").click()                 # nothing to regenerate yet
    expect(page.locator("#vote-status")).to_contain_text("Nothing to regenerate")
    page.locator("#send-btn").click()                        # an empty message
    expect(page.locator("#vote-status")).to_contain_text("Type a message first")
    page.wait_for_timeout(1500)                              # the chained stream step has run by now
    expect(page.locator("#vote-status")).to_contain_text("Type a message first")
    labels_intact()

    box.fill("first question")
    box.press("Enter")
    expect(vote_buttons["a"]).to_be_enabled(timeout=WAIT_MS)
    answer_a = page.locator("#answer-a").inner_text()
    box.fill("a second question before voting")
    box.press("Enter")
    expect(page.locator("#vote-status")).to_contain_text("Pick the better answer")
    page.wait_for_timeout(1500)
    expect(page.locator("#vote-status")).to_contain_text("Pick the better answer")
    expect(box).to_have_value("a second question before voting")   # the typed message is not lost
    assert page.locator("#answer-a").inner_text() == answer_a      # the pair is still there to vote on
    expect(page.locator("#conversation .message-row")).to_have_count(1)
    labels_intact()
    for button in vote_buttons.values():
        expect(button).to_be_enabled()
    vote_buttons["b"].click()
    expect(page.locator("#vote-status")).to_contain_text("Vote recorded: B is better")


def test_engine_error_is_shown_and_regenerate_retries(server, page, monkeypatch):
    from chat_app.engine import Request

    app, _ = server
    failing = Request(messages=[])
    failing.events.put(("error", "generation failed: out of memory"))
    real_submit = app.engine.submit
    monkeypatch.setattr(app.engine, "submit", lambda *args, **kwargs: failing)
    page.locator("#msg-box textarea").fill("this one fails")
    page.locator("#send-btn").click()
    expect(page.locator("#vote-status")).to_contain_text("out of memory")
    expect(page.locator("#vote-status")).to_contain_text("Regenerate")
    expect(page.locator("#vote-a")).to_be_disabled()
    with sqlite3.connect(app.config.serve.db_path) as db:  # the failed pair's reserved row is gone
        prompts = [row[0] for row in db.execute("SELECT prompt_json FROM comparisons")]
    assert not any("this one fails" in p for p in prompts)

    monkeypatch.setattr(app.engine, "submit", real_submit)
    page.locator("#regenerate-btn").click()
    expect(page.locator("#vote-b")).to_be_enabled(timeout=WAIT_MS)
    page.locator("#vote-b").click()
    expect(page.locator("#vote-status")).to_contain_text("Vote recorded: B is better")


def test_operator_console_needs_the_password(server, page, monkeypatch):
    app, _ = server
    page.get_by_role("tab", name="Operator").click()
    password, unlock = page.locator("#op-password input"), page.locator("#op-unlock")

    monkeypatch.delenv("OPERATOR_PASSWORD", raising=False)
    unlock.click()
    expect(page.locator("#op-message")).to_contain_text("locked")
    expect(page.locator("#op-message")).to_contain_text("OPERATOR_PASSWORD")

    monkeypatch.setenv("OPERATOR_PASSWORD", PASSWORD)
    password.fill("not-the-password")
    unlock.click()
    expect(page.locator("#op-message")).to_contain_text("Wrong password")
    expect(page.locator("#op-console")).to_be_hidden()

    password.fill(PASSWORD)
    password.press("Enter")
    expect(page.locator("#op-console")).to_be_visible()
    expect(page.locator("#op-message")).to_contain_text("Unlocked")
    expect(page.locator("#op-schedule")).to_contain_text("Schedule enabled: every 600 min when ≥ 1000 new votes")
    expect(page.locator("#op-progress")).to_contain_text("No training run")

    with page.expect_download() as download:  # the export holds every A/B vote as a JSONL row
        page.locator("#op-export").click()
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    assert len(rows) == len(app.store.export_preferences())
    assert all(set(row) == {"prompt", "chosen", "rejected", "versions"} for row in rows)   # versions: see canary

    password.fill("not-the-password")  # every action checks the password again, server-side
    page.locator("#op-serve").click()
    expect(page.locator("#op-message")).to_contain_text("Wrong password")
    expect(page.locator("#op-console")).to_be_hidden()


def test_the_schedule_controls_follow_the_server_and_do_what_they_say(server, page, monkeypatch):
    app, _ = server
    monkeypatch.setenv("OPERATOR_PASSWORD", PASSWORD)
    page.get_by_role("tab", name="Operator").click()
    page.locator("#op-password input").fill(PASSWORD)
    page.locator("#op-unlock").click()
    pause, line = page.locator("#op-pause"), page.locator("#op-schedule")
    expect(pause).to_have_text("Pause schedule")
    try:
        app.scheduler.update_schedule({"enabled": False, "min_new_votes": 999}, actor="api")   # elsewhere
        expect(pause).to_have_text("Resume schedule", timeout=10_000)     # the console's refresh shows it
        expect(line).to_contain_text("paused")
        expect(page.locator("#op-min-votes input")).to_have_value("999")
        page.locator("#op-every input").fill("45")                         # typing survives the refreshes
        page.wait_for_timeout(2500)
        expect(page.locator("#op-every input")).to_have_value("45")
        page.locator("#op-save").click()
        expect(page.locator("#op-action")).to_contain_text("Schedule saved")
        assert app.scheduler.settings["retrain_every_minutes"] == 45 and app.scheduler.settings["enabled"] is False

        pause.click()                                                      # "Resume schedule" resumes
        expect(page.locator("#op-action")).to_contain_text("Schedule resumed")
        expect(pause).to_have_text("Pause schedule")
        assert app.scheduler.settings["enabled"] is True
        pause.click()
        expect(page.locator("#op-action")).to_contain_text("Schedule paused")
        assert app.scheduler.settings["enabled"] is False
    finally:
        app.scheduler.update_schedule({"enabled": True, "retrain_every_minutes": 600, "min_new_votes": 1000})


def test_the_operator_runs_an_ab_trial_and_decides_it_by_hand(server, page, monkeypatch, tmp_path):
    """A kept version against the served one: the page shows the trial and the leaderboard, and obeys decisions."""
    from peft import LoraConfig, get_peft_model

    from chat_app.model import load_model

    app, _ = server
    monkeypatch.setenv("OPERATOR_PASSWORD", PASSWORD)
    adapter = get_peft_model(load_model(app.config.model, app.engine.tokenizer),
                             LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "ab")
    name = f"v{len(app.store.versions()) + 1}"
    app.store.add_version(name, str(tmp_path / "ab"), parent="base", run_id=None, metrics={}, status="retired")
    page.get_by_role("tab", name="Operator").click()
    page.locator("#op-password input").fill(PASSWORD)
    page.locator("#op-unlock").click()
    expect(page.locator("#op-canary")).to_contain_text("No trial running")
    try:
        page.locator("#op-version input").fill(name)
        page.locator("#op-version input").press("Enter")
        page.locator("#op-canary-start").click()
        expect(page.locator("#op-action")).to_contain_text(f"A/B trial started: {name} against base")
        expect(page.locator("#op-canary")).to_contain_text(f"{name} (canary) against base (serving)")
        page.locator("#op-canary-mode").click()                          # "Decide by hand"
        expect(page.locator("#op-canary")).to_contain_text("by hand")
        expect(page.locator("#op-canary-mode")).to_have_text("Let the votes decide")
        app.canary.state["share"] = 1.0                                  # every new comparison is a trial one
        for i in range(3):                                               # voters prefer the canary's answers
            from chat_app.chat import finish_pair, start_pair
            cid, job = start_pair(app.store, app.engine, [{"role": "user", "content": f"ab {i}"}], source="test",
                                  max_new_tokens=4, temperature=0.7, top_p=0.9,
                                  versions=app.canary.versions_for_new_pair())
            finish_pair(app.store, cid, job.result())
            row = app.store.comparison(cid)
            app.store.record_vote(cid, "a" if row["version_a"] == name else "b", "test")
        expect(page.locator("#op-canary")).to_contain_text(f"{name} wins 1.00", timeout=10_000)
        expect(page.locator("#op-leaderboard")).to_contain_text(name, timeout=10_000)
        page.locator("#op-canary-decision input").fill("retire")
        page.locator("#op-canary-decision input").press("Enter")
        page.locator("#op-canary-decide").click()
        expect(page.locator("#op-action")).to_contain_text("Decided: retire")
        expect(page.locator("#op-canary")).to_contain_text("No trial running")
        assert app.serving_version() == "base" and app.store.version(name)["status"] == "retired"
    finally:
        if app.canary.trial:
            app.canary.act("retire" if app.canary.trial["phase"] == "canary" else "rollback", actor="test")
        app.canary.set_mode(auto=True, share=app.config.canary.share)
