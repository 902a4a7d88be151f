"""The operator page's figures, built from plain rows: empty data says so, real data is drawn, missing keys are fine."""
from io import BytesIO

import pytest
from matplotlib.figure import Figure

from chat_app import plots

VERSIONS = [
    {"id": "v1", "metrics": {"rm/accuracy": 0.62, "objective/score": 0.1, "objective/kl": 0.4}},
    {"id": "v2", "metrics": {}},                                       # a failed run's version: no metrics
    {"id": "v3", "metrics": {"rm/accuracy": 0.71, "eval/candidate_score": 0.5, "objective/score": 9.9,
                             "objective/kl": 1.3, "eval/win_rate": 0.64}},
    {"id": "v4", "metrics": {"objective/kl": 2.0, "rm/accuracy": None}},   # only some keys, one of them null
]
BUILDERS = [plots.reward_model_accuracy, plots.reward_and_kl, plots.win_rate]


def texts(figure: Figure) -> str:
    """Every title and text artist of the figure, joined."""
    found = [figure._suptitle.get_text()] if figure._suptitle else []
    for axes in figure.axes:
        found += [axes.get_title(), *(t.get_text() for t in axes.texts)]
    return " ".join(found)


def renders(figure: Figure) -> bool:
    with BytesIO() as out:
        figure.savefig(out, format="png")
        return out.tell() > 1000


@pytest.mark.parametrize("builder", BUILDERS)
@pytest.mark.parametrize("versions", [[], [{"id": "v1", "metrics": {}}], [{"id": "v1"}]])
def test_version_plots_say_no_data_yet_without_metrics(builder, versions):
    figure = builder(versions)
    assert "no data yet" in texts(figure) and renders(figure)


def test_votes_plot_without_votes_says_no_data_yet():
    assert "no data yet" in texts(plots.votes_over_time([]))
    assert "no data yet" in texts(plots.votes_over_time(["not a time"]))


def test_votes_plot_is_cumulative():
    times = ["2026-11-02T10:00:00.000+00:00", "2026-11-02T09:00:00.000+00:00", "2026-11-02T11:30:00.000+00:00"]
    figure = plots.votes_over_time(times)
    line = figure.axes[0].lines[0]
    assert list(line.get_ydata()) == [1, 2, 3] and "3 in all" in texts(figure) and renders(figure)


def test_version_plots_draw_the_versions_that_have_the_metric():
    accuracy = plots.reward_model_accuracy(VERSIONS).axes[0]
    assert [p.get_height() for p in accuracy.patches] == [0.62, 0.71]
    assert [t.get_text() for t in accuracy.get_xticklabels()] == ["v1", "v3"]

    win = plots.win_rate(VERSIONS).axes[0]
    assert [p.get_height() for p in win.patches] == [0.64]

    figure = plots.reward_and_kl(VERSIONS)
    reward_axes, kl_axes = figure.axes
    assert list(reward_axes.lines[0].get_ydata()) == [0.1, 0.5]  # the gate's score wins over PPO's own
    assert list(kl_axes.lines[0].get_ydata()) == [0.4, 1.3, 2.0]
    assert [t.get_text() for t in reward_axes.get_xticklabels()] == ["v1", "v3", "v4"]
    assert all(renders(builder(VERSIONS)) for builder in BUILDERS)


def test_metric_skips_missing_null_and_non_numbers():
    version = {"metrics": {"a": None, "b": "x", "c": True, "d": 2}}
    assert plots.metric(version, "a", "b", "c", "d") == 2.0
    assert plots.metric({}, "a") is None
