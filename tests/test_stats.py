"""The win rate's interval and sign test (dpo_ray/stats.py) and the registry's decision on them (pipeline/gate.py),
against hand computations: the exact bootstrap distribution of a small table, binomial tails by hand."""
import math
from itertools import product

import numpy as np
import pandas as pd
import pytest

from dpo_ray import stats
from pipeline import gate

TABLE = [1.0] * 6 + [0.0] * 2 + [0.5] * 2  # 10 prompts: 6 wins, 2 losses, 2 ties; win rate 0.7


def exact_bootstrap_quantiles(values, q):
    """The bootstrap distribution of the mean, enumerated: every count vector of a resample over the distinct values
    (multinomial), its probability, its mean."""
    vals, counts = np.unique(values, return_counts=True)
    n, p = len(values), counts / len(values)
    dist = {}
    for ks in product(range(n + 1), repeat=len(vals)):
        if sum(ks) != n:
            continue
        prob = math.factorial(n) / math.prod(math.factorial(k) for k in ks) * math.prod(pi ** k for pi, k in zip(p, ks))
        mean = round(sum(k * v for k, v in zip(ks, vals)) / n, 10)
        dist[mean] = dist.get(mean, 0.0) + prob
    means = sorted(dist)
    cdf = np.cumsum([dist[m] for m in means])
    return [means[int(np.searchsorted(cdf, x))] for x in q]


def test_interval_and_sign_test_by_hand():
    low, high = stats.bootstrap_interval(TABLE)
    want_low, want_high = exact_bootstrap_quantiles(TABLE, [0.025, 0.975])
    assert want_low == 0.45 and want_high == 0.95  # the exact bootstrap's quantiles of this table
    assert abs(low - want_low) <= 0.05 + 1e-9 and abs(high - want_high) <= 0.05 + 1e-9  # within one step of its 0.05 grid
    assert stats.bootstrap_interval(TABLE) == (low, high)  # a fixed seed: the same interval every time
    # the sign test: ties split (1 each way): 7 wins of 10, two-sided, = 2 * (C(10,7) + C(10,8) + C(10,9) + C(10,10)) / 2^10
    assert stats.sign_test(TABLE) == pytest.approx(2 * (120 + 45 + 10 + 1) / 1024)
    assert stats.sign_test(TABLE + [0.5]) == pytest.approx(2 * (120 + 45 + 10 + 1) / 1024)  # an odd tie left out
    assert stats.sign_test([1.0] * 9 + [0.0]) == pytest.approx(2 * (1 + 10) / 1024)
    assert stats.sign_test([0.5, 0.5]) == 1.0 and stats.sign_test([]) == 1.0
    s = stats.summarize(TABLE + [float("nan")])
    assert s["mean"] == pytest.approx(0.7) and s["n"] == 10  # a failed prompt is left out


def test_the_gate_refuses_a_win_rate_near_chance_and_promotes_a_clear_one():
    near = np.array([1.0] * 36 + [0.0] * 28)  # 0.5625 from 64 prompts
    clear = np.array([1.0] * 51 + [0.0] * 13)  # 0.797
    refused = gate.win_rate_rule(near, 0.61, 0.58, 0.95, 0.0, version=3)
    promoted = gate.win_rate_rule(clear, 0.72, 0.55, 0.95, 0.0, version=3)
    assert not refused.promote and promoted.promote
    assert refused.ci_low < 0.5 < promoted.ci_low and refused.difference == pytest.approx(0.5625)
    assert "\n" not in refused.reason
    assert "0.562" in refused.reason and "not above 0.5" in refused.reason and "64 prompts" in refused.reason
    assert "0.797" in promoted.reason and "above 0.5" in promoted.reason and "champion v3" in promoted.reason
    assert "challenger 0.610, champion 0.580" in refused.reason  # both models' own win rates over the reference
    assert gate.win_rate_rule(near, 0.61, 0.58, 0.5, 0.0, 3).promote  # a lower confidence: a narrower interval
    assert not gate.win_rate_rule(clear, 0.72, 0.55, 0.95, 0.25, 3).promote  # min_improvement raises the bar to 0.75
    point = gate.point_rule("win_rate", 0.5625, 0.5, 0.0, 3)  # min_confidence 0: the rule before intervals
    assert point.promote and "point estimates" in point.reason


def test_the_gate_on_accuracies_is_a_paired_bootstrap_over_the_held_out_pairs():
    rng = np.random.default_rng(0)
    ids = [f"r{i:03d}" for i in range(200)]
    champion = pd.DataFrame({"row_id": ids, "prefers_chosen": (rng.random(200) < 0.6).astype(float), "reward_margin": rng.normal(0.1, 1, 200)})
    better = champion.copy()
    flip = (better.prefers_chosen == 0) & (rng.random(200) < 0.4)  # wrong pairs made right, nothing made wrong
    better.loc[flip, "prefers_chosen"] = 1.0
    c = gate.pairs_rule("rewards/accuracies", better.sample(frac=1, random_state=1), champion, 0.95, 0.0, 2)  # joined by row_id
    d = better.prefers_chosen - champion.prefers_chosen
    assert c.difference == pytest.approx(d.mean()) and c.items == 200 and c.promote and c.ci_low > 0
    assert c.p == pytest.approx(stats.sign_test(d, center=0.0))
    same = gate.pairs_rule("rewards/accuracies", champion, champion, 0.95, 0.0, 2)
    assert not same.promote and same.ci_low == same.ci_high == 0.0  # the same model is not an improvement
    assert "paired bootstrap over 200 held-out pairs" in c.reason and "vs champion v2" in c.reason
