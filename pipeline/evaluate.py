"""Stage 4, evaluate: held-out preference accuracy and reward margin of a model against the cached reference.

The same scorer as the reference stage computes the model's log-probs on the eval split; the
reference model scored the same way must read 0.5 accuracy and 0 margin (a sanity check of the cache).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from dpo_ray.losses import dpo_loss
from dpo_ray.metrics import dpo_metrics

from .reference import Reference, has_split, read_split, score

log = logging.getLogger("dpo_ray")
TIE_TOLERANCE = 1e-4  # reward units: batching differences move CPU fp32 log-probs by ~1e-6 of their size


def evaluate_model(cfg, ref: Reference, model_path: str, tokenizer_path: str, use_gpu: bool) -> dict[str, float]:
    ds = score(read_split(ref.parts, "eval", ref.drop_ids), model_path, tokenizer_path, "policy_", cfg, use_gpu)
    df = ds.select_columns(["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                            "chosen_loss_mask", "rejected_loss_mask"]).to_pandas()
    col = lambda k: torch.tensor(df[k].to_numpy(), dtype=torch.float64)
    lengths = lambda k: torch.tensor([int(sum(m)) for m in df[k]], dtype=torch.float64)
    t = cfg.train
    losses, cr, rr = dpo_loss(col("policy_chosen_logps"), col("policy_rejected_logps"), col("ref_chosen_logps"), col("ref_rejected_logps"),
                              beta=t.beta, loss_type=t.loss_type, label_smoothing=t.label_smoothing, simpo_gamma=t.simpo_gamma,
                              chosen_lengths=lengths("chosen_loss_mask"), rejected_lengths=lengths("rejected_loss_mask"))
    m = dpo_metrics(cr, rr, col("policy_chosen_logps"), col("policy_rejected_logps"), tie_tolerance=TIE_TOLERANCE)
    return {"loss": losses.mean().item(), **m, "pairs": float(len(df))}


def run(cfg, ref: Reference, model_dir: Path, reference_path: str, tokenizer_path: str, use_gpu: bool) -> dict[str, float]:
    """Returns eval/... metrics for the trained model and eval/reference/... for the reference itself."""
    if not any(has_split(p, "eval") for p in ref.parts):
        log.warning("evaluate: no eval split (set data.eval or data.eval_fraction > 0); skipped")
        return {}
    trained = evaluate_model(cfg, ref, str(model_dir), tokenizer_path, use_gpu)
    baseline = evaluate_model(cfg, ref, reference_path, tokenizer_path, use_gpu)
    log.info("evaluate: %d pairs | trained: accuracy %.3f margin %.3f | reference: accuracy %.3f margin %.4f",
             trained["pairs"], trained["rewards/accuracies"], trained["rewards/margins"], baseline["rewards/accuracies"], baseline["rewards/margins"])
    return {**{f"eval/{k}": v for k, v in trained.items()}, **{f"eval/reference/{k}": v for k, v in baseline.items()}}
