"""Let real votes decide: a candidate that passed the gate meets the serving version in live A/B comparisons.

A trial has two phases. `canary`: the candidate serves one side of a share of new comparisons, the serving version
the other (sides at random, versions hidden); it is promoted when it wins with confidence, retired when it loses
with confidence or when `max_votes` leave it undecided. `watch`: once promoted, it keeps meeting its parent on the
same share; a fresh sample of votes (those since the promotion) rolls it back if it loses with confidence, and the
watch ends at `max_votes` or when it wins with confidence. Every decision is a serving_events row with its figures.

The figures are Chatbot Arena's for two players: the candidate's win rate with ties (and both-bad) as half, its 95%
bootstrap interval, and beside it the length-controlled win rate (trainer.ratings). The decision reads the raw win
rate (the users' preference as they voted it, length and all) within wider bounds than 95%, because it looks after
every vote (`decision_bounds`); the length-controlled one shows whether a verdict was only about length.
"""
from __future__ import annotations

import logging
import math
import random
import threading
from dataclasses import dataclass

import numpy as np

from chat_app.store import utc_now
from trainer.ratings import (bradley_terry, length_controlled_win_rate, relative_length_difference,
                             win_rate_summary)

log = logging.getLogger(__name__)
SETTINGS_KEY = "canary"
OUTCOME = {"a": 1.0, "b": 0.0, "tie": 0.5, "both_bad": 0.5}   # from A's side; Arena counts both-bad as a tie
ELO = 400 / math.log(10)   # log-odds to Arena's Elo points


@dataclass
class Verdict:
    action: str
    """wait | promote | retire (phase canary); wait | rollback | confirm (phase watch)."""
    reason: str
    figures: dict


def decision_bounds(outcomes, z: float) -> tuple[float, float]:
    """The win rate ± z standard errors (ties as half): the interval the decisions read.

    Not the 95% interval shown beside it: the rule looks again after every vote, and with a 95% interval (z = 1.96)
    a version no better than the other was promoted in 15% of simulated trials and retired in 15% (30 to 200
    votes, a third of them ties). z = 2.5, the default, brings each to about 5% (Pocock's constant bound for this
    many looks; tests/test_canary.py simulates it).
    """
    y = np.asarray(outcomes, dtype=float)
    if not len(y):
        return 0.0, 1.0
    spread = z * np.sqrt(max(y.var(), 1e-12) / len(y))
    return float(y.mean() - spread), float(y.mean() + spread)


def decide(outcomes: list[float], lengths: list[tuple[int, int]], *, phase: str, min_votes: int, max_votes: int,
           z: float = 2.5, seed: int = 0) -> Verdict:
    """The decision rule on the candidate's outcomes (1 won, 0 lost, 0.5 tie) against the other version.

    Confident means the win rate's `decision_bounds` lie wholly above (or below) one half. The figures carry the
    95% bootstrap interval and the length-controlled win rate too, for people to read.
    """
    figures = length_controlled_win_rate(outcomes, relative_length_difference(*zip(*lengths)) if lengths else [],
                                         bootstrap=1000, seed=seed)
    n, interval = figures["comparisons"], figures["win_rate_interval"]
    low, high = decision_bounds(outcomes, z)
    figures["decision_bounds"] = [low, high]
    shown = (f"win rate {figures['win_rate']:.2f} [{interval[0]:.2f}, {interval[1]:.2f}] over {n} votes"
             if n else "no votes yet")
    if figures.get("length_controlled_win_rate") is not None:
        shown += f", {figures['length_controlled_win_rate']:.2f} at equal length"
    if n < min_votes:
        return Verdict("wait", f"{shown}; deciding from {min_votes} votes", figures)
    better, worse = low > 0.5, high < 0.5
    if phase == "canary":
        if better:
            return Verdict("promote", f"the canary won: {shown}", figures)
        if worse:
            return Verdict("retire", f"the canary lost: {shown}", figures)
        if n >= max_votes:
            return Verdict("retire", f"no confident difference after {n} votes (the cap): {shown}", figures)
    else:
        if worse:
            return Verdict("rollback", f"after promotion it lost to its parent: {shown}", figures)
        if better or n >= max_votes:
            return Verdict("confirm", f"it holds against its parent: {shown}", figures)
    return Verdict("wait", f"not sure yet: {shown}", figures)


def version_ratings(votes: list[dict], *, parents: dict[str, str | None] | None = None, bootstrap: int = 200,
                    seed: int = 0) -> list[dict]:
    """A leaderboard from every cross-version vote: Bradley-Terry ratings (Elo points, base or the oldest at 1000)
    with 95% bootstrap intervals, the same with the answer-length difference as a covariate (style control),
    votes per version and the win rate against its parent.

    Args:
        votes: {version_a, version_b, choice, tokens_a, tokens_b} rows (Store.cross_version_votes).
    """
    votes = [v for v in votes if v["version_a"] != v["version_b"]]
    if not votes:
        return []
    players = sorted({v["version_a"] for v in votes} | {v["version_b"] for v in votes},
                     key=lambda p: (p != "base", len(p), p))   # base first, then v1, v2, ..., v10
    comparisons = [(v["version_a"], v["version_b"], OUTCOME[v["choice"]]) for v in votes]
    lengths = relative_length_difference([v["tokens_a"] or 0 for v in votes], [v["tokens_b"] or 0 for v in votes])
    raw = bradley_terry(players, comparisons, anchor=players[0], bootstrap=bootstrap, seed=seed)
    controlled = bradley_terry(players, comparisons, lengths[:, None], anchor=players[0], bootstrap=bootstrap,
                               seed=seed)
    rows = []
    for player in players:
        row = {"version": player, "rating": round(1000 + ELO * raw["ratings"][player], 1),
               "interval": [round(1000 + ELO * x, 1) for x in raw["intervals"][player]],
               "rating_lc": round(1000 + ELO * controlled["ratings"][player], 1),
               "interval_lc": [round(1000 + ELO * x, 1) for x in controlled["intervals"][player]],
               "votes": sum(player in (a, b) for a, b, _ in comparisons),
               "parent": (parents or {}).get(player), "vs_parent": None}
        parent = row["parent"] or ("base" if player != "base" else None)
        against = [o if a == player else 1 - o for a, b, o in comparisons if {a, b} == {player, parent}]
        if parent and against:
            summary = win_rate_summary(against, bootstrap=bootstrap, seed=seed)
            row["parent"] = parent
            row["vs_parent"] = {k: summary[k] for k in ("comparisons", "wins", "losses", "ties", "win_rate",
                                                        "win_rate_interval")}
        rows.append(row)
    rows.sort(key=lambda r: -r["rating"])
    return rows


class Canary:
    """The trial in progress (kept in the store's settings, so it survives a restart) and the decisions on it.

    Thread-safe: votes arrive on any thread; a decision (which may swap the served version) runs on this object's
    own worker thread, so a vote's HTTP request never waits for a swap.
    """

    def __init__(self, app):
        self.app, self.config = app, app.config.canary
        stored = app.store.get_setting(SETTINGS_KEY, {}) or {}
        self.state = {"trial": None, "auto": self.config.auto, "share": self.config.share, **stored}
        self.last_verdict: Verdict | None = None
        self._board: tuple[tuple, list[dict]] = ((), [])   # (what it was computed from, the leaderboard)
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._stopping = False
        self._worker = threading.Thread(target=self._loop, name="canary-decisions", daemon=True)
        app.store.vote_listeners.append(self._on_vote)

    # -- state ---------------------------------------------------------------------------------
    @property
    def trial(self) -> dict | None:
        return self.state["trial"]

    def _save(self):
        self.app.store.set_setting(SETTINGS_KEY, self.state)

    def start(self) -> "Canary":
        """Load the trial's other version beside the served one (after a restart), start deciding."""
        trial = self.trial
        if trial:
            other = trial["incumbent"] if trial["phase"] == "watch" else trial["candidate"]
            try:
                self._load_other(other)
            except Exception as error:   # a missing adapter: end the trial rather than refuse to start
                if self.app.is_schedule_holder:   # another replica's trial is not this one's to end
                    log.error("could not restore the %s trial (%s); ending it", other, error)
                    self._end(None, "the version could not be loaded after a restart")
                else:
                    log.error("could not load %s for the trial (%s); this replica serves its pairs unmixed",
                              other, error)
        self._worker.start()
        return self

    def stop(self):
        self._stopping = True
        self._wake.set()

    def follow(self):
        """Adopt the trial state another replica stored (its operator's action, the holder's decision): load the
        trial's other version beside the served one, or drop it. Called by chat_app/replicas.py on PostgreSQL."""
        with self.lock:   # read inside: a decision of this replica's own must not be undone by an older read
            stored = self.app.store.get_setting(SETTINGS_KEY)
            if not stored or stored == self.state:
                return
            trial = stored.get("trial")
            other = None if not trial else trial["incumbent"] if trial["phase"] == "watch" else trial["candidate"]
            if other != self.app.engine.second_version:
                try:
                    if other is None:
                        self.app.engine.set_second(None, None)
                    else:
                        self._load_other(other)
                except RuntimeError as error:   # as at a restart: this replica's pairs stay unmixed
                    log.error("could not load %s for the trial (%s); this replica serves its pairs unmixed",
                              other, error)
            self.state = {**self.state, **stored}
            log.info("canary state from the database: %s",
                     trial and {k: trial[k] for k in ("candidate", "phase")})

    def _load_other(self, version: str):
        row = None if version == "base" else self.app.store.version(version)
        self.app.engine.set_second(row["adapter_path"] if row else None, version)

    def status(self) -> dict:
        """For /api/status and the operator page: the mode, the trial and the figures it would be decided on."""
        with self.lock:
            trial = dict(self.trial) if self.trial else None
            if trial:
                verdict = self.evaluate()
                trial.update(votes=verdict.figures["comparisons"], figures=_round(verdict.figures),
                             next_decision=verdict.action, reason=verdict.reason)
            decisions = [e for e in self.app.store.serving_events() if e["action"].startswith("canary-")]
            last = decisions[-1] if decisions else None
            return {"mode": "automatic" if self.state["auto"] else "manual", "share": self.state["share"],
                    "min_votes": self.config.min_votes, "max_votes": self.config.max_votes, "trial": trial,
                    "last_decision": {"version": last["version"], "action": last["action"].removeprefix("canary-"),
                                      "by": last["actor"], "at": last["at"], "votes": last["details"].get("comparisons"),
                                      "reason": last["details"].get("reason")} if last else None}

    def leaderboard(self) -> list[dict]:
        """version_ratings over every cross-version vote so far, recomputed only when votes or versions changed."""
        votes = self.app.store.cross_version_votes()
        parents = {v["id"]: v["parent"] for v in self.app.store.versions()}
        key = (len(votes), votes[-1]["id"] if votes else None, tuple(sorted(parents.items())))
        with self.lock:
            if self._board[0] != key:
                self._board = (key, version_ratings(votes, parents=parents))
            return self._board[1]

    # -- the flow ------------------------------------------------------------------------------
    def begin_by_operator(self, version: str, actor: str) -> dict:
        """An operator puts a kept version (not served, not rejected) in a trial against the served one."""
        from chat_app.scheduler import OperatorError

        self.follow()   # act on the trial as the database has it (another replica may have moved it on)
        row = self.app.store.version(version) if isinstance(version, str) else None
        if row is None:
            raise OperatorError(f"no version {version!r}", 404)
        if row["status"] == "rejected":
            raise OperatorError(f"{version} was rejected by the gate ({row['reason']}); it is never served", 409)
        if version == self.app.serving_version():
            raise OperatorError(f"{version} is the version served: a trial needs another one", 409)
        try:
            self.begin(version, actor)
        except RuntimeError as error:
            raise OperatorError(str(error), 410) from None
        return self.status()

    def begin(self, candidate: str, actor: str = "scheduler") -> None:
        """A candidate passed the gate: it becomes the canary against what is served now (ending any trial)."""
        with self.lock:
            if self.trial:
                previous = self.trial
                self._end(None, f"superseded by {candidate}", actor)
                if previous["phase"] == "canary":
                    self.app.store.set_version_status(previous["candidate"], "retired",
                                                      f"superseded by {candidate} before the votes decided")
            incumbent = self.app.serving_version()
            self._load_other(candidate)
            self.app.store.set_version_status(candidate, "canary")
            now = utc_now()
            self.state["trial"] = {"candidate": candidate, "incumbent": incumbent, "phase": "canary",
                                   "started_at": now, "phase_started_at": now}
            self._save()
            self.app.store.add_serving_event(candidate, "canary", actor, {"against": incumbent,
                                                                         "share": self.state["share"]})
            log.info("%s is a canary against %s on %.0f%% of new comparisons", candidate, incumbent,
                     100 * self.state["share"])

    def versions_for_new_pair(self) -> list[str] | None:
        """The two versions of a new comparison when it is a trial one (sides at random), else None (served)."""
        trial = self.trial
        if not trial or random.random() >= self.state["share"]:
            return None
        pair = [trial["candidate"], trial["incumbent"]]
        random.shuffle(pair)
        return pair

    def outcomes(self) -> tuple[list[float], list[tuple[int, int]]]:
        """The candidate's outcomes in this phase's votes, with (candidate tokens, other tokens) per vote."""
        trial = self.trial
        votes = self.app.store.cross_version_votes(since=trial["phase_started_at"],
                                                   versions=(trial["candidate"], trial["incumbent"]))
        outcomes, lengths = [], []
        for v in votes:
            a_is_candidate = v["version_a"] == trial["candidate"]
            outcome = OUTCOME[v["choice"]]
            outcomes.append(outcome if a_is_candidate else 1 - outcome)
            tokens = (v["tokens_a"] or 0, v["tokens_b"] or 0)
            lengths.append(tokens if a_is_candidate else tokens[::-1])
        return outcomes, lengths

    def evaluate(self) -> Verdict:
        outcomes, lengths = self.outcomes()
        return decide(outcomes, lengths, phase=self.trial["phase"], min_votes=self.config.min_votes,
                      max_votes=self.config.max_votes, z=self.config.z)

    def decide_now(self) -> Verdict | None:
        """Evaluate the trial and, in automatic mode, act on the verdict; returns it (None without a trial)."""
        with self.lock:
            if not self.trial:
                return None
            verdict = self.last_verdict = self.evaluate()
            # one replica decides (the schedule's holder), on the votes every replica stored
            if verdict.action != "wait" and self.state["auto"] and self.app.is_schedule_holder:
                self._act(verdict.action, verdict, actor="votes")
            return verdict

    def act(self, action: str, actor: str) -> Verdict:
        """An operator's decision (promote, retire, rollback, confirm) on the trial, with today's figures."""
        from chat_app.scheduler import OperatorError

        with self.lock:
            self.follow()
            if not self.trial:
                raise OperatorError("no canary trial is running", 409)
            allowed = {"canary": ("promote", "retire"), "watch": ("rollback", "confirm")}[self.trial["phase"]]
            if action not in allowed:
                raise OperatorError(f"in the {self.trial['phase']} phase the choices are {' or '.join(allowed)}")
            verdict = self.evaluate()
            verdict = Verdict(action, f"decided by {actor}; the votes said: {verdict.reason}", verdict.figures)
            self._act(action, verdict, actor)
            return verdict

    def set_mode(self, auto: bool | None = None, share: float | None = None, actor: str = "operator") -> dict:
        with self.lock:
            self.follow()
            if auto is not None:
                self.state["auto"] = bool(auto)
            if share is not None:
                self.state["share"] = float(share)
            self._save()
            log.info("canary settings changed by %s: automatic=%s share=%s", actor, self.state["auto"],
                     self.state["share"])
        if auto:
            self._wake.set()   # decide on what has been collected meanwhile
        return self.status()

    def _act(self, action: str, verdict: Verdict, actor: str):
        from chat_app.scheduler import serve_version

        trial, store = self.trial, self.app.store
        details = {"reason": verdict.reason, **_round(verdict.figures), "phase": trial["phase"],
                   "against": trial["incumbent"]}
        candidate, incumbent = trial["candidate"], trial["incumbent"]
        if action == "promote":
            serve_version(self.app, candidate, actor, action="canary-promote", details=details)
            self._load_other(incumbent)   # the parent stays beside it for the watch
            trial.update(phase="watch", phase_started_at=utc_now())
            self._save()
        elif action == "retire":
            store.set_version_status(candidate, "retired", verdict.reason)
            self._end(candidate, verdict.reason, actor, "canary-retire", details)
        elif action == "rollback":
            serve_version(self.app, incumbent, actor, action="canary-rollback", details=details)
            store.set_version_status(candidate, "retired", verdict.reason)
            self._end(None, verdict.reason, actor)
        elif action == "confirm":
            self._end(candidate, verdict.reason, actor, "canary-confirm", details)
        log.info("%s %s: %s", action, candidate, verdict.reason)

    def _end(self, version: str | None, reason: str, actor: str = "scheduler", action: str | None = None,
             details: dict | None = None):
        """Drop the second version from the engine and forget the trial; record the event when there is one."""
        self.app.engine.set_second(None, None)
        self.state["trial"] = None
        self._save()
        if version and action:
            self.app.store.add_serving_event(version, action, actor, details or {"reason": reason})

    # -- the worker ----------------------------------------------------------------------------
    def _on_vote(self, comparison: dict):
        trial = self.trial
        if trial and self.app.is_schedule_holder and {comparison.get("version_a"), comparison.get("version_b")} == \
                {trial["candidate"], trial["incumbent"]}:
            self._wake.set()

    def _loop(self):
        while not self._stopping:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                self.decide_now()
            except Exception:   # a failed swap must not end the decisions: log it, keep the trial
                log.exception("canary decision failed")


def _round(figures: dict) -> dict:
    """JSON-friendly figures: floats to 4 places."""
    def r(x):
        if isinstance(x, float):
            return round(x, 4)
        if isinstance(x, list):
            return [r(v) for v in x]
        return x
    return {k: r(v) for k, v in figures.items()}



