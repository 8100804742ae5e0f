"""Stage 4, evaluate: held-out preference accuracy and reward margin of a model against the cached reference.

The same scorer as the reference stage computes the model's log-probs on the eval split; the
reference model scored the same way must read 0.5 accuracy and 0 margin (a sanity check of the cache).
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import pandas as pd
import torch

from dpo_ray.losses import dpo_loss
from dpo_ray.metrics import dpo_metrics, pair_accuracies
from dpo_ray.model import load_tokenizer

from .reference import Reference, has_split, read_split, score, scoring_bf16

log = logging.getLogger("dpo_ray")
TIE_TOLERANCE = 1e-4  # reward units: batching differences move CPU fp32 log-probs by ~1e-6 of their size
# In bf16 autocast (the scorers compute as training does) batch-shape rounding moves a sequence's log-prob by ~1e-5 of
# its size (measured: 8.6e-4 nats on 142, the reference re-scored against its own cache): a tie there scales with them.
BF16_TIE_RELATIVE = 1e-4
PREVIEW_CHARS = 300  # of each text in the eval_pairs table
_tokenizer = functools.lru_cache(maxsize=2)(load_tokenizer)  # once per evaluation, not once per batch
TABLE_ROWS = 2000  # pairs in the eval_pairs table: those the model gets most wrong
EVAL_BATCH = 1024  # scored pairs per batch read back


def evaluate_model(cfg, ref: Reference, model_path: str, tokenizer_path: str, use_gpu: bool, pairs: bool = False):
    """eval/... metrics of a model; with pairs=True also (metrics, the per-pair table of the TABLE_ROWS pairs the model
    gets most wrong, see pair_table). Streamed: the scored split is read in batches, the metrics are sums over them."""
    ds = score(read_split(ref.parts, "eval", ref.drop_ids), model_path, tokenizer_path, "policy_", cfg, use_gpu)
    keep = ["policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps", "chosen_loss_mask", "rejected_loss_mask"]
    sums, n, worst = {}, 0, None
    for batch in ds.select_columns(keep + (["row_id", "chosen_input_ids", "rejected_input_ids"] if pairs else [])).iter_batches(
            batch_format="pandas", batch_size=EVAL_BATCH):
        m, margins, prefers = batch_metrics(cfg, batch, use_gpu)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(batch)
        n += len(batch)
        if pairs:  # the worst TABLE_ROWS pairs so far: bounded whatever the eval split's size
            part = pair_table(batch, margins, prefers, tokenizer_path, cfg.model.trust_remote_code)
            worst = (part if worst is None else pd.concat([worst, part])).sort_values("reward_margin", kind="stable").head(TABLE_ROWS)
    metrics = {**{k: v / max(n, 1) for k, v in sums.items()}, "pairs": float(n)}
    if not pairs:
        return metrics
    return metrics, worst.reset_index(drop=True) if worst is not None else pd.DataFrame()


def batch_metrics(cfg, df, use_gpu: bool):
    """(means over this batch's pairs, reward margins, prefers_chosen per pair) from its scored columns."""
    col = lambda k: torch.tensor(df[k].to_numpy(), dtype=torch.float64)
    lengths = lambda k: torch.tensor([int(sum(m)) for m in df[k]], dtype=torch.float64)
    t = cfg.train
    losses, cr, rr = dpo_loss(col("policy_chosen_logps"), col("policy_rejected_logps"), col("ref_chosen_logps"), col("ref_rejected_logps"),
                              beta=t.beta, loss_type=t.loss_type, label_smoothing=t.label_smoothing, simpo_gamma=t.simpo_gamma,
                              chosen_lengths=lengths("chosen_loss_mask"), rejected_lengths=lengths("rejected_loss_mask"))
    tie = TIE_TOLERANCE + (BF16_TIE_RELATIVE * t.beta * (col("ref_chosen_logps").abs() + col("ref_rejected_logps").abs())
                           if scoring_bf16(cfg, use_gpu) else 0.0)
    m = dpo_metrics(cr, rr, col("policy_chosen_logps"), col("policy_rejected_logps"), tie_tolerance=tie)
    margins = cr - rr
    return {"loss": losses.mean().item(), **m}, margins.numpy(), pair_accuracies(margins, tie).numpy()  # what rewards/accuracies averages


def pair_table(df, reward_margins, prefers_chosen, tokenizer_path: str, trust_remote_code: bool, chars: int = PREVIEW_CHARS):
    """One row per held-out pair, for MLflow's table view (eval_pairs.json): row_id, the prompt's end and both replies
    (decoded from the tokens the models saw, cut to `chars`), the reference's and the policy's log-prob margin
    (chosen - rejected), the reward margin (what rewards/margins averages) and whether the policy now prefers the
    chosen reply: 1, 0, or 0.5 for a tie (their mean is rewards/accuracies)."""
    tok = _tokenizer(tokenizer_path, trust_remote_code)
    cut = lambda text: text if len(text) <= chars else text[:chars] + "…"
    decode = lambda ids, mask, want: tok.decode([i for i, m in zip(ids, mask) if m == want], skip_special_tokens=True).strip().strip("\ufffd")
    prompt = [decode(ids, mask, 0) for ids, mask in zip(df.chosen_input_ids, df.chosen_loss_mask)]
    return pd.DataFrame({
        "row_id": df.row_id,
        "prompt": [p if len(p) <= chars else "…" + p[-chars:] for p in prompt],  # its end: the turn the reply answers
        "chosen": [cut(decode(i, m, 1)) for i, m in zip(df.chosen_input_ids, df.chosen_loss_mask)],
        "rejected": [cut(decode(i, m, 1)) for i, m in zip(df.rejected_input_ids, df.rejected_loss_mask)],
        "reference_logp_margin": df.ref_chosen_logps - df.ref_rejected_logps,
        "policy_logp_margin": df.policy_chosen_logps - df.policy_rejected_logps,
        "reward_margin": reward_margins,
        "prefers_chosen": prefers_chosen,
    }).sort_values("reward_margin", kind="stable").reset_index(drop=True)  # the pairs the model gets most wrong first


def run(cfg, ref: Reference, model_dir: Path, reference_path: str, tokenizer_path: str, use_gpu: bool, baseline: dict | None = None):
    """Returns (eval/... metrics for the trained model and eval/reference/... for the reference itself, the per-pair
    table of the trained model); ({}, None) without an eval split. `baseline`: the reference's metrics when already
    known (a sweep scores them once for all its trials)."""
    if not any(has_split(p, "eval") for p in ref.parts):
        log.warning("evaluate: no eval split (set data.eval or data.eval_fraction > 0); skipped")
        return {}, None
    trained, table = evaluate_model(cfg, ref, str(model_dir), tokenizer_path, use_gpu, pairs=True)
    baseline = baseline or evaluate_model(cfg, ref, reference_path, tokenizer_path, use_gpu)
    log.info("evaluate: %d pairs | trained: accuracy %.3f margin %.3f | reference: accuracy %.3f margin %.4f",
             trained["pairs"], trained["rewards/accuracies"], trained["rewards/margins"], baseline["rewards/accuracies"], baseline["rewards/margins"])
    return {**{f"eval/{k}": v for k, v in trained.items()}, **{f"eval/reference/{k}": v for k, v in baseline.items()}}, table
