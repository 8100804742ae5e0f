"""Every loss type on the demo: held-out reward accuracy and margin after one epoch, from one cached reference pass.

    python benchmarks/losses.py [--types sigmoid,ipo,...] [--out benchmarks/losses.json] [--max-steps N]

The demo's own data, split, model and settings (configs/demo.yaml: lr 3e-3, beta 0.1, batch 16, warmup 5%, cosine,
grad clip 1.0, bf16 autocast where the CPU has it), prepared and scored by the pipeline once (`dpo-ray reference`:
every loss below reads that one cache). Each loss then trains one epoch in this process with dpo-ray's own step
(dpo_ray.train_loop.micro_loss, the same AdamW and schedule; one process, no Ray Train: a CPU-hour saved over 17 runs)
and its policy is scored on the eval split by the evaluation stage's scorer and metrics (pipeline.evaluate.batch_metrics).
Per-loss settings: label_smoothing 0.1 for robust / cDPO, 1e-3 for exo_pair; the rest at their defaults.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

EXTRA = {"robust": ["train.label_smoothing=0.1"], "exo_pair": ["train.label_smoothing=1e-3"], "cdpo": ["train.label_smoothing=0.1"]}


def read_split(ref, split: str) -> pa.Table:
    from pipeline.reference import split_files

    return pa.concat_tables([pq.read_table(path, filesystem=fs) for fs, path in split_files(ref.parts, split)])


def train_one(cfg, model_dir: str, table: pa.Table, max_steps: int | None, log) -> torch.nn.Module:
    from dpo_ray.forward import PolicyLogps, autocast, use_bf16
    from dpo_ray.model import load_model
    from dpo_ray.rows import as_lists
    from dpo_ray.train_loop import loss_extras, lr_at, micro_loss, scored_tokens

    t = cfg.train
    torch.manual_seed(cfg.seed)
    policy = PolicyLogps(load_model(model_dir)).train()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=t.lr, weight_decay=t.weight_decay, fused=True)
    spec, bs = t.loss, t.batch_size_per_worker
    precision = autocast(use_bf16(t.bf16, "cpu"), "cpu")
    order = torch.randperm(table.num_rows, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    total = min(table.num_rows // bs, max_steps or 10**9)
    t0 = time.time()
    for step in range(total):
        rows = as_lists(table, order[step * bs:(step + 1) * bs])
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, t)
        tpp = scored_tokens(rows["chosen_loss_mask"]) / bs
        loss, *_ = micro_loss(policy, policy.collate(rows, 0, extras=loss_extras(spec)), spec, bs, tpp, precision)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % 50 == 0 or step + 1 == total:
            left = (time.time() - t0) / (step + 1) * (total - step - 1)
            log(f"  step {step + 1}/{total} loss {loss.item():.4f} ETA {left:.0f} s")
    return policy.eval()


def evaluate(cfg, policy, model_dir: str, table: pa.Table) -> dict:
    import pandas as pd

    from dpo_ray.scoring import LogpsScorer
    from pipeline.evaluate import batch_metrics

    scorer = LogpsScorer(model_dir, model_dir, "policy_", wpo=cfg.train.use_weighting, **precision_of(cfg))
    scorer.model.model.load_state_dict(policy.model.state_dict())  # the trained weights, scored as evaluation scores them
    scored = scorer(table)
    df = pd.DataFrame({k: scored[k].to_pylist() for k in scored.column_names if "logps" in k or "mask" in k or "wpo" in k})
    m, _, _ = batch_metrics(cfg, df, use_gpu=False)
    return m


def precision_of(cfg) -> dict:
    from pipeline.reference import scoring_precision_of

    return scoring_precision_of(cfg, use_gpu=False)


def main(argv=None) -> int:
    from dpo_ray.config import load_config
    from dpo_ray.losses import LOSS_TYPES
    from pipeline.run import run
    from pipeline.runtime import setup_logging

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default=",".join(LOSS_TYPES + ("cdpo",)), help="comma-separated loss types (cdpo = sigmoid + label_smoothing 0.1)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "losses.json"))
    ap.add_argument("--max-steps", type=int, default=None, help="cap the epoch (a quick look; the table uses whole epochs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config overrides for every loss")
    args = ap.parse_args(argv)
    setup_logging()
    log = lambda s: print(s, flush=True)  # noqa: E731
    base = load_config(ROOT / "configs" / "demo.yaml", args.overrides)
    summary = run(base, stages=("prepare", "reference"))  # the one reference pass every loss reads
    from pipeline.reference import Reference
    from pipeline.storage import open_location

    parts = [open_location(p) for p in summary["reference_cache"]["parts"]]
    ref = Reference(parts, summary["reference_cache"]["key"], True, [])
    train, evals = read_split(ref, "train"), read_split(ref, "eval")
    model_dir = summary["reference_model_dir"]
    out = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    types = args.types.split(",")
    for i, kind in enumerate(types):
        sets = args.overrides + [f"train.loss_type={'sigmoid' if kind == 'cdpo' else kind}"] + EXTRA.get(kind, [])
        cfg = load_config(ROOT / "configs" / "demo.yaml", sets)
        log(f"[{i + 1}/{len(types)}] {kind}: training {train.num_rows} pairs, evaluating {evals.num_rows}")
        t0 = time.time()
        policy = train_one(cfg, model_dir, train, args.max_steps, log)
        m = evaluate(cfg, policy, model_dir, evals)
        out[kind] = {"accuracy": m["rewards/accuracies"], "margin": m["rewards/margins"], "eval_loss": m["loss"],
                     "seconds": round(time.time() - t0, 1), "steps": min(train.num_rows // cfg.train.batch_size_per_worker, args.max_steps or 10**9),
                     "settings": sets[len(args.overrides):]}
        log(f"  {kind}: accuracy {m['rewards/accuracies']:.3f} margin {m['rewards/margins']:.3f} ({out[kind]['seconds']} s)")
        Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print("| loss | held-out reward accuracy | margin |\n|---|---|---|")
    for kind, r in out.items():
        print(f"| `{kind}` | {r['accuracy']:.3f} | {r['margin']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
