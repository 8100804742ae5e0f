"""Stage 4, evaluate: held-out preference accuracy and reward margin of a model against the cached reference.

The same scorer as the reference stage computes the model's log-probs on the eval split. The reference's own check,
eval/reference/*: the reference stage scored every eval pair a second time, in the same forwards (its check_* columns,
same model load); read as the policy against the cached ref_* columns they must give 0.5 accuracy and 0 margin. No
model is loaded for it, and a sweep's trials read the same numbers.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from dpo_ray.losses import pair_inputs, pair_losses
from dpo_ray.metrics import dpo_metrics, pair_accuracies
from dpo_ray.model import load_tokenizer

from . import console, generate
from .runtime import SetupError
from .reference import CHECK_COLUMNS, Reference, has_split, read_split, score, scoring_bf16

log = logging.getLogger("dpo_ray")
TIE_TOLERANCE = 1e-4  # reward units: batching differences move CPU fp32 log-probs by ~1e-6 of their size
# In bf16 autocast (the scorers compute as training does) batch-shape rounding moves a sequence's log-prob by ~1e-5 of
# its size (measured: 8.6e-4 nats on 142, the reference re-scored against its own cache): a tie there scales with them.
BF16_TIE_RELATIVE = 1e-4
PREVIEW_CHARS = 300  # of each text in the eval_pairs table
_tokenizer = functools.lru_cache(maxsize=2)(load_tokenizer)  # once per evaluation, not once per batch
TABLE_ROWS = 2000  # pairs in the eval_pairs table: those the model gets most wrong
EVAL_BATCH = 1024  # scored pairs per batch read back


def evaluate_model(cfg, ref: Reference, model_path: str | None, tokenizer_path: str, use_gpu: bool, pairs: bool = False, per_pair: bool = False):
    """eval/... metrics of a model; with pairs or per_pair: (metrics, the per-pair table of the TABLE_ROWS pairs the model
    gets most wrong (see pair_table) or None, every pair's row_id, prefers_chosen and reward_margin sorted by row_id
    (what the registry's paired bootstrap compares) or None). Streamed: the scored split is read in batches, the metrics
    are sums over them. model_path None: the reference's own check, from the cached check_* columns (no model loaded)."""
    wpo = cfg.train.use_weighting
    ds = read_split(ref.parts, "eval", ref.drop_ids)
    if model_path is None:
        ds = ds.rename_columns({c: "policy_" + c[len("check_"):] for c in CHECK_COLUMNS})
    else:
        ds = score(ds, model_path, tokenizer_path, "policy_", cfg, use_gpu, wpo=wpo)
    logps = [f"{who}_{side}_{kind}" for who in ("policy", "ref") for side in ("chosen", "rejected") for kind in ("logps", "shared_logps")]
    keep = logps + ["chosen_loss_mask", "rejected_loss_mask"] + (["policy_chosen_wpo_logweight", "policy_rejected_wpo_logweight"] if wpo else [])
    keep += (["row_id"] if pairs or per_pair else []) + (["chosen_input_ids", "rejected_input_ids"] if pairs else [])
    sums, n, worst, every = {}, 0, None, []
    for batch in ds.select_columns(keep).iter_batches(batch_format="pandas", batch_size=EVAL_BATCH):
        m, margins, prefers = batch_metrics(cfg, batch, use_gpu)
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v * len(batch)
        n += len(batch)
        if pairs:  # the worst TABLE_ROWS pairs so far: bounded whatever the eval split's size
            part = pair_table(batch, margins, prefers, tokenizer_path, cfg.model.trust_remote_code)
            worst = (part if worst is None else pd.concat([worst, part])).sort_values("reward_margin", kind="stable").head(TABLE_ROWS)
        if per_pair:  # three numbers a pair
            every.append(pd.DataFrame({"row_id": batch.row_id.astype(str).to_numpy(), "prefers_chosen": prefers, "reward_margin": margins}))
    metrics = {**{k: v / max(n, 1) for k, v in sums.items()}, "pairs": float(n)}
    if not (pairs or per_pair):
        return metrics
    table = (worst.reset_index(drop=True) if worst is not None else pd.DataFrame()) if pairs else None
    values = (pd.concat(every).sort_values("row_id", kind="stable").reset_index(drop=True) if every else
              pd.DataFrame(columns=["row_id", "prefers_chosen", "reward_margin"])) if per_pair else None
    return metrics, table, values


def batch_metrics(cfg, df, use_gpu: bool):
    """(means over this batch's pairs, reward margins, prefers_chosen per pair) from its scored columns. The loss is
    train.loss_type's own (each term as loss/<type> when there are several); batch-coupled terms (aot's sort) see the
    pairs of this batch (EVAL_BATCH), as TRL's see an eval batch."""
    col = lambda k: torch.tensor(df[k].to_numpy(), dtype=torch.float64) if k in df else None  # noqa: E731
    lengths = lambda k: torch.tensor([int(sum(m[1:])) for m in df[k]], dtype=torch.float64)  # noqa: E731
    both = lambda name: tuple(col(name.format(side)) for side in ("chosen", "rejected"))  # noqa: E731
    t, spec = cfg.train, cfg.train.loss
    x = pair_inputs(spec, both("policy_{}_logps"), both("ref_{}_logps"), (lengths("chosen_loss_mask"), lengths("rejected_loss_mask")),
                    policy_shared=both("policy_{}_shared_logps"), ref_shared=both("ref_{}_shared_logps"),
                    wpo_logweights=both("policy_{}_wpo_logweight") if spec.use_weighting else (None, None))
    per_pair, terms, cr, rr_ = pair_losses(spec, x)  # the same loss as the train step's (dpo_ray.losses)
    tie = TIE_TOLERANCE + (BF16_TIE_RELATIVE * t.beta * (col("ref_chosen_logps").abs() + col("ref_rejected_logps").abs())
                           if scoring_bf16(cfg, use_gpu) else 0.0)
    m = dpo_metrics(cr, rr_, x["pc"], x["pr"], tie_tolerance=tie)
    margins = cr - rr_
    losses = {"loss": per_pair.mean().item(), **({f"loss/{k}": v.mean().item() for k, v in terms.items()} if len(terms) > 1 else {})}
    return {**losses, **m}, margins.numpy(), pair_accuracies(margins, tie).numpy()  # what rewards/accuracies averages


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


@dataclass
class Evaluation:
    """What the evaluate stage made: eval/... metrics (the model's, eval/reference/... the reference's, the generations'
    and the judge's), the per-pair table and the generations table as MLflow shows them (None when not made); for
    the registry's gate, every held-out pair's values (evaluate_model's per_pair) and the whole replies (with
    prompt_json)."""

    metrics: dict
    pairs: pd.DataFrame | None = None
    generations: pd.DataFrame | None = None
    per_pair: pd.DataFrame | None = None
    replies: pd.DataFrame | None = None

    def summary(self) -> dict:
        """The summary's `eval` and `eval_reference` entries."""
        ev = self.metrics
        return {"eval": {k[len("eval/"):]: v for k, v in ev.items() if not k.startswith("eval/reference/")},
                "eval_reference": {k[len("eval/reference/"):]: v for k, v in ev.items() if k.startswith("eval/reference/")}}


def evaluate_policy(cfg, ctx, ref: Reference, model_dir: Path, baseline: dict | None = None) -> Evaluation:
    """Stage 4: the model at `model_dir` on the held-out pairs against the cached reference (`pairs_metrics`); then,
    with eval.generate, its replies to held-out prompts beside the reference's, judged (pipeline/generate.py)."""
    if not model_dir.exists():
        raise SetupError(f"evaluate: no trained model at {model_dir}; run `dpo-ray train` first")
    ev, pairs, per_pair = pairs_metrics(cfg, ref, model_dir, ctx.tokenizer_path, ctx.use_gpu, baseline)
    replies = None
    if ev:  # the replies of the model and the reference to held-out prompts, and the judge's win rate (eval.generate)
        gen, replies = generate.generate_and_judge(cfg, ctx, ref, model_dir)
        ev = {**ev, **gen}
    return Evaluation(ev, pairs, generate.preview(replies), per_pair, replies)


@console.stage("evaluate", lambda r: f"reward accuracy {r[0]['eval/rewards/accuracies']:.3f} (reference {r[0]['eval/reference/rewards/accuracies']:.3f})")
def pairs_metrics(cfg, ref: Reference, model_dir: Path, tokenizer_path: str, use_gpu: bool, baseline: dict | None = None):
    """Returns (eval/... metrics for the trained model and eval/reference/... for the reference itself, the per-pair
    table of the trained model, every pair's values); ({}, None, None) without an eval split. `baseline`: the
    reference's metrics when already read (a sweep reads them once for all its trials)."""
    if not any(has_split(p, "eval") for p in ref.parts):
        log.warning("evaluate: no eval split (set data.eval or data.eval_fraction > 0); skipped")
        return {}, None, None
    trained, table, per_pair = evaluate_model(cfg, ref, str(model_dir), tokenizer_path, use_gpu, pairs=True, per_pair=True)
    baseline = baseline or evaluate_model(cfg, ref, None, tokenizer_path, use_gpu)
    log.info("evaluate: %d pairs | trained: accuracy %.3f margin %.3f | reference: accuracy %.3f margin %.4f",
             trained["pairs"], trained["rewards/accuracies"], trained["rewards/margins"], baseline["rewards/accuracies"], baseline["rewards/margins"])
    return {**{f"eval/{k}": v for k, v in trained.items()}, **{f"eval/reference/{k}": v for k, v in baseline.items()}}, table, per_pair
