"""The registry's decision: does the challenger beat the champion, and how sure is that?

With registry.min_confidence > 0 (default 0.95) the two models are compared directly, item by item, and the
challenger is promoted only when the lower end of the two-sided interval clears the bar:
- win_rate: the judge compares the challenger's reply with the champion's on each held-out prompt (a pairwise judge
  in both orders; a pointwise one by the two scores): the head-to-head win rate's interval must lie above
  0.5 + registry.min_improvement;
- rewards/accuracies, rewards/margins: the per-pair difference (challenger - champion) on the same held-out pairs and
  reference log-probs: its paired bootstrap interval must lie above registry.min_improvement.
With min_confidence 0 the rule is the point estimates': challenger >= champion + min_improvement. Either way the
decision is one line naming both figures (dpo_ray.stats has the interval and the sign test).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from dpo_ray import stats

PAIR_VALUE = {"rewards/accuracies": "prefers_chosen", "rewards/margins": "reward_margin"}


@dataclass
class Comparison:
    """The gate's figures: each model's score on the metric (as it reads alone), what was compared item by item
    (`difference`: the challenger's head-to-head win rate, or the mean per-pair difference), its interval and sign-test
    p, the items compared, the bar the interval's low end must clear, and the decision with its one-line reason."""

    metric: str
    challenger: float
    champion: float | None
    difference: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    p: float | None = None
    items: int = 0
    bar: float | None = None
    confidence: float = 0.0
    promote: bool = False
    reason: str = ""

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and k not in ("metric", "challenger", "champion", "promote", "reason")}


def point_rule(metric: str, challenger: float, champion: float, min_improvement: float, version) -> Comparison:
    """min_confidence 0: the point estimates alone, as the gate was before intervals."""
    promote = challenger >= champion + min_improvement
    return Comparison(metric, challenger, champion, promote=promote, reason=(
        f"{metric} {challenger:.4f} vs champion v{version} {champion:.4f} (min improvement {min_improvement}; "
        f"registry.min_confidence 0: point estimates)"))


def win_rate_rule(wins, challenger: float, champion: float | None, confidence: float, min_improvement: float, version) -> Comparison:
    """`wins`: the challenger's verdict against the champion per prompt (1, 0, 0.5 a tie, a two-order mean, NaN failed)."""
    s = stats.summarize(wins, confidence)
    bar = 0.5 + min_improvement
    promote = stats.clears(s["ci_low"], bar)
    pct = f"{confidence:.0%}"
    reason = (f"win rate over champion v{version} {s['mean']:.3f}, {pct} interval [{s['ci_low']:.3f}, {s['ci_high']:.3f}] from {s['n']} prompts, "
              f"p {s['p']:.3g}: {'above' if promote else 'not above'} {bar:g}"
              + (f" (each over the reference: challenger {challenger:.3f}, champion {champion:.3f})" if champion is not None else ""))
    return Comparison("win_rate", challenger, champion, s["mean"], s["ci_low"], s["ci_high"], s["p"], s["n"], bar, confidence, promote, reason)


def pairs_rule(metric: str, challenger_pairs: pd.DataFrame, champion_pairs: pd.DataFrame, confidence: float, min_improvement: float,
               version) -> Comparison:
    """The paired bootstrap of (challenger - champion) over the held-out pairs both were scored on (by row_id)."""
    col = PAIR_VALUE[metric]
    both = challenger_pairs[["row_id", col]].merge(champion_pairs[["row_id", col]], on="row_id", suffixes=("_challenger", "_champion"))
    a, b = both[f"{col}_challenger"].to_numpy(np.float64), both[f"{col}_champion"].to_numpy(np.float64)
    d = a - b
    low, high = stats.bootstrap_interval(d, confidence)
    p = stats.sign_test(d, center=0.0)
    promote = stats.clears(low, min_improvement)
    ca, cb = float(a.mean()) if len(a) else float("nan"), float(b.mean()) if len(b) else float("nan")
    pct = f"{confidence:.0%}"
    reason = (f"{metric} {ca:.4f} vs champion v{version} {cb:.4f}: difference {ca - cb:+.4f}, {pct} interval [{low:+.4f}, {high:+.4f}] "
              f"(paired bootstrap over {len(d)} held-out pairs), p {p:.3g}: {'above' if promote else 'not above'} {min_improvement:g}")
    return Comparison(metric, ca, cb, ca - cb, low, high, p, len(d), min_improvement, confidence, promote, reason)
