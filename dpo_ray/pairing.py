"""Preference pairs from scored samples: what iterative (online) DPO trains on each round.

A round samples k replies per prompt from the current policy and a judge scores each one (a number per reply; a
pairwise judge's comparisons become such numbers before they come here). `build_pairs` turns those scores into pairs:

  best_worst  one pair per prompt: the best-scored reply against the worst-scored one (the first of equals, by
              sample index), when their scores differ by more than min_margin;
  all         every ordered pair (a, b) of the prompt's replies with score(a) - score(b) > min_margin.

A reply without a finite score (the judge failed on it) or with no text is left out and counted. A prompt whose usable
replies all score the same is dropped and counted as a tie; one whose spread is above 0 but not above min_margin is
counted apart (`below_margin`); one left with fewer than two usable replies is counted as `too_few`. Each pair keeps
its provenance: the round, the prompt id, both sample indices and both scores. Pure Python, no Ray, no torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

PAIRINGS = ("best_worst", "all")


@dataclass
class Pairing:
    """The pairs (dicts, in prompt order then sample order) and the counts of what was left out."""

    pairs: list[dict] = field(default_factory=list)
    prompts: int = 0  # prompts seen
    paired: int = 0  # prompts that gave at least one pair
    ties: int = 0  # prompts whose usable replies all score the same: dropped
    below_margin: int = 0  # prompts whose best and worst differ, but by no more than min_margin
    too_few: int = 0  # prompts left with fewer than two usable replies
    unscored: int = 0  # replies without a finite score (the judge failed) or without text

    def counts(self) -> dict:
        return {"pairs": len(self.pairs), "prompts": self.prompts, "prompts_paired": self.paired, "ties_dropped": self.ties,
                "below_margin": self.below_margin, "too_few_replies": self.too_few, "unscored_replies": self.unscored}


def usable(sample: dict) -> bool:
    s = sample.get("score")
    return isinstance(s, (int, float)) and math.isfinite(s) and bool(str(sample.get("reply", "")).strip())


def build_pairs(samples: list[dict], pairing: str = "best_worst", min_margin: float = 0.0, round_no: int | None = None) -> Pairing:
    """samples: dicts with prompt_id, sample (its index among the prompt's replies), reply and score (NaN/None when the
    judge failed); any other keys are ignored. Returns the pairs, each {round, prompt_id, chosen, rejected,
    chosen_score, rejected_score, chosen_sample, rejected_sample, margin}, and the counts."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing: expected one of {', '.join(PAIRINGS)}, got {pairing!r}")
    if min_margin < 0:
        raise ValueError(f"min_margin: must be >= 0, got {min_margin}")
    by_prompt: dict[str, list[dict]] = {}
    for s in samples:  # insertion order: prompts as they first appear
        by_prompt.setdefault(str(s["prompt_id"]), []).append(s)
    out = Pairing(prompts=len(by_prompt))
    for pid, group in by_prompt.items():
        group = sorted(group, key=lambda s: int(s["sample"]))
        good = [s for s in group if usable(s)]
        out.unscored += len(group) - len(good)
        if len(good) < 2:
            out.too_few += 1
            continue
        scores = [float(s["score"]) for s in good]
        hi, lo = max(scores), min(scores)
        if hi == lo:
            out.ties += 1
            continue
        if hi - lo <= min_margin:
            out.below_margin += 1
            continue
        if pairing == "best_worst":
            best = next(s for s in good if float(s["score"]) == hi)
            worst = next(s for s in good if float(s["score"]) == lo)
            candidates = [(best, worst)]
        else:
            candidates = [(a, b) for a in good for b in good if float(a["score"]) - float(b["score"]) > min_margin]
        made = [_pair(a, b, pid, round_no) for a, b in candidates if str(a["reply"]).strip() != str(b["reply"]).strip()]
        if made:
            out.paired += 1
            out.pairs += made
        else:  # different scores for the same text cannot come from a pointwise judge; counted as a tie
            out.ties += 1
    return out


def _pair(a: dict, b: dict, prompt_id: str, round_no: int | None) -> dict:
    return {"round": round_no, "prompt_id": prompt_id, "chosen": str(a["reply"]), "rejected": str(b["reply"]),
            "chosen_score": float(a["score"]), "rejected_score": float(b["score"]),
            "chosen_sample": int(a["sample"]), "rejected_sample": int(b["sample"]),
            "margin": float(a["score"]) - float(b["score"])}
