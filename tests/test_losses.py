"""dpo_ray.losses against formulas written here independently in float64 (plain math on Python floats).

Worked example for the sigmoid loss: pc=-10, pr=-12, rc=-11, rr=-11, beta=0.5
  d = (pc-rc) - (pr-rr) = 1 - (-1) = 2;  loss = -log sigmoid(0.5*2) = log(1 + e^-1) = 0.31326...
"""
import math

import pytest
import torch

from dpo_ray.losses import dpo_loss


def _logsig(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference(pc, pr, rc, rr, lc, lr, beta, eps, kind, gamma=0.5):
    d = (pc - rc) - (pr - rr)
    if kind == "sigmoid":
        return -(1 - eps) * _logsig(beta * d) - eps * _logsig(-beta * d)
    if kind == "hinge":
        return max(0.0, 1 - beta * d)
    if kind == "robust":
        return (-(1 - eps) * _logsig(beta * d) + eps * _logsig(-beta * d)) / (1 - 2 * eps)
    if kind == "ipo":
        dm = (pc - rc) / lc - (pr - rr) / lr
        return (dm - 1 / (2 * beta)) ** 2
    if kind == "simpo":
        z = beta * (pc / lc - pr / lr) - beta * gamma
        return -(1 - eps) * _logsig(z) - eps * _logsig(-z)
    raise AssertionError(kind)


CASES = [  # pc, pr, rc, rr, len_c, len_r
    (-10.0, -12.0, -11.0, -11.0, 5, 7),
    (-35.2, -20.1, -30.0, -25.5, 40, 12),
    (-1.5, -80.0, -3.0, -60.0, 3, 90),
    (-7.0, -7.0, -7.0, -7.0, 9, 9),
]


def test_worked_example():
    loss, cr, rr = dpo_loss(*[torch.tensor([v], dtype=torch.float64) for v in (-10.0, -12.0, -11.0, -11.0)], beta=0.5)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), abs=1e-12)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)


@pytest.mark.parametrize("kind", ["sigmoid", "hinge", "robust", "ipo", "simpo"])
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2), (2.0, 0.05)])
def test_loss_matches_float64_formula(kind, beta, eps):
    t = lambda i: torch.tensor([c[i] for c in CASES], dtype=torch.float64)
    losses, cr, rr = dpo_loss(t(0), t(1), t(2), t(3), beta=beta, loss_type=kind, label_smoothing=eps,
                              chosen_lengths=t(4), rejected_lengths=t(5), simpo_gamma=0.5)
    want = [reference(*c, beta, eps, kind) for c in CASES]
    assert losses.tolist() == pytest.approx(want, abs=1e-12, rel=1e-12)
    if kind == "simpo":
        assert cr.tolist() == pytest.approx([beta * c[0] / c[4] for c in CASES], abs=1e-12)
    else:
        assert cr.tolist() == pytest.approx([beta * (c[0] - c[2]) for c in CASES], abs=1e-12)
        assert rr.tolist() == pytest.approx([beta * (c[1] - c[3]) for c in CASES], abs=1e-12)


def test_trl_formula_fp32():
    """TRL 1.x sigmoid branch: logits = (pc - pr) - (rc - rr); -logsigmoid(beta*logits)*(1-ls) - logsigmoid(-beta*logits)*ls."""
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-50 * torch.rand(64, generator=g) for _ in range(4))
    beta, ls = 0.1, 0.1
    logits = (pc - pr) - (rc - rr)
    trl = -torch.nn.functional.logsigmoid(beta * logits) * (1 - ls) - torch.nn.functional.logsigmoid(-beta * logits) * ls
    ours, _, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=ls)
    torch.testing.assert_close(ours, trl, atol=1e-6, rtol=1e-6)


def test_gradient_pushes_chosen_up():
    pc = torch.tensor([-10.0], requires_grad=True)
    pr = torch.tensor([-10.0], requires_grad=True)
    loss, _, _ = dpo_loss(pc, pr, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1)
    loss.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descending raises chosen, lowers rejected


def test_needs_lengths_and_known_type():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")


def test_one_registry_makes_the_names_the_config_and_the_dispatch():
    """dpo_ray/loss_names.py's table is the one list of names: the config's allowed values, each name's registered term,
    and the sets other code reads are made from it (the sets pinned here: TRL 1.16's rules)."""
    import typing

    from dpo_ray import loss_names
    from dpo_ray.config import FDivergenceType, LossType, TrainConfig
    from dpo_ray.losses import F_PRIMES, TERMS

    assert loss_names.LOSS_TYPES == ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                                     "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "orpo")
    assert loss_names.TRL_LOSS_TYPES == loss_names.LOSS_TYPES[:-2]
    assert typing.get_args(LossType) == loss_names.LOSS_TYPES == tuple(TERMS)
    assert typing.get_args(FDivergenceType) == loss_names.F_DIVERGENCES == tuple(F_PRIMES)
    assert typing.get_args(TrainConfig.model_fields["f_divergence_type"].annotation) == loss_names.F_DIVERGENCES
    assert loss_names.F_DIVERGENCE_LOSSES == {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
    assert loss_names.SORTED_LOSSES == {"aot", "aot_unpaired"}
    assert loss_names.REFERENCE_FREE == {"simpo", "orpo", "sft"}
    assert loss_names.MEAN_LOGP_REWARDS == {"simpo", "orpo"}
    assert {n for n, i in loss_names.LOSSES.items() if i.lengths} == {"ipo", "sigmoid_norm", "simpo", "orpo", "sft"}
    x = torch.zeros(2)
    for name, info in loss_names.LOSSES.items():
        assert name == info.name and info.formula and info.paper and info.use
        if info.lengths:
            with pytest.raises(ValueError, match="lengths"):
                dpo_loss(x, x, x, x, beta=0.1, loss_type=name)


def test_the_config_imports_no_torch():
    """The loss names come from the torch-free table: loading a config stays light."""
    import subprocess
    import sys

    code = "import sys, dpo_ray.config; assert 'torch' not in sys.modules, 'dpo_ray.config imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
