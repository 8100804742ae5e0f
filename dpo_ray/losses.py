"""Preference losses as pure functions. Pure torch: no Ray, no MLflow.

Every `loss_type` of TRL 1.16's DPOTrainer (trl/trainer/dpo_trainer.py, `_compute_loss`), with its `loss_weights`
(several losses summed, MPO), `f_divergence_type`, `use_weighting` (WPO) and `ld_alpha` (LD-DPO); plus `simpo`, cDPO
(`sigmoid` with `label_smoothing` > 0: TRL 1.x's sigmoid ignores label_smoothing) and `orpo` (odds ratio + the chosen
NLL, reference-free; trl/experimental/orpo). All of them read only per-sequence sums, so one cached reference pass
(with its LD-DPO split sums, see logps.split_sums) serves every loss.

`loss_terms` returns each term per pair, scaled so that its mean over a batch is TRL's value of that term on that
batch: the step loss is sum_k weight_k * mean(term_k). For all but the *batch-coupled* terms (`aot` and
`aot_unpaired` sort within the batch) a pair's term depends on that pair alone (sft's per-token mean through the
batch's token count, a constant), so micro-batches may be summed; the coupled ones must see the whole batch at once.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
                  "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
LOSS_TYPES = TRL_LOSS_TYPES + ("simpo", "orpo")  # dpo-ray's own: TRL's DPOTrainer has neither
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})  # TRL's rule
SORTED_LOSSES = frozenset({"aot", "aot_unpaired"})
REFERENCE_FREE = frozenset({"simpo", "orpo", "sft"})  # read no reference log-probs


@dataclass(frozen=True)
class LossSpec:
    """What the loss is: the terms and their weights, and every setting a term reads (TRL's names)."""

    types: tuple[str, ...] = ("sigmoid",)
    weights: tuple[float, ...] = (1.0,)
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO (sigmoid), robust, exo_pair, aot, aot_unpaired, simpo
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    use_weighting: bool = False  # WPO
    ld_alpha: float | None = None  # LD-DPO

    def __post_init__(self):
        unknown = [t for t in self.types if t not in LOSS_TYPES]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown[0]!r}; choose one of {list(LOSS_TYPES)}")
        if len(self.weights) != len(self.types):
            raise ValueError(f"loss_weights has {len(self.weights)} values for {len(self.types)} loss types {list(self.types)}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"unknown f_divergence_type {self.f_divergence_type!r}; choose one of {list(F_DIVERGENCES)}")
        if self.f_divergence_type != "reverse_kl" and not set(self.types) <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type={self.f_divergence_type} works only with the losses built on the chosen-rejected "
                             f"reward difference {sorted(F_DIVERGENCE_LOSSES)}; got {list(self.types)}")
        if self.use_weighting and set(self.types) & SORTED_LOSSES:
            raise ValueError("use_weighting (WPO) cannot weight aot / aot_unpaired: they sort the pairs, which misaligns the weights")
        if "exo_pair" in self.types and self.label_smoothing == 0:
            raise ValueError("loss_type exo_pair needs label_smoothing > 0 (the EXO paper recommends 1e-3)")

    @classmethod
    def from_config(cls, t) -> "LossSpec":
        """From a TrainConfig (or anything with its fields): `nll_weight` > 0 is a shorthand for an `sft` term (RPO)."""
        types = [t.loss_type] if isinstance(t.loss_type, str) else list(t.loss_type)
        weights = list(getattr(t, "loss_weights", None) or [1.0] * len(types))
        if getattr(t, "nll_weight", 0) > 0:
            if "sft" in types:
                raise ValueError("set either train.nll_weight or an sft term in train.loss_type, not both")
            types, weights = types + ["sft"], weights + [t.nll_weight]
        return cls(types=tuple(types), weights=tuple(float(w) for w in weights), beta=t.beta, label_smoothing=t.label_smoothing,
                   simpo_gamma=t.simpo_gamma, discopop_tau=getattr(t, "discopop_tau", 0.05),
                   f_divergence_type=getattr(t, "f_divergence_type", "reverse_kl"),
                   f_alpha_divergence_coef=getattr(t, "f_alpha_divergence_coef", 0.5),
                   use_weighting=getattr(t, "use_weighting", False), ld_alpha=getattr(t, "ld_alpha", None))

    @property
    def batch_coupled(self) -> bool:
        """A term of one pair depends on other pairs of the batch: the step's pairs must be in one loss call."""
        return bool(set(self.types) & SORTED_LOSSES)

    @property
    def needs_weights(self) -> bool:
        return self.use_weighting

    @property
    def name(self) -> str:
        return "+".join(self.types)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (as trl/experimental/orpo computes it)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def ld_logps(total: torch.Tensor, shared: torch.Tensor | None, alpha: float | None) -> torch.Tensor:
    """LD-DPO (https://arxiv.org/abs/2409.06411): the reply's first min(|chosen|, |rejected|) tokens in full, the tail x alpha."""
    if alpha is None:
        return total
    return shared + alpha * (total - shared)


def f_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f-DPO (https://arxiv.org/abs/2309.16240): f'(pi/ref) in place of the log-ratio, as TRL 1.16 computes it (clamps included)."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":  # f'(t) = 1 - 1/t
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":  # f'(t) = log(2t/(t+1)) = log 2 + logsigmoid(log t)
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":  # f'(t) = (t^(a-1) - 1)/(a-1)
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        t = (alpha - 1.0) * logratios
        clamp = {torch.float16: 11.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp)) - 1.0).to(t.dtype) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {kind!r}")


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def loss_terms(spec: LossSpec, pc, pr, rc, rr, lc, lr, *, nll_chosen=None, tokens_per_pair=None, wc=None, wr=None):
    """Each term of `spec` per pair, and the chosen and rejected rewards; all (B,).

    pc, pr: the policy's reply log-probs (LD-DPO combined when spec.ld_alpha is set, see ld_logps); rc, rr the
    reference's, the same way (unused by simpo / orpo / sft); lc, lr reply token counts; nll_chosen the chosen sums
    without LD-DPO (sft and orpo's NLL; default pc); tokens_per_pair the chosen tokens per pair of the whole batch the
    loss is averaged over (the NLL is a mean per token of that batch; default the mean of lc); wc, wr the WPO weights.
    Each term's mean over the batch equals TRL's value of it; rewards are beta * (policy - reference) as TRL logs them
    (beta x mean log-prob for a loss of reference-free terms only: simpo, orpo).
    """
    b, eps = spec.beta, spec.label_smoothing
    nll_chosen = pc if nll_chosen is None else nll_chosen
    tokens_per_pair = lc.to(pc.dtype).mean() if tokens_per_pair is None else tokens_per_pair
    lcf, lrf = lc.to(pc.dtype).clamp(min=1), lr.to(pc.dtype).clamp(min=1)
    if rc is not None:
        cl, rl = pc - rc, pr - rr  # chosen and rejected log-ratios
        cs, rs = f_scores(cl, spec.f_divergence_type, spec.f_alpha_divergence_coef), f_scores(rl, spec.f_divergence_type, spec.f_alpha_divergence_coef)
        d = cs - rs
    elif set(spec.types) - REFERENCE_FREE:
        raise ValueError(f"loss {spec.name} needs the reference log-probs")
    terms = {}
    for kind in spec.types:
        if kind == "sigmoid":  # DPO (https://arxiv.org/abs/2305.18290); eps > 0: cDPO (TRL 1.x has no eps here)
            x = _smoothed(b * d, eps)
        elif kind == "hinge":  # SLiC (https://arxiv.org/abs/2305.10425)
            x = torch.relu(1 - b * d)
        elif kind == "ipo":  # IPO (https://arxiv.org/abs/2310.12036), per-token averaged scores as in TRL
            x = (cs / lcf - rs / lrf - 1 / (2 * b)) ** 2
        elif kind == "exo_pair":  # EXO (https://arxiv.org/abs/2402.00856), eq. 16
            x = (torch.sigmoid(b * d) * (F.logsigmoid(b * d) - math.log1p(-eps))
                 + torch.sigmoid(-b * d) * (F.logsigmoid(-b * d) - math.log(eps)))
        elif kind == "nca_pair":  # NCA (https://arxiv.org/abs/2402.05369)
            x = -F.logsigmoid(b * cl) - 0.5 * F.logsigmoid(-b * cl) - 0.5 * F.logsigmoid(-b * rl)
        elif kind == "robust":  # robust DPO (https://arxiv.org/abs/2403.00409)
            x = (-(1 - eps) * F.logsigmoid(b * d) + eps * F.logsigmoid(-b * d)) / (1 - 2 * eps)
        elif kind == "bco_pair":  # BCO, paired (https://arxiv.org/abs/2404.04656), without the running delta
            x = -F.logsigmoid(b * cl) - F.logsigmoid(-b * rl)
        elif kind == "sppo_hard":  # SPPO with hard probabilities (https://arxiv.org/abs/2405.00675)
            x = (cl - 0.5 / b) ** 2 + (rl + 0.5 / b) ** 2
        elif kind == "aot":  # AOT (https://arxiv.org/abs/2406.05882): sorted within the batch
            delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
            x = _smoothed(b * delta, eps)
        elif kind == "aot_unpaired":
            delta = torch.sort(cl, dim=0)[0] - torch.sort(rl, dim=0)[0]
            x = _smoothed(b * delta, eps)
        elif kind == "apo_zero":  # APO (https://arxiv.org/abs/2408.06266), eq. 7
            x = 1 - torch.sigmoid(b * cl) + torch.sigmoid(b * rl)
        elif kind == "apo_down":  # eq. 8
            x = torch.sigmoid(b * cl) + 1 - torch.sigmoid(b * (cl - rl))
        elif kind == "discopop":  # DiscoPOP (https://arxiv.org/abs/2406.08414), eq. 5
            z = b * d
            mix = torch.sigmoid(z / spec.discopop_tau)
            x = -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix
        elif kind == "sft":  # NLL of the chosen replies per chosen token of the batch (RPO's term: nll_weight). Under WPO
            # each pair's NLL gets its weight (TRL 1.16 raises there: an in-place multiply of an expanded tensor)
            x = -nll_chosen / tokens_per_pair
        elif kind == "sigmoid_norm":  # sigmoid on per-token averaged scores
            x = -F.logsigmoid(b * (cs / lcf - rs / lrf))
        elif kind == "simpo":  # SimPO (https://arxiv.org/abs/2405.14734), reference-free; gamma is the margin / beta
            z = b * (pc / lcf - pr / lrf) - b * spec.simpo_gamma
            x = _smoothed(z, eps)
        elif kind == "orpo":  # ORPO (https://arxiv.org/abs/2403.07691): NLL(chosen) - beta log sig(log odds of mean log-probs)
            ac, ar = pc / lcf, pr / lrf
            log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
            x = -b * F.logsigmoid(log_odds) - nll_chosen / tokens_per_pair
        else:
            raise ValueError(f"unknown loss_type {kind!r}")
        if spec.use_weighting:  # WPO (https://arxiv.org/abs/2406.11827), eq. 2
            x = x * (wc * wr)
        terms[kind] = x
    if set(spec.types) <= {"simpo", "orpo"} or rc is None:
        cr, rr_ = b * (pc / lcf).detach(), b * (pr / lrf).detach()
    else:
        cr, rr_ = b * cl.detach(), b * rl.detach()
    return terms, cr, rr_


def combine(spec: LossSpec, terms: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per pair: sum_k weight_k * term_k (its mean over the batch is the loss)."""
    return sum(w * terms[k] for k, w in zip(spec.types, spec.weights))


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, chosen_lengths=None, rejected_lengths=None,
             simpo_gamma: float = 0.5):
    """One loss type, per pair: (losses, chosen_rewards, rejected_rewards), all (B,); lengths are reply token counts
    (needed by ipo, sigmoid_norm, simpo, orpo, sft). The benchmarks' and simple callers' entry point to loss_terms."""
    if chosen_lengths is None or rejected_lengths is None:
        if loss_type in ("ipo", "sigmoid_norm", "simpo", "orpo", "sft"):
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (reply token counts)")
        chosen_lengths = rejected_lengths = torch.ones_like(policy_chosen_logps)
    spec = LossSpec(types=(loss_type,), weights=(1.0,), beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    terms, cr, rr = loss_terms(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_lengths, rejected_lengths)
    return terms[loss_type], cr, rr
