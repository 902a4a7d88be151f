"""What the app tells everyone: the serving version, vote counts and when it last learned (no secrets)."""
from __future__ import annotations

from datetime import datetime, timezone


def minutes_since(timestamp: str | None) -> float | None:
    if not timestamp:
        return None
    then = datetime.fromisoformat(timestamp)
    return round((datetime.now(timezone.utc) - then).total_seconds() / 60, 1)


def serving_summary(app) -> dict:
    """The serving version with the votes it was trained on and how long ago."""
    version = app.serving_version()
    summary = {"version": version, "trained_on_votes": None, "trained_minutes_ago": None,
               "weights": getattr(app.engine, "weights", None)}   # packed (CPU), model, or bf16
    if version != "base":
        row = app.store.version(version)
        run = app.store.run(row["run_id"]) if row and row.get("run_id") else None
        if run:
            summary["trained_on_votes"] = run.get("votes_total")
            summary["trained_minutes_ago"] = minutes_since(run.get("ended_at"))
    return summary


def serving_line(app) -> str:
    """One line for the chat page: 'Serving v3 · trained on 120 votes, 4 minutes ago · 131 votes so far'."""
    summary = serving_summary(app)
    votes = app.store.vote_counts()["total"]
    parts = [f"Serving **{summary['version']}**"]
    if summary["version"] == "base":
        parts.append("the base model, not trained on votes yet")
    elif summary["trained_on_votes"] is not None:
        minutes = summary["trained_minutes_ago"]
        ago = "just now" if minutes is None or minutes < 1 else \
            f"{minutes:.0f} minute{'' if round(minutes) == 1 else 's'} ago"
        parts.append(f"trained on {summary['trained_on_votes']} votes, {ago}")
    parts.append(f"{votes} vote{'' if votes == 1 else 's'} so far")
    return " · ".join(parts)


def public_status(app) -> dict:
    counts = app.store.vote_counts()
    running = [r for r in app.store.runs(limit=5) if r["status"] == "running"]
    status = {"serving_version": app.serving_version(), "votes": counts, "serving": serving_summary(app),
              "training": None, "last_run": None,
              "schedule_holder": app.is_schedule_holder}   # this replica runs the schedule (chat_app/replicas.py)
    if running:
        run = running[0]
        status["training"] = {"run_id": run["id"], "started_at": run["started_at"], "progress": run["progress"]}
    finished = app.store.last_finished_run()
    if finished:
        status["last_run"] = {k: finished[k] for k in ("id", "status", "candidate_version", "ended_at")}
    if getattr(app, "canary", None) is not None:   # the live A/B and the versions' ratings from real votes
        status["canary"] = app.canary.status()
        status["leaderboard"] = app.canary.leaderboard()
    if app.scheduler is not None:
        schedule = app.scheduler.schedule()
        status["schedule"] = {k: schedule[k] for k in ("enabled", "retrain_every_minutes", "min_new_votes",
                                                       "next_check_at")}
    return status
