"""The preference losses' names and properties, torch-free: one table for the config, the loss dispatch and the docs.

The config's allowed values (dpo_ray/config.py), the checks and dispatch of dpo_ray/losses.py (which registers each
name's term function and refuses to import when a name has none) and docs/losses.md's table are all made from LOSSES.

    python -m dpo_ray.loss_names --write     # rewrite docs/losses.md's table after changing LOSSES
    python -m dpo_ray.loss_names --check     # exit 1 when docs/losses.md's table is not what LOSSES says
"""
from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class LossInfo:
    """A loss_type: the per-pair loss (docs/losses.md's notation), its paper(s), when people pick it, and what it reads."""

    name: str
    formula: str
    paper: str
    use: str
    trl: str = ""  # "": TRL 1.16 DPOTrainer's loss_type of the same name; else where TRL has it (not DPOTrainer)
    reference_free: bool = False  # reads no reference log-probs
    f_divergence: bool = False  # built on the chosen-rejected reward difference: takes any f_divergence_type (TRL's rule)
    sorted: bool = False  # sorts within the batch: a pair's term depends on the batch's other pairs
    lengths: bool = False  # reads the reply token counts
    mean_logp_rewards: bool = False  # a loss of such terms only reports rewards beta x mean log-prob (no reference)


LOSSES: dict[str, LossInfo] = {i.name: i for i in (
    LossInfo("sigmoid", "`-log σ(β d)`; with `ε > 0` cDPO: `-(1-ε) log σ(β d) - ε log σ(-β d)`",
             "[DPO](https://arxiv.org/abs/2305.18290), [cDPO](https://ericmitchell.ai/cdpo.pdf)", "the default; cDPO for noisy labels",
             f_divergence=True),
    LossInfo("hinge", "`relu(1 - β d)`", "[SLiC](https://arxiv.org/abs/2305.10425)", "a margin instead of a likelihood", f_divergence=True),
    LossInfo("ipo", "`(c/|c| - r/|r| - 1/(2β))²`", "[IPO](https://arxiv.org/abs/2310.12036)",
             "DPO overfits (near-deterministic preferences)", f_divergence=True, lengths=True),
    LossInfo("exo_pair", "`σ(βd)(log σ(βd) - log(1-ε)) + σ(-βd)(log σ(-βd) - log ε)`, `ε > 0`", "[EXO](https://arxiv.org/abs/2402.00856)",
             "mode-seeking; ε = 1e-3 as the paper", f_divergence=True),
    LossInfo("nca_pair", "`-log σ(βc) - ½ log σ(-βc) - ½ log σ(-βr)`", "[NCA](https://arxiv.org/abs/2402.05369)",
             "keeps the chosen likelihood from falling"),
    LossInfo("robust", "`(-(1-ε) log σ(βd) + ε log σ(-βd)) / (1-2ε)`", "[rDPO](https://arxiv.org/abs/2403.00409)",
             "labels flipped with probability ε", f_divergence=True),
    LossInfo("bco_pair", "`-log σ(βc) - log σ(-βr)`", "[BCO](https://arxiv.org/abs/2404.04656)",
             "binary classifier view (TRL's paired form, no running δ)"),
    LossInfo("sppo_hard", "`(c - 1/(2β))² + (r + 1/(2β))²`", "[SPPO](https://arxiv.org/abs/2405.00675)", "self-play, hard win probabilities"),
    LossInfo("aot", "smoothed sigmoid of `β (sort(πc-πr) - sort(rc-rr))`", "[AOT](https://arxiv.org/abs/2406.05882)",
             "distributional alignment; sorts within the batch", sorted=True),
    LossInfo("aot_unpaired", "smoothed sigmoid of `β (sort(c) - sort(r))`", "[AOT](https://arxiv.org/abs/2406.05882)", "unpaired data",
             sorted=True),
    LossInfo("apo_zero", "`1 - σ(βc) + σ(βr)`", "[APO](https://arxiv.org/abs/2408.06266)", "chosen replies better than the model's own"),
    LossInfo("apo_down", "`σ(βc) + 1 - σ(β(c - r))`", "[APO](https://arxiv.org/abs/2408.06266)", "chosen replies worse than the model's own"),
    LossInfo("discopop", "`-log σ(βd)(1-m) + e^(-βd) m`, `m = σ(βd / τ)`, `τ = train.discopop_tau`",
             "[DiscoPOP](https://arxiv.org/abs/2406.08414)", "a discovered log-ratio-modulated loss", f_divergence=True),
    LossInfo("sft", "NLL of the chosen reply, per chosen token of the batch", "RPO, [MPO](https://arxiv.org/abs/2411.10442)",
             "as a term of a list; `train.nll_weight: w` is `sft` with weight w", reference_free=True, f_divergence=True, lengths=True),
    LossInfo("sigmoid_norm", "`-log σ(β (c/|c| - r/|r|))`", "length-normalised DPO", "long, variable-length replies",
             f_divergence=True, lengths=True),
    LossInfo("simpo", "`-log σ(β (πc/|c| - πr/|r|) - β γ)`, `γ = train.simpo_gamma`", "[SimPO](https://arxiv.org/abs/2405.14734)",
             "reference-free", trl="CPO's `simpo`", reference_free=True, lengths=True, mean_logp_rewards=True),
    LossInfo("orpo", "`NLL(chosen) - β log σ(log odds(πc/|c|) - log odds(πr/|r|))`", "[ORPO](https://arxiv.org/abs/2403.07691)",
             "reference-free, SFT and preference in one", trl="ORPOTrainer", reference_free=True, lengths=True, mean_logp_rewards=True),
)}

LOSS_TYPES = tuple(LOSSES)  # the config's allowed loss_type values, in this order
TRL_LOSS_TYPES = tuple(n for n, i in LOSSES.items() if not i.trl)  # TRL 1.16 DPOTrainer's; simpo and orpo are dpo-ray's own
F_DIVERGENCE_LOSSES = frozenset(n for n, i in LOSSES.items() if i.f_divergence)
SORTED_LOSSES = frozenset(n for n, i in LOSSES.items() if i.sorted)
REFERENCE_FREE = frozenset(n for n, i in LOSSES.items() if i.reference_free)
MEAN_LOGP_REWARDS = frozenset(n for n, i in LOSSES.items() if i.mean_logp_rewards)
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # f_divergence_type; reverse_kl is DPO's

DOC = Path(__file__).resolve().parent.parent / "docs" / "losses.md"
BEGIN = ("<!-- generated by `python -m dpo_ray.loss_names --write` from dpo_ray/loss_names.py: edit LOSSES there, not this table "
         "(tests/test_docs.py fails when the two differ) -->")
END = "<!-- end of the generated table -->"


def table() -> str:
    """docs/losses.md's table of losses, one row per LOSSES entry."""
    yes = lambda flag: "yes" if flag else "no"  # noqa: E731
    lines = ["| `train.loss_type` | TRL name | per-pair loss | paper | reference-free | f-divergence | when people pick it |",
             "|---|---|---|---|---|---|---|"]
    for i in LOSSES.values():
        cells = [f"`{i.name}`", f"({i.trl})" if i.trl else f"`{i.name}`", i.formula, i.paper, yes(i.reference_free), yes(i.f_divergence), i.use]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")  # a bare | inside a cell would split it
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """The page `text` with the part between the BEGIN and END markers replaced by table()."""
    pattern = re.compile(re.escape(BEGIN) + r"\n.*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"{DOC} needs the table's markers once each: {BEGIN} ... {END}")
    return pattern.sub(lambda _: f"{BEGIN}\n\n{table()}\n{END}", text)  # blank lines: the table is a block of its own


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpo_ray.loss_names", description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help="rewrite docs/losses.md's table in place")
    g.add_argument("--check", action="store_true", help="exit 1 when docs/losses.md's table is out of date")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(table())
        return 0
    text = DOC.read_text()
    new = render(text)
    if args.write:
        DOC.write_text(new)
        return 0
    if new != text:
        print(f"loss_names: {DOC} is out of date: run `python -m dpo_ray.loss_names --write`", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
