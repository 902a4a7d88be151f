"""Bradley-Terry ratings from pairwise verdicts, and the length-controlled win rate of one policy against another.

The length control is Chatbot Arena's "style control" [FastChat elo_analysis.py, lmsys.org/blog/2024-08-28]
for two players: P(policy beats against) = σ(β0 + β1·z), z the relative length difference; σ(β0) is the win
rate the judge would give at equal length. Ties count as half a win each way, as in Arena.
"""
from __future__ import annotations

import numpy as np

RIDGE = 1e-3        # keeps the fit finite when one side wins every comparison (separable data); tiny beside n/4
BOOTSTRAP = 1000    # resamples of the comparisons for the 95% percentile intervals
OUTCOMES = {"policy": 1.0, "against": 0.0, "tie": 0.5}


def sigmoid(x):
    """σ(x) without overflow for large |x|."""
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=float)))


def relative_length_difference(tokens_policy, tokens_against) -> np.ndarray:
    """(len_p − len_a) / (len_p + len_a) per comparison, in [-1, 1]; 0 when both are empty.

    Arena's length feature. Bounded, so a cut-off or empty answer cannot dominate the fit; free of units, so it
    means the same at 48 or 512 new tokens; and 0 exactly at equal length, which is where σ(β0) is read.
    It is tanh(½·log(len_p / len_a)): 0.2 is the policy's answer 1.5 times as long.
    """
    p, a = np.asarray(tokens_policy, dtype=float), np.asarray(tokens_against, dtype=float)
    total = p + a
    return np.divide(p - a, total, out=np.zeros_like(total), where=total > 0)


def bootstrap_weights(n: int, bootstrap: int, seed: int) -> np.ndarray:
    """(1 + bootstrap, n) comparison counts: row 0 is the data itself, then resamples with replacement."""
    rng = np.random.default_rng(seed)
    resamples = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap) if n else np.zeros((bootstrap, 0))
    return np.vstack([np.ones((1, n)), resamples])


def fit_logistic(X: np.ndarray, y: np.ndarray, weights: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """Ridge logistic regressions without intercept, one per row of weights (fits, n): coefficients (fits, k).

    y in [0, 1] (0.5 for a tie: the soft label gives the same likelihood as Arena's tie as one win each way).
    Newton's method for all fits at once; a step that would raise a fit's loss is halved until it does not.
    """
    fits, k = weights.shape[0], X.shape[1]
    beta = np.zeros((fits, k))                                  # (fits, k)

    def loss(b, w):                                             # b (fits, k), w (fits, n) -> (fits,)
        logits = b @ X.T                                        # (fits, n)
        nll = np.logaddexp(0.0, logits) - y * logits            # −[y·log σ + (1−y)·log(1−σ)]
        return (w * nll).sum(-1) + 0.5 * ridge * (b ** 2).sum(-1)

    current = loss(beta, weights)
    for _ in range(100):
        p = sigmoid(beta @ X.T)                                 # (fits, n)
        grad = (weights * (p - y)) @ X + ridge * beta           # (fits, k)
        hessian = np.einsum("fn,ni,nj->fij", weights * p * (1 - p), X, X) + ridge * np.eye(k)
        step = np.linalg.solve(hessian, grad[..., None])[..., 0]
        new_beta, new_loss = beta - step, loss(beta - step, weights)
        slack = 1e-12 * (1.0 + np.abs(current))                 # rounding: near the optimum the loss barely moves
        for halvings in range(1, 30):                           # halve the steps that raised the loss
            worse = new_loss > current + slack
            if not worse.any():
                break
            new_beta[worse] = beta[worse] - 0.5 ** halvings * step[worse]
            new_loss[worse] = loss(new_beta[worse], weights[worse])
        keep = new_loss > current + slack                       # no step helps: converged to rounding
        new_beta[keep], new_loss[keep] = beta[keep], current[keep]
        converged = np.abs(new_beta - beta).max() < 1e-9
        beta, current = new_beta, new_loss
        if converged:
            break
    return beta


def _interval(samples: np.ndarray) -> list[float] | None:
    """95% percentile interval of bootstrap samples, or None without any."""
    return [float(v) for v in np.percentile(samples, [2.5, 97.5])] if len(samples) else None


def bradley_terry(players: list[str], comparisons: list[tuple[str, str, float]], covariates=None, *,
                  anchor: str | None = None, bootstrap: int = BOOTSTRAP, seed: int = 0, ridge: float = RIDGE) -> dict:
    """Ratings in log-odds (anchor at 0) with 95% bootstrap intervals: P(a beats b) = σ(r_a − r_b + γ·x).

    Args:
        comparisons: (player_a, player_b, outcome) with outcome 1 if a won, 0 if b won, 0.5 for a tie.
        covariates: (comparisons, k) features of a's answer minus b's (e.g. relative length difference);
            their coefficients γ come back as `coefficients`, and the ratings are then those at x = 0.
        anchor: the player rated 0 (default the first).
    """
    anchor = players[0] if anchor is None else anchor
    column = {p: i for i, p in enumerate(p for p in players if p != anchor)}
    X = np.zeros((len(comparisons), len(column)))               # (n, players − 1): +1 for a, −1 for b
    for row, (a, b, _) in enumerate(comparisons):
        if a in column:
            X[row, column[a]] += 1.0
        if b in column:
            X[row, column[b]] -= 1.0
    if covariates is not None:
        X = np.hstack([X, np.asarray(covariates, dtype=float).reshape(len(comparisons), -1)])
    y = np.array([float(o) for _, _, o in comparisons])         # (n,)
    beta = fit_logistic(X, y, bootstrap_weights(len(y), bootstrap, seed), ridge)   # (1 + bootstrap, k)
    ratings = {p: 0.0 if p == anchor else float(beta[0, column[p]]) for p in players}
    intervals = {p: [0.0, 0.0] if p == anchor else _interval(beta[1:, column[p]]) for p in players}
    gammas = beta[:, len(column):]
    return {"ratings": ratings, "intervals": intervals, "anchor": anchor,
            "coefficients": gammas[0].tolist(), "coefficient_intervals": [_interval(g) for g in gammas[1:].T]}


def win_rate_summary(outcomes, *, bootstrap: int = BOOTSTRAP, seed: int = 0) -> dict:
    """Counts and win rates of outcomes (1 win, 0 loss, 0.5 tie), with a 95% bootstrap interval on the win rate."""
    y = np.asarray(outcomes, dtype=float)                        # (n,)
    wins, losses = int((y == 1).sum()), int((y == 0).sum())
    ties = len(y) - wins - losses
    weights = bootstrap_weights(len(y), bootstrap, seed)[1:]    # the same resamples as the fit's
    return {"comparisons": len(y), "wins": wins, "losses": losses, "ties": ties,
            "win_rate": float(y.mean()) if len(y) else None,        # ties as half
            "win_rate_interval": _interval(weights @ y / len(y)) if len(y) else None,
            "decided_win_rate": wins / (wins + losses) if wins + losses else None}   # ties left out


def length_controlled_win_rate(outcomes, length_diffs, *, bootstrap: int = BOOTSTRAP, seed: int = 0,
                               ridge: float = RIDGE) -> dict:
    """The raw win rate beside σ(β0), the win rate at equal length, and β1, the length effect.

    Args:
        outcomes: 1 the policy won, 0 it lost, 0.5 a tie; one per comparison.
        length_diffs: `relative_length_difference` of the same comparisons. Not centred (Arena centres, but its
            sides are assigned at random): centring would read σ(β0) at the mean length gap, not at none.
    β1 is in log-odds per unit of relative difference: +1.0 means a policy answer 1.5 times as long as the
    other (z = 0.2) gains 0.2 log-odds with this judge. It is None when every length difference is the same.
    """
    summary = win_rate_summary(outcomes, bootstrap=bootstrap, seed=seed)
    if not summary["comparisons"]:
        return {**summary, "length_controlled_win_rate": None, "length_controlled_interval": None,
                "length_effect": None, "length_effect_interval": None}
    fit = bradley_terry(["against", "policy"], [("policy", "against", o) for o in outcomes],
                        covariates=np.asarray(length_diffs, dtype=float)[:, None], bootstrap=bootstrap, seed=seed,
                        ridge=ridge)
    interval = fit["intervals"]["policy"]
    lengths_differ = np.ptp(length_diffs) > 0      # else β1 is not measurable (the ridge holds it at 0)
    return {**summary, "length_controlled_win_rate": float(sigmoid(fit["ratings"]["policy"])),
            "length_controlled_interval": [float(v) for v in sigmoid(interval)] if interval else None,
            "length_effect": fit["coefficients"][0] if lengths_differ else None,
            "length_effect_interval": fit["coefficient_intervals"][0] if lengths_differ else None}
