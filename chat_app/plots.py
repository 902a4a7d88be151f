"""Figures for the operator page, built from plain store rows (no Gradio; tests call them directly).

Each builder returns a `matplotlib.figure.Figure` made without pyplot, so handlers in many threads
never share pyplot's global state. Missing metric keys and empty data give a figure saying "no data yet".
"""
from __future__ import annotations

from datetime import datetime

import matplotlib

matplotlib.use("Agg")  # no display on a server

from matplotlib import dates as mdates  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

SIZE = (5.5, 3.2)  # inches; two figures side by side fit a laptop screen
SCORE_KEYS = ("eval/candidate_score", "objective/score")  # the gate's score first, PPO's own as a fallback
KL_KEYS = ("eval/candidate_kl", "objective/kl")           # likewise: the KL the gate measured and its reason quotes


def no_data(title: str, why: str = "no data yet") -> Figure:
    """An empty figure with the title and a centred note."""
    figure = Figure(figsize=SIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.text(0.5, 0.5, why, ha="center", va="center", fontsize=13, color="gray", transform=axes.transAxes)
    axes.set_xticks([])
    axes.set_yticks([])
    return figure


def metric(version: dict, *keys: str) -> float | None:
    """The first of `keys` present in a version's metrics as a float, else None."""
    metrics = version.get("metrics") or {}
    for key in keys:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return None


def _parse_time(timestamp: str) -> datetime | None:
    try:
        return datetime.fromisoformat(timestamp)
    except (TypeError, ValueError):
        return None


def votes_over_time(vote_times: list[str]) -> Figure:
    """Cumulative votes against time, from store.vote_times() (ISO timestamps)."""
    title = "Votes over time"
    times = sorted(t for t in (_parse_time(s) for s in vote_times) if t is not None)
    if not times:
        return no_data(title)
    figure = Figure(figsize=SIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.step(times, range(1, len(times) + 1), where="post", color="tab:blue")
    axes.plot(times[-1:], [len(times)], "o", color="tab:blue")
    axes.set_title(f"{title} ({len(times)} in all)")
    axes.set_ylabel("votes (cumulative)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    locator = mdates.AutoDateLocator(minticks=3, maxticks=7)
    axes.xaxis.set_major_locator(locator)
    # seconds as "02:59:30", not a bare "30" between minute ticks (the default when votes span a few minutes)
    axes.xaxis.set_major_formatter(mdates.ConciseDateFormatter(
        locator, formats=["%Y", "%b", "%d", "%H:%M", "%H:%M", "%H:%M:%S"],
        zero_formats=["", "%Y", "%b", "%b-%d", "%H:%M", "%H:%M"]))
    return figure


def _per_version(versions: list[dict], keys: tuple[str, ...]) -> tuple[list[str], list[float]]:
    """(version ids, values) of the versions that have one of `keys`, in creation order."""
    names, values = [], []
    for version in versions:
        value = metric(version, *keys)
        if value is not None:
            names.append(str(version.get("id")))
            values.append(value)
    return names, values


def _bars(title: str, names: list[str], values: list[float], ylabel: str, *, color: str,
          reference: float | None = None, ylim: tuple[float, float] | None = None) -> Figure:
    figure = Figure(figsize=SIZE, layout="constrained")
    axes = figure.add_subplot()
    axes.bar(names, values, color=color)
    if reference is not None:
        axes.axhline(reference, color="gray", linestyle="--", linewidth=1)
    if ylim is not None:
        axes.set_ylim(*ylim)
    for x, value in enumerate(values):
        axes.annotate(f"{value:.2f}", (x, value), ha="center", va="bottom", fontsize=8)
    axes.set_title(title)
    axes.set_ylabel(ylabel)
    axes.grid(axis="y", alpha=0.3)
    return figure


def _rate_bars(versions: list[dict], key: str, title: str, ylabel: str, color: str) -> Figure:
    """One bar per version for a rate in [0, 1] with 0.5 (chance) marked; "no data yet" when none has it."""
    names, values = _per_version(versions, (key,))
    if not names:
        return no_data(title)
    return _bars(title, names, values, ylabel, color=color, reference=0.5, ylim=(0, 1.05))


def reward_model_accuracy(versions: list[dict]) -> Figure:
    """Held-out pair accuracy of each version's reward model ("rm/accuracy"); 0.5 is chance."""
    return _rate_bars(versions, "rm/accuracy", "Reward model accuracy (held-out pairs)", "accuracy", "tab:green")


def reward_and_kl(versions: list[dict]) -> Figure:
    """Mean reward-model score (left) and KL to the base model (right) per version."""
    title = "Mean reward and KL per version"
    rows = [(str(v.get("id")), metric(v, *SCORE_KEYS), metric(v, *KL_KEYS)) for v in versions]
    rows = [row for row in rows if row[1] is not None or row[2] is not None]
    if not rows:
        return no_data(title)
    figure = Figure(figsize=SIZE, layout="constrained")
    figure.suptitle(title)
    names = [name for name, _, _ in rows]
    for column, (label, color) in enumerate((("mean reward", "tab:blue"), ("KL to base (nats)", "tab:red"))):
        axes = figure.add_subplot(1, 2, column + 1)
        points = [(x, row[column + 1]) for x, row in enumerate(rows) if row[column + 1] is not None]
        if points:
            axes.plot(*zip(*points), "o-", color=color)
        axes.set_xticks(range(len(names)), names)
        axes.set_xlim(-0.5, len(names) - 0.5)
        axes.set_title(label, fontsize=10)
        axes.grid(alpha=0.3)
    return figure


def win_rate(versions: list[dict]) -> Figure:
    """Held-out win rate of each candidate against the policy it was compared with ("eval/win_rate"), judged by the
    run's reward model (not by people: that is what the next votes say)."""
    return _rate_bars(versions, "eval/win_rate", "Win rate vs the serving policy (reward model's judgement)",
                      "win rate", "tab:purple")
