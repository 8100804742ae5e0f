"""How sure a win rate or an accuracy difference is: a paired bootstrap interval and a sign test. Pure numpy.

A win rate is the mean of one verdict per prompt: 1 (the policy's reply judged better), 0, 0.5 for a tie, or with a
pairwise judge asked in both orders any value in [0, 1] (the two orders' probabilities averaged). That is not a
Bernoulli count, so a Wilson interval (which assumes one) does not fit; the percentile bootstrap over prompts takes
the verdicts as they are, ties and fractions included. "Paired": each resample draws whole prompts, both replies
together, so what the two models share (an easy or hard prompt) cancels. The seed is fixed: the same verdicts give
the same interval in every run, and a registry decision can be reproduced.

The sign test asks whether the wins and losses could come from a fair coin (the policy no better than the other
model): exact binomial, two-sided, ties split half to each side (an odd tie left out).

How many prompts an interval needs: near 0.5 its half width is about 1.96 * 0.5 / sqrt(n) (less when many prompts
tie): 64 prompts +-0.12, 256 +-0.06, 1000 +-0.03 (docs/evaluation.md).
"""
from __future__ import annotations

import math

import numpy as np

RESAMPLES = 10_000  # bootstrap resamples for small sets; fewer for large ones (BUDGET draws in all)
BUDGET = 50_000_000  # draws (resamples x items): a 100k-pair eval split gets 500 resamples, about a second
SEED = 0


def bootstrap_interval(values, confidence: float = 0.95, seed: int = SEED, resamples: int | None = None) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `values` (one per prompt or pair; NaN ones left out):
    (low, high) holding `confidence` of the resampled means; (nan, nan) for no values. Deterministic for a seed."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    n = len(x)
    if n == 0:
        return float("nan"), float("nan")
    b = resamples or max(200, min(RESAMPLES, BUDGET // n))
    rng = np.random.default_rng(seed)
    means = np.empty(b)
    chunk = max(1, 5_000_000 // n)  # resamples drawn at once: bounded memory
    for start in range(0, b, chunk):
        k = min(chunk, b - start)
        means[start:start + k] = x[rng.integers(0, n, size=(k, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


def sign_test(values, center: float = 0.5) -> float:
    """Two-sided exact sign test of verdicts against `center` (0.5 for a win rate, 0 for a difference): a value above
    it a win, below a loss, equal a tie; ties split half to each side (an odd one left out). p = 1 with no wins or
    losses. NaN values are left out."""
    x = [v for v in (float(v) for v in values) if math.isfinite(v)]
    wins, losses = sum(v > center for v in x), sum(v < center for v in x)
    half_ties = (len(x) - wins - losses) // 2
    n, k = wins + losses + 2 * half_ties, wins + half_ties
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n  # the smaller tail, symmetric at p = 1/2
    return float(min(1.0, 2 * tail))


def summarize(values, confidence: float = 0.95, center: float = 0.5) -> dict:
    """{mean, ci_low, ci_high, p, n} of verdicts (NaN left out): what eval/win_rate and its interval report."""
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    low, high = bootstrap_interval(x, confidence)
    return {"mean": float(x.mean()) if len(x) else float("nan"), "ci_low": low, "ci_high": high, "p": sign_test(x, center), "n": int(len(x))}


def clears(low: float, bar: float) -> bool:
    """Whether an interval's lower end lies above `bar` (NaN never does)."""
    return math.isfinite(low) and low > bar
