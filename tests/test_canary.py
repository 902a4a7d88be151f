"""Canary trials (chat_app/canary.py): the ratings, the decision rule, mixed-version batches, and the flow end to end."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from chat_app.canary import ELO, decide, version_ratings
from conftest import in_process_app

HI = [{"role": "user", "content": "hi"}]


def synthetic_votes(strengths: dict[str, float], n: int, seed: int, length_effect: float = 0.0,
                    tokens: dict[str, tuple[int, int]] | None = None) -> list[dict]:
    """Votes between random pairs of versions, drawn from a Bradley-Terry model with known strengths (log-odds)
    plus a judge that likes length by `length_effect` per unit of relative length difference. Each answer's length
    is drawn from its version's range (answers vary: that is what lets a fit tell length from version)."""
    rng = random.Random(seed)
    names, tokens = list(strengths), tokens or {name: (50, 50) for name in strengths}
    votes = []
    for _ in range(n):
        a, b = rng.sample(names, 2)
        length_a, length_b = rng.randint(*tokens[a]), rng.randint(*tokens[b])
        z = (length_a - length_b) / (length_a + length_b)
        p = 1 / (1 + math.exp(-(strengths[a] - strengths[b] + length_effect * z)))
        votes.append({"version_a": a, "version_b": b, "choice": "a" if rng.random() < p else "b",
                      "tokens_a": length_a, "tokens_b": length_b})
    return votes


def by_version(rows):
    return {row["version"]: row for row in rows}


def test_ratings_recover_known_strengths_within_their_intervals():
    truth = {"base": 0.0, "v1": 0.6, "v2": 1.2}
    rows = by_version(version_ratings(synthetic_votes(truth, 1500, seed=1), bootstrap=200))
    for name, strength in truth.items():
        expected = 1000 + ELO * strength
        low, high = rows[name]["interval"]
        assert 0 <= high - low < 120                                # 1500 votes pin a rating to tens of points
        margin = (high - low) / 2                                     # a 95% interval misses 1 time in 20: widen it
        assert low - margin <= expected <= high + margin, (name, expected, rows[name])
    assert [r["version"] for r in version_ratings(synthetic_votes(truth, 1500, seed=1), bootstrap=50)] == \
        ["v2", "v1", "base"]                                      # best first
    assert rows["v1"]["vs_parent"]["comparisons"] > 0 and rows["v1"]["parent"] == "base"
    assert rows["v1"]["vs_parent"]["win_rate"] > 0.5


def test_the_length_controlled_rating_removes_a_pure_length_effect():
    # v1 is no better than base; it only writes longer, and the judge likes long answers
    votes = synthetic_votes({"base": 0.0, "v1": 0.0}, 800, seed=2, length_effect=4.0,
                            tokens={"base": (20, 100), "v1": (40, 128)})
    rows = by_version(version_ratings(votes, bootstrap=200))
    assert rows["v1"]["interval"][0] > 1000 + 50                  # raw: v1 looks much better
    low, high = rows["v1"]["interval_lc"]
    margin = (high - low) / 2                                     # as above: 20 seeds covered 1000 18 times unwidened
    assert low - margin <= 1000 <= high + margin, rows["v1"]     # at equal length: no better
    assert rows["v1"]["rating"] - rows["v1"]["rating_lc"] > 50  # the length effect is what the control removed


def outcomes(wins: int, losses: int, ties: int = 0) -> list[float]:
    return [1.0] * wins + [0.0] * losses + [0.5] * ties


@pytest.mark.parametrize("phase, wins, losses, action", [
    ("canary", 10, 2, "wait"),          # too few votes to decide, however lopsided
    ("canary", 30, 10, "promote"),
    ("canary", 10, 30, "retire"),
    ("canary", 21, 19, "wait"),         # unsure: keep collecting
    ("canary", 101, 99, "retire"),      # unsure at the cap: the candidate was not shown better
    ("watch", 10, 30, "rollback"),
    ("watch", 21, 19, "wait"),
    ("watch", 30, 10, "confirm"),
])
def test_the_decision_rule_promotes_retires_and_waits_where_it_should(phase, wins, losses, action):
    n = wins + losses
    verdict = decide(outcomes(wins, losses), [(50, 50)] * n, phase=phase, min_votes=20, max_votes=200)
    assert verdict.action == action, verdict.reason
    assert verdict.figures["comparisons"] == n
    low, high = verdict.figures["win_rate_interval"]
    assert low < wins / n < high


def test_looking_after_every_vote_the_rule_rarely_crowns_a_version_that_is_no_better():
    """Simulated trials (a third ties) through decision_bounds at the default z, deciding as `decide` does from
    30 to 200 votes: with no difference each false verdict stays near 5%; a real 0.65 is found nearly always."""
    from chat_app.canary import decision_bounds

    rng = np.random.default_rng(0)

    def verdicts(p_win: float, trials: int = 300) -> dict:
        counts = {"promote": 0, "retire": 0, "undecided": 0}
        for _ in range(trials):
            u = rng.random(200)
            y = np.where(u < 1 / 3, 0.5, np.where(u < 1 / 3 + p_win, 1.0, 0.0))
            verdict = "undecided"
            for n in range(30, 201):
                low, high = decision_bounds(y[:n], z=2.5)
                if low > 0.5 or high < 0.5:
                    verdict = "promote" if low > 0.5 else "retire"
                    break
            counts[verdict] += 1
        return {k: v / trials for k, v in counts.items()}

    null = verdicts(p_win=1 / 3)                      # wins as often as losses: win rate 0.5
    assert null["promote"] < 0.09 and null["retire"] < 0.09, null      # 1.96 gave 0.15 each
    better = verdicts(p_win=1 / 3 + 0.15)             # win rate 0.65
    assert better["promote"] > 0.95 and better["retire"] == 0, better


def test_ties_count_half_and_the_figures_carry_a_length_controlled_rate():
    verdict = decide(outcomes(20, 10, ties=10), [(80, 40)] * 20 + [(40, 80)] * 20, phase="canary",
                     min_votes=20, max_votes=200)
    assert verdict.figures["win_rate"] == pytest.approx((20 + 5) / 40)
    assert verdict.figures["ties"] == 10
    assert verdict.figures["length_controlled_win_rate"] is not None


# -- the engine: two versions in one step ---------------------------------------------------------
@pytest.fixture
def two_versions(tiny_config, tmp_path):
    """The tiny model's base and a v1 adapter that changes its answers."""
    from peft import LoraConfig, get_peft_model

    from chat_app.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_config.model)
    base = load_model(tiny_config.model, tokenizer)
    torch.manual_seed(0)
    trained = get_peft_model(load_model(tiny_config.model, tokenizer),
                             LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"],
                                        init_lora_weights=False))
    trained.save_pretrained(tmp_path / "v1")
    return base, tokenizer, str(tmp_path / "v1")


def greedy(engine, versions=None, seeds=(1, 2)):
    return engine.submit(HI, n=2, max_new_tokens=8, temperature=0.0, seeds=list(seeds), versions=versions).result()


def test_a_batch_with_rows_of_two_versions_gives_each_row_its_own_versions_answer(two_versions, tiny_config):
    from chat_app.engine import GenerationEngine

    base, tokenizer, v1 = two_versions
    engine = GenerationEngine(base, tokenizer, max_context_tokens=256, weights="model").start()
    try:
        only_base = greedy(engine)
        engine.set_second(v1, "v1")
        assert greedy(engine).texts == only_base.texts                   # unlabelled requests: the served version
        mixed = greedy(engine, versions=["v1", "base"])
        assert mixed.versions == ["v1", "base"]
        assert mixed.texts[1] == only_base.texts[1]
        engine.swap(v1, "v1")                                            # now v1 serves alone
        only_v1 = greedy(engine)
        assert only_v1.texts != only_base.texts                          # the adapter changes the answers
        assert mixed.texts[0] == only_v1.texts[0]
        engine.set_second(None, "base")                                  # base beside v1 again, the other way
        flipped = engine.submit(HI, n=2, max_new_tokens=8, temperature=0.0, seeds=[1, 2],
                                versions=["base", "v1"]).result()
        assert flipped.texts == [only_base.texts[0], only_v1.texts[1]] and flipped.versions == ["base", "v1"]
        engine.set_second(None, None)                                    # no second version: a label for it
        assert greedy(engine, versions=["base", "v1"]).versions == ["v1", "v1"]   # falls back to the served one
    finally:
        engine.stop()


# -- the whole flow through the HTTP API --------------------------------------------------------
def register_v1(app, adapter: str):
    app.store.add_version("v1", adapter, parent="base", run_id=None, metrics={}, status="candidate")


def chat_and_vote(app, client, prefer: str, votes: int) -> int:
    """A scripted judge: chat through the API and vote for whichever side `prefer` (a version) answered, tie when
    both sides are the same version, until the trial's phase ends. Returns the trial votes cast."""
    cast, phase = 0, app.canary.trial and app.canary.trial["phase"]
    for i in range(votes):
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"q{i}"}],
                                                             "n": 2, "max_tokens": 4})
        assert response.status_code == 200, response.text
        comparison = app.store.comparison(response.json()["comparison_id"])
        sides = comparison["version_a"], comparison["version_b"]
        choice = "tie" if sides[0] == sides[1] else ("a" if sides[0] == prefer else "b")
        cast += sides[0] != sides[1]
        assert client.post("/v1/feedback", json={"comparison_id": comparison["id"], "choice": choice}).status_code == 200
        app.canary.decide_now()   # the worker would, a moment later; here at once, so the loop sees it
        if app.canary.trial is None or app.canary.trial["phase"] != phase:   # decided
            break
    return cast


OVERRIDES = ["canary.share=1.0", "canary.min_votes=12", "canary.max_votes=60", "limits.votes_per_minute=0",
             "limits.requests_per_minute=0"]


def test_a_canary_the_voters_prefer_is_promoted_then_rolled_back_when_they_turn(two_versions, tmp_path, monkeypatch):
    _, _, v1 = two_versions
    monkeypatch.setenv("OPERATOR_PASSWORD", "pw")
    app, client = in_process_app(tmp_path / "app", OVERRIDES)
    auth = {"Authorization": "Bearer pw"}
    try:
        register_v1(app, v1)
        assert client.post("/api/operator/canary", json={"action": "start", "version": "v1"}).status_code == 401
        started = client.post("/api/operator/canary", json={"action": "start", "version": "v1"}, headers=auth)
        assert started.status_code == 200, started.text
        assert app.store.version("v1")["status"] == "canary"
        trial_votes = chat_and_vote(app, client, prefer="v1", votes=40)
        assert app.serving_version() == "v1"                       # promoted by the votes
        promote = [e for e in app.store.serving_events() if e["action"] == "canary-promote"][-1]
        assert promote["actor"] == "votes" and promote["details"]["win_rate_interval"][0] > 0.5
        assert 12 <= promote["details"]["comparisons"] <= trial_votes
        status = client.get("/api/status").json()
        assert status["canary"]["trial"]["phase"] == "watch"
        board = by_version(status["leaderboard"])
        assert board["v1"]["rating"] > board["base"]["rating"] and board["v1"]["vs_parent"]["win_rate"] > 0.5

        chat_and_vote(app, client, prefer="base", votes=40)          # the users turn against it
        assert app.serving_version() == "base"
        rollback = [e for e in app.store.serving_events() if e["action"] == "canary-rollback"][-1]
        assert rollback["details"]["win_rate_interval"][1] < 0.5
        assert app.store.version("v1")["status"] == "retired" and app.canary.trial is None
        exported = client.get("/api/operator/export", headers=auth).text.splitlines()
        assert any('"v1"' in line and '"base"' in line for line in exported)   # each pair names its versions
    finally:
        app.close()


def test_a_canary_the_voters_dislike_is_retired_and_manual_mode_waits_for_the_operator(two_versions, tmp_path,
                                                                                       monkeypatch):
    _, _, v1 = two_versions
    monkeypatch.setenv("OPERATOR_PASSWORD", "pw")
    app, client = in_process_app(tmp_path / "app", OVERRIDES)
    auth = {"Authorization": "Bearer pw"}
    try:
        register_v1(app, v1)
        client.post("/api/operator/canary", json={"action": "start", "version": "v1"}, headers=auth)
        assert client.put("/api/operator/canary", json={"auto": False}, headers=auth).json()["mode"] == "manual"
        chat_and_vote(app, client, prefer="base", votes=30)
        assert app.canary.trial is not None                           # manual: the votes only advise
        assert app.canary.status()["trial"]["next_decision"] == "retire"
        bad = client.post("/api/operator/canary", json={"action": "promote!"}, headers=auth)
        assert bad.status_code == 400
        decided = client.post("/api/operator/canary", json={"action": "retire"}, headers=auth)
        assert decided.status_code == 200, decided.text
        assert app.serving_version() == "base" and app.store.version("v1")["status"] == "retired"
        retire = [e for e in app.store.serving_events() if e["action"] == "canary-retire"][-1]
        assert retire["actor"] == "operator" and retire["details"]["win_rate_interval"][1] < 0.5
        # no trial: every new comparison is the served version against itself
        response = client.post("/v1/chat/completions", json={"messages": HI, "n": 2, "max_tokens": 2}).json()
        comparison = app.store.comparison(response["comparison_id"])
        assert comparison["version_a"] == comparison["version_b"] == "base"
    finally:
        app.close()


@pytest.mark.parametrize("share", [0.25, 0.0])
def test_a_candidate_that_passes_the_gate_becomes_a_canary_or_with_no_share_is_served(two_versions, tmp_path, share):
    from chat_app.scheduler import RetrainScheduler

    _, _, v1 = two_versions
    app, _ = in_process_app(tmp_path / "app", [f"canary.share={share}"])
    try:
        scheduler = RetrainScheduler(app)                       # not started: after_run is what a finished run calls
        run_id = app.store.start_run("test")
        app.store.add_version("v1", v1, parent="base", run_id=run_id, metrics={}, status="candidate")
        app.store.finish_run(run_id, "succeeded", candidate_version="v1")
        scheduler.after_run(run_id, 0)
        if share:
            assert app.serving_version() == "base" and app.engine.second_version == "v1"
            assert app.store.version("v1")["status"] == "canary"
            assert app.canary.status()["trial"]["candidate"] == "v1"
            assert [e["action"] for e in app.store.serving_events()] == ["canary"]
        else:
            assert app.serving_version() == "v1" and app.engine.second_version is None
            assert app.store.version("v1")["status"] == "serving" and app.canary.trial is None
    finally:
        app.close()


def test_a_trial_survives_a_restart(two_versions, tmp_path):
    _, _, v1 = two_versions
    app, _ = in_process_app(tmp_path / "app")
    try:
        register_v1(app, v1)
        app.canary.begin("v1", actor="test")
    finally:
        app.close()
    app, client = in_process_app(tmp_path / "app")                # the same database and settings
    try:
        assert app.canary.trial["candidate"] == "v1" and app.engine.second_version == "v1"
        assert client.get("/api/status").json()["canary"]["trial"]["phase"] == "canary"
    finally:
        app.close()


def test_simulated_users_vote_a_trial_to_its_decisions(two_versions, tmp_path, capsys):
    """simulate --server's trial loop, over the in-process API: it votes until the canary is promoted, then through
    the watch until it is confirmed, and prints each decision with the votes it took."""
    import json

    from trainer.simulate import vote_through_trial

    _, _, v1 = two_versions
    app, client = in_process_app(tmp_path / "app", OVERRIDES)
    try:
        register_v1(app, v1)
        app.canary.begin("v1", actor="test")

        def safe_vote(i):   # a judge that likes v1's answers (it is told the versions: a scripted judge)
            body = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": f"s{i}"}],
                                                             "n": 2, "max_tokens": 4}).json()
            row = app.store.comparison(body["comparison_id"])
            choice = "tie" if row["version_a"] == row["version_b"] else "a" if row["version_a"] == "v1" else "b"
            client.post("/v1/feedback", json={"comparison_id": row["id"], "choice": choice})
            return body["model"], choice, 0.0

        vote_through_trial(client, safe_vote, concurrency=4, wait_s=300)
        decisions = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert [d["decision"]["action"] for d in decisions] == ["promote", "confirm"]
        assert all(d["decision"]["votes"] >= 12 for d in decisions) and app.serving_version() == "v1"
        assert app.canary.trial is None and app.engine.second_version is None
    finally:
        app.close()
