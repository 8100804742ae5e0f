"""dpo_metrics(): TRL-named preference metrics, one function shared by training and evaluation."""
from __future__ import annotations

import torch


def pair_accuracies(margins: torch.Tensor, tie_tolerance=0.0) -> torch.Tensor:
    """Per pair: 1 where the chosen reward is higher, 0 where lower, 0.5 within `tie_tolerance` (a number, or one per pair)."""
    margins = margins.double()
    return torch.where(margins.abs() <= tie_tolerance, 0.5, (margins > 0).double())


NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


def metric_vector(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, *, tie_tolerance=0.0) -> torch.Tensor:
    """dpo_metrics' values (in NAMES order) as one float64 tensor on the inputs' device: read by the host in one go."""
    margins = (chosen_rewards - rejected_rewards).double()
    acc = pair_accuracies(margins, tie_tolerance)
    return torch.stack([chosen_rewards.double().mean(), rejected_rewards.double().mean(), acc.mean(), margins.mean(),
                        policy_chosen_logps.double().mean(), policy_rejected_logps.double().mean()])


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, *, tie_tolerance=0.0) -> dict[str, float]:
    """Means over pairs, under TRL's names (without the train/ or eval/ prefix).

    `rewards/accuracies` counts a pair as 1 when chosen_reward > rejected_reward and as 0.5 when the
    margin is within `tie_tolerance` (a number, or one per pair) (so the reference scored against itself reads 0.5, not 0).
    """
    values = metric_vector(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, tie_tolerance=tie_tolerance)
    return dict(zip(NAMES, values.tolist()))  # one read of the device, not one per metric
