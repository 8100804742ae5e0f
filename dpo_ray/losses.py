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

The names and their properties are dpo_ray/loss_names.py's table (torch-free: the config's allowed values and
docs/losses.md's table are made from it too); each name's term is a small function registered here with `@term(name)`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .loss_names import (F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSS_TYPES, LOSSES, MEAN_LOGP_REWARDS, REFERENCE_FREE,  # noqa: F401
                         SORTED_LOSSES, TRL_LOSS_TYPES)


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


def _registry(names: tuple[str, ...], what: str):
    """An empty name -> function table and its decorator `@register(name)`, which takes only the given names, once."""
    table: dict[str, Callable] = {}

    def register(name: str):
        def add(fn):
            if name not in names or name in table:
                raise ValueError(f"{what} {name!r}: not one of {list(names)}, or registered twice")
            table[name] = fn
            return fn
        return add
    return table, register


F_PRIMES, f_divergence = _registry(F_DIVERGENCES, "f_divergence_type")  # name -> f'(pi/ref) of the log-ratio x, given alpha
TERMS, term = _registry(LOSS_TYPES, "loss_type")  # name -> its term per pair, from (PairSums, LossSpec)


@f_divergence("reverse_kl")
def _reverse_kl(x, alpha):
    return x


@f_divergence("forward_kl")
def _forward_kl(x, alpha):  # f'(t) = 1 - 1/t
    return 1 - torch.exp(-x)


@f_divergence("js_divergence")
def _js_divergence(x, alpha):  # f'(t) = log(2t/(t+1)) = log 2 + logsigmoid(log t)
    return math.log(2) + F.logsigmoid(x)


@f_divergence("alpha_divergence")
def _alpha_divergence(x, alpha):  # f'(t) = (t^(a-1) - 1)/(a-1)
    if abs(alpha - 1.0) < 1e-6:
        return x
    t = (alpha - 1.0) * x
    clamp = {torch.float16: 11.0}.get(t.dtype, 80.0)
    return (torch.exp(torch.clamp(t.float(), max=clamp)) - 1.0).to(t.dtype) / (alpha - 1.0)


def f_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """f-DPO (https://arxiv.org/abs/2309.16240): f'(pi/ref) in place of the log-ratio, as TRL 1.16 computes it (clamps included)."""
    if kind not in F_PRIMES:
        raise ValueError(f"unknown f_divergence_type {kind!r}")
    return F_PRIMES[kind](logratios, alpha)


def _smoothed(z: torch.Tensor, eps: float) -> torch.Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


@dataclass(frozen=True)
class PairSums:
    """What a term reads, per pair (B,). pc, pr the policy's reply log-probs, rc, rr the reference's (None, and so the
    log-ratios cl = pc - rc, rl = pr - rr, their f-scores cs, rs and d = cs - rs, for a loss of reference-free terms only);
    lc, lr the reply token counts (pc's dtype, at least 1); nll the chosen sums without LD-DPO; tpp the chosen tokens per pair."""

    pc: torch.Tensor
    pr: torch.Tensor
    rc: torch.Tensor | None
    rr: torch.Tensor | None
    cl: torch.Tensor | None
    rl: torch.Tensor | None
    cs: torch.Tensor | None
    rs: torch.Tensor | None
    d: torch.Tensor | None
    lc: torch.Tensor
    lr: torch.Tensor
    nll: torch.Tensor
    tpp: torch.Tensor | float


@term("sigmoid")
def _sigmoid(x: PairSums, s: LossSpec) -> torch.Tensor:
    """DPO; label_smoothing > 0: cDPO (TRL 1.x's sigmoid has no eps)."""
    return _smoothed(s.beta * x.d, s.label_smoothing)


@term("hinge")
def _hinge(x: PairSums, s: LossSpec) -> torch.Tensor:
    return torch.relu(1 - s.beta * x.d)


@term("ipo")
def _ipo(x: PairSums, s: LossSpec) -> torch.Tensor:
    """On per-token averaged scores, as in TRL."""
    return (x.cs / x.lc - x.rs / x.lr - 1 / (2 * s.beta)) ** 2


@term("exo_pair")
def _exo_pair(x: PairSums, s: LossSpec) -> torch.Tensor:
    """EXO's eq. 16: KL(model || labels) over {chosen wins, rejected wins}, the model's odds sigmoid(beta d), the labels eps-smoothed."""
    b, d, eps = s.beta, x.d, s.label_smoothing
    return (torch.sigmoid(b * d) * (F.logsigmoid(b * d) - math.log1p(-eps))
            + torch.sigmoid(-b * d) * (F.logsigmoid(-b * d) - math.log(eps)))


@term("nca_pair")
def _nca_pair(x: PairSums, s: LossSpec) -> torch.Tensor:
    b = s.beta
    return -F.logsigmoid(b * x.cl) - 0.5 * F.logsigmoid(-b * x.cl) - 0.5 * F.logsigmoid(-b * x.rl)


@term("robust")
def _robust(x: PairSums, s: LossSpec) -> torch.Tensor:
    """Unbiased under labels flipped with probability eps (no lower bound)."""
    b, eps = s.beta, s.label_smoothing
    return (-(1 - eps) * F.logsigmoid(b * x.d) + eps * F.logsigmoid(-b * x.d)) / (1 - 2 * eps)


@term("bco_pair")
def _bco_pair(x: PairSums, s: LossSpec) -> torch.Tensor:
    """BCO's paired form, without the running delta (as TRL)."""
    return -F.logsigmoid(s.beta * x.cl) - F.logsigmoid(-s.beta * x.rl)


@term("sppo_hard")
def _sppo_hard(x: PairSums, s: LossSpec) -> torch.Tensor:
    """SPPO with hard win probabilities: the log-ratios regressed to +-1/(2 beta)."""
    return (x.cl - 0.5 / s.beta) ** 2 + (x.rl + 0.5 / s.beta) ** 2


@term("aot")
def _aot(x: PairSums, s: LossSpec) -> torch.Tensor:
    """The policy's sorted margins against the reference's, matched by rank within the batch."""
    delta = torch.sort(x.pc - x.pr, dim=0)[0] - torch.sort(x.rc - x.rr, dim=0)[0]
    return _smoothed(s.beta * delta, s.label_smoothing)


@term("aot_unpaired")
def _aot_unpaired(x: PairSums, s: LossSpec) -> torch.Tensor:
    """The chosen log-ratios, sorted, against the rejected ones, sorted: no pairing needed."""
    delta = torch.sort(x.cl, dim=0)[0] - torch.sort(x.rl, dim=0)[0]
    return _smoothed(s.beta * delta, s.label_smoothing)


@term("apo_zero")
def _apo_zero(x: PairSums, s: LossSpec) -> torch.Tensor:
    """APO's eq. 7: chosen up, rejected down."""
    return 1 - torch.sigmoid(s.beta * x.cl) + torch.sigmoid(s.beta * x.rl)


@term("apo_down")
def _apo_down(x: PairSums, s: LossSpec) -> torch.Tensor:
    """APO's eq. 8: chosen down, rejected further down."""
    return torch.sigmoid(s.beta * x.cl) + 1 - torch.sigmoid(s.beta * (x.cl - x.rl))


@term("discopop")
def _discopop(x: PairSums, s: LossSpec) -> torch.Tensor:
    """DiscoPOP's eq. 5: logistic and exponential losses mixed by sigmoid(z / tau)."""
    z = s.beta * x.d
    mix = torch.sigmoid(z / s.discopop_tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


@term("sft")
def _sft(x: PairSums, s: LossSpec) -> torch.Tensor:
    """NLL of the chosen replies per chosen token of the batch (RPO's term: nll_weight)."""
    # under WPO each pair's NLL gets its weight (TRL 1.16 raises there: an in-place multiply of an expanded tensor)
    return -x.nll / x.tpp


@term("sigmoid_norm")
def _sigmoid_norm(x: PairSums, s: LossSpec) -> torch.Tensor:
    """sigmoid on per-token averaged scores."""
    return -F.logsigmoid(s.beta * (x.cs / x.lc - x.rs / x.lr))


@term("simpo")
def _simpo(x: PairSums, s: LossSpec) -> torch.Tensor:
    """Reference-free, on mean log-probs; simpo_gamma is the target margin / beta."""
    z = s.beta * (x.pc / x.lc - x.pr / x.lr) - s.beta * s.simpo_gamma
    return _smoothed(z, s.label_smoothing)


@term("orpo")
def _orpo(x: PairSums, s: LossSpec) -> torch.Tensor:
    """NLL(chosen) - beta log sigmoid(log odds ratio), the odds of the replies' mean log-probs."""
    ac, ar = x.pc / x.lc, x.pr / x.lr
    log_odds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))  # log(p/(1-p)) with p = exp(mean log-prob)
    return -s.beta * F.logsigmoid(log_odds) - x.nll / x.tpp


for _table, _names in ((TERMS, LOSS_TYPES), (F_PRIMES, F_DIVERGENCES)):
    if set(_table) != set(_names):  # a name of dpo_ray/loss_names.py without its function here
        raise ImportError(f"dpo_ray.losses: no function registered for {sorted(set(_names) - set(_table))}")


def loss_terms(spec: LossSpec, pc, pr, rc, rr, lc, lr, *, nll_chosen=None, tokens_per_pair=None, wc=None, wr=None):
    """Each term of `spec` per pair, and the chosen and rejected rewards; all (B,).

    pc, pr: the policy's reply log-probs (LD-DPO combined when spec.ld_alpha is set, see ld_logps); rc, rr the
    reference's, the same way (unused by simpo / orpo / sft); lc, lr reply token counts; nll_chosen the chosen sums
    without LD-DPO (sft and orpo's NLL; default pc); tokens_per_pair the chosen tokens per pair of the whole batch the
    loss is averaged over (the NLL is a mean per token of that batch; default the mean of lc); wc, wr the WPO weights.
    Each term's mean over the batch equals TRL's value of it; rewards are beta * (policy - reference) as TRL logs them
    (beta x mean log-prob for a loss of reference-free terms only: simpo, orpo).
    """
    b = spec.beta
    nll_chosen = pc if nll_chosen is None else nll_chosen
    tokens_per_pair = lc.to(pc.dtype).mean() if tokens_per_pair is None else tokens_per_pair
    lcf, lrf = lc.to(pc.dtype).clamp(min=1), lr.to(pc.dtype).clamp(min=1)
    cl = rl = cs = rs = d = None
    if rc is not None:
        cl, rl = pc - rc, pr - rr  # chosen and rejected log-ratios
        cs, rs = f_scores(cl, spec.f_divergence_type, spec.f_alpha_divergence_coef), f_scores(rl, spec.f_divergence_type, spec.f_alpha_divergence_coef)
        d = cs - rs
    elif set(spec.types) - REFERENCE_FREE:
        raise ValueError(f"loss {spec.name} needs the reference log-probs")
    x = PairSums(pc, pr, rc, rr, cl, rl, cs, rs, d, lcf, lrf, nll_chosen, tokens_per_pair)
    terms = {}
    for kind in spec.types:
        if kind not in TERMS:
            raise ValueError(f"unknown loss_type {kind!r}")
        t = TERMS[kind](x, spec)
        if spec.use_weighting:  # WPO (https://arxiv.org/abs/2406.11827), eq. 2
            t = t * (wc * wr)
        terms[kind] = t
    if set(spec.types) <= MEAN_LOGP_REWARDS or rc is None:
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
    (needed by the losses marked `lengths` in LOSSES). The benchmarks' and simple callers' entry point to loss_terms."""
    if chosen_lengths is None or rejected_lengths is None:
        if loss_type in LOSSES and LOSSES[loss_type].lengths:
            raise ValueError(f"loss_type={loss_type!r} needs chosen_lengths and rejected_lengths (reply token counts)")
        chosen_lengths = rejected_lengths = torch.ones_like(policy_chosen_logps)
    spec = LossSpec(types=(loss_type,), weights=(1.0,), beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)
    terms, cr, rr = loss_terms(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                               chosen_lengths, rejected_lengths)
    return terms[loss_type], cr, rr


def pair_inputs(spec, policy: tuple, ref: tuple, lengths: tuple, policy_shared: tuple = (None, None), ref_shared: tuple = (None, None),
                wpo_logweights: tuple = (None, None)) -> dict:
    """Per pair, what every loss reads, from (chosen, rejected) sums however they were computed (the train step's
    forward, or the evaluation's scored columns): policy pc/pr and reference rc/rr (LD-DPO combined with their shared
    parts when spec.ld_alpha is set), reply lengths lc/lr, the chosen sums without LD-DPO (nll: sft, orpo), WPO
    weights wc/wr (None without use_weighting)."""
    alpha = spec.ld_alpha
    if alpha is not None and ref_shared[0] is None:
        raise ValueError("train.ld_alpha needs the reference's split sums (ref_*_shared_logps): a reference cache of version >= 3")
    wc, wr = (w.exp() if w is not None else None for w in wpo_logweights)
    return {"pc": ld_logps(policy[0], policy_shared[0], alpha), "pr": ld_logps(policy[1], policy_shared[1], alpha),
            "rc": ld_logps(ref[0], ref_shared[0], alpha), "rr": ld_logps(ref[1], ref_shared[1], alpha),
            "lc": lengths[0], "lr": lengths[1], "nll": policy[0], "wc": wc, "wr": wr}


def pair_losses(spec, x: dict, tokens_per_pair=None):
    """(per-pair loss: sum_k weight_k term_k, {type: per-pair term}, chosen rewards, rejected rewards) of pair_inputs."""
    terms, cr, rr = loss_terms(spec, x["pc"], x["pr"], x["rc"], x["rr"], x["lc"], x["lr"], nll_chosen=x["nll"],
                               tokens_per_pair=tokens_per_pair, wc=x["wc"], wr=x["wr"])
    return combine(spec, terms), terms, cr, rr
