"""The live loop: schedule decisions, persisted settings, crash containment, hot-swap under load."""
import time

import pytest

from chat_app.scheduler import RetrainScheduler, should_retrain


@pytest.mark.parametrize("kwargs, start, words", [
    (dict(enabled=True, is_running=False, new_votes=5, min_new_votes=5), True, "5 new votes"),
    (dict(enabled=True, is_running=False, new_votes=4, min_new_votes=5), False, "need 5"),
    (dict(enabled=False, is_running=False, new_votes=50, min_new_votes=5), False, "paused"),
    (dict(enabled=True, is_running=True, new_votes=50, min_new_votes=5), False, "already in progress"),
    (dict(enabled=False, is_running=False, new_votes=0, min_new_votes=5, forced=True), True, "operator"),
    (dict(enabled=True, is_running=True, new_votes=0, min_new_votes=5, forced=True), False, "already"),
])
def test_schedule_decisions(kwargs, start, words):
    decision = should_retrain(**kwargs)
    assert decision.start is start and words in decision.reason


@pytest.fixture
def app(tiny_config):
    from chat_app.app import build_app

    app = build_app(tiny_config, with_scheduler=False)
    yield app
    app.close()


def test_new_votes_count_from_the_last_run_and_settings_survive_a_restart(app):
    from test_store import make_pair

    scheduler = RetrainScheduler(app)
    scheduler.start()
    try:
        for _ in range(3):
            app.store.record_vote(make_pair(app.store), "a", "t")
        assert scheduler.new_votes() == 3
        assert not scheduler.check().start                      # default needs more votes
        scheduler.update_schedule({"min_new_votes": 2, "retrain_every_minutes": 0.5, "enabled": False})
        job = scheduler.scheduler.get_job("retrain")
        assert job.trigger.interval.total_seconds() == 30 and job.next_run_time is None   # paused
        skipped = app.store.start_run("earlier")                # a run that found too few pairs trained nothing:
        app.store.finish_run(skipped, "skipped", error="skipped: 3 pairs, need 16")
        assert scheduler.new_votes() == 3                       # its votes still count
        app.store.start_run("earlier")                          # votes before a run that read them no longer count
        assert scheduler.new_votes() == 0
    finally:
        scheduler.shutdown()
    again = RetrainScheduler(app)                                # a restart reads the stored settings
    assert again.settings["min_new_votes"] == 2 and again.settings["enabled"] is False


def test_a_run_whose_reward_model_read_chance_waits_for_new_votes(app):
    # reward.min_skill_confidence: that run read every vote; the next must not fit the same votes again
    from test_store import make_pair

    scheduler = RetrainScheduler(app)
    for _ in range(3):
        app.store.record_vote(make_pair(app.store), "a", "t")
    run = app.store.start_run("scheduler")
    app.store.finish_run(run, "skipped", error="skipped: the reward model read 1 of 3 pairs it had not seen",
                         metrics={"rm/chance_p_value": 0.88})
    assert scheduler.new_votes() == 0
    time.sleep(0.01)                                            # a vote after that run counts
    app.store.record_vote(make_pair(app.store), "b", "t")
    assert scheduler.new_votes() == 1


def test_a_killed_training_run_is_recorded_and_serving_goes_on(app):
    scheduler = RetrainScheduler(app)
    scheduler.start()
    try:
        started, message = scheduler.run_now("test")
        assert started, message
        assert not scheduler.run_now("test")[0]                  # never two at once
        scheduler.process.kill()                                 # as the OOM killer would
        deadline = time.time() + 60
        while app.store.run(scheduler.current_run_id)["status"] == "running" and time.time() < deadline:
            time.sleep(0.2)
        run = app.store.run(scheduler.current_run_id)
        assert run["status"] == "failed" and "exited with code" in run["error"]
        reply = app.engine.submit([{"role": "user", "content": "still up?"}], n=2, max_new_tokens=4).result()
        assert reply.version == "base"
    finally:
        scheduler.shutdown()


def test_a_failing_training_run_records_its_error(app, tiny_config):
    tiny_config.schedule.seed_prompts = "does/not/exist.jsonl"
    scheduler = RetrainScheduler(app)
    scheduler.start()
    try:
        app.config.reward.min_pairs = 0                          # go past the 'too few pairs' skip
        assert scheduler.run_now("test")[0]
        scheduler.process.wait(timeout=300)
        deadline = time.time() + 30
        while app.store.run(scheduler.current_run_id)["status"] == "running" and time.time() < deadline:
            time.sleep(0.2)
        run = app.store.run(scheduler.current_run_id)
        assert run["status"] in ("failed", "skipped"), run
        assert run["error"]
        assert app.serving_version() == "base"
    finally:
        scheduler.shutdown()


def test_a_swap_while_requests_stream_fails_none_and_mixes_no_versions(app, tmp_path, tiny_config):
    """Greedy answers are a function of the weights: each must equal its claimed version's own answer."""
    from peft import LoraConfig, get_peft_model

    from chat_app.model import load_model
    adapter = get_peft_model(load_model(tiny_config.model, app.engine.tokenizer),
                             LoraConfig(r=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    adapter.save_pretrained(tmp_path / "v1")
    question = [{"role": "user", "content": "same question"}]
    greedy = dict(n=1, max_new_tokens=12, temperature=0.0)
    expected = {"base": app.engine.submit(question, **greedy).result().texts[0]}
    jobs = [app.engine.submit(question, **greedy) for _ in range(6)]
    pause_ms = app.engine.swap(str(tmp_path / "v1"), "v1")
    jobs += [app.engine.submit(question, **greedy) for _ in range(6)]
    expected["v1"] = app.engine.submit(question, **greedy).result().texts[0]
    assert expected["v1"] != expected["base"]
    results = [job.result(timeout=120) for job in jobs]
    assert {r.version for r in results} == {"base", "v1"}
    for result in results:
        assert result.texts[0] == expected[result.version]
    assert pause_ms < 10_000


def test_the_progress_line_says_what_is_happening_in_words_and_for_how_long():
    from datetime import datetime, timezone

    from chat_app.ui import progress_text

    runs = [{"id": 3, "status": "running", "trigger": "operator", "started_at": "2026-11-23T03:00:00+00:00",
             "progress": {"stage": "ppo", "step": 5, "steps": 10, "ppo/loss": 0.25, "rm/accuracy": 0.75,
                          "updated_at": 1.795e9}}]
    text = progress_text(runs, now=datetime(2026, 11, 23, 3, 12, 30, tzinfo=timezone.utc))
    assert "PPO: the policy learns from the reward model" in text and "step 5/10" in text
    assert "12 min ago" in text                              # elapsed time: a long stage is not a hung one
    assert "PPO loss 0.25" in text and "reward model held-out accuracy 0.75" in text
    assert "updated_at" not in text


def test_an_answer_cut_at_the_token_limit_is_marked_as_cut():
    from chat_app.ui import shown

    assert shown("Paris is the capital.", ended_with_eos=True, tokens=6) == "Paris is the capital."
    assert shown("Paris is the", ended_with_eos=False, tokens=3) == "Paris is the\n\n*(cut at 3 tokens)*"
    assert shown("  ", ended_with_eos=False, tokens=16).startswith("*(empty answer)*")
