"""Preference losses as pure functions. Pure torch: no Ray, no MLflow.

Each returns per-pair `(losses, chosen_rewards, rejected_rewards)`; the caller reduces. Rewards are
beta * (policy - reference) on the summed log-probs, as TRL logs them. Formulas follow TRL's
`DPOTrainer.dpo_loss` (trl/trainer/dpo_trainer.py); `LOSSES` maps `train.loss_type` to them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rewards(beta, pc, pr, rc, rr):
    return beta * (pc - rc).detach(), beta * (pr - rr).detach()


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """DPO (https://arxiv.org/abs/2305.18290); eps > 0 is conservative DPO (cDPO).
    -(1-eps) log sig(beta d) - eps log sig(-beta d)"""
    return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)


def hinge_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """SLiC (https://arxiv.org/abs/2305.10425): relu(1 - beta d)"""
    return torch.relu(1 - beta * delta)


def robust_loss(delta: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """Robust DPO for noisy labels (https://arxiv.org/abs/2403.00409):
    (-(1-eps) log sig(beta d) + eps log sig(-beta d)) / (1 - 2 eps)"""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * delta) + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)


def ipo_loss(delta_mean: torch.Tensor, beta: float, label_smoothing: float) -> torch.Tensor:
    """IPO (https://arxiv.org/abs/2310.12036): (d_mean - 1/(2 beta))^2, d_mean on per-token average log-ratios."""
    return (delta_mean - 1 / (2 * beta)) ** 2


LOSSES = {"sigmoid": sigmoid_loss, "hinge": hinge_loss, "ipo": ipo_loss, "robust": robust_loss}


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference loss and rewards; all inputs (B,), lengths are reply token counts.

    With d = (pc - rc) - (pr - rr): see LOSSES. `ipo` divides each log-ratio by its reply length
    (lengths required). `simpo` is reference-free (https://arxiv.org/abs/2405.14734):
    -(1-eps) log sig(beta (pc/|c| - pr/|r|) - beta gamma) - eps log sig(-(...)); its rewards are
    beta * pc/|c| and beta * pr/|r| as in TRL's SimPO.
    """
    pc, pr = policy_chosen_logps, policy_rejected_logps
    if loss_type == "simpo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='simpo' needs chosen_lengths and rejected_lengths")
        pc_avg, pr_avg = pc / chosen_lengths, pr / rejected_lengths
        logits = beta * (pc_avg - pr_avg) - beta * simpo_gamma
        losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
        return losses, beta * pc_avg.detach(), beta * pr_avg.detach()
    if loss_type not in LOSSES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {sorted(LOSSES) + ['simpo']}")
    rc, rr = ref_chosen_logps, ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (reply token counts)")
        delta = (pc - rc) / chosen_lengths - (pr - rr) / rejected_lengths
    else:
        delta = (pc - rc) - (pr - rr)
    losses = LOSSES[loss_type](delta, beta, label_smoothing)
    chosen_rewards, rejected_rewards = _rewards(beta, pc, pr, rc, rr)
    return losses, chosen_rewards, rejected_rewards
