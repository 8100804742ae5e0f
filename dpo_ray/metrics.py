"""dpo_metrics(): TRL-named preference metrics, one function shared by training and evaluation."""
from __future__ import annotations

import torch


def pair_accuracies(margins: torch.Tensor, tie_tolerance=0.0) -> torch.Tensor:
    """Per pair: 1 where the chosen reward is higher, 0 where lower, 0.5 within `tie_tolerance` (a number, or one per pair)."""
    margins = margins.double()
    return torch.where(margins.abs() <= tie_tolerance, 0.5, (margins > 0).double())


def dpo_metrics(chosen_rewards, rejected_rewards, policy_chosen_logps, policy_rejected_logps, *, tie_tolerance=0.0) -> dict[str, float]:
    """Means over pairs, under TRL's names (without the train/ or eval/ prefix).

    `rewards/accuracies` counts a pair as 1 when chosen_reward > rejected_reward and as 0.5 when the
    margin is within `tie_tolerance` (a number, or one per pair) (so the reference scored against itself reads 0.5, not 0).
    """
    margins = (chosen_rewards - rejected_rewards).double()
    acc = pair_accuracies(margins, tie_tolerance)
    return {
        "rewards/chosen": chosen_rewards.double().mean().item(),
        "rewards/rejected": rejected_rewards.double().mean().item(),
        "rewards/accuracies": acc.mean().item(),
        "rewards/margins": margins.mean().item(),
        "logps/chosen": policy_chosen_logps.double().mean().item(),
        "logps/rejected": policy_rejected_logps.double().mean().item(),
    }
