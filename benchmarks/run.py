"""dpo-ray against the seed loop and TRL's DPOTrainer, side by side, in one command.

    .venv/bin/python benchmarks/run.py                 # CPU: the demo's tiny Llama, demo + skewed data
    .venv/bin/python benchmarks/run.py --repeats 3     # each training row 3 times, interleaved; the median is kept

Every row trains the same model on the same data with the same batch, sequence lengths, optimizer (AdamW,
constant lr, grad clip 1.0), precision (fp32 on CPU) and threads. Rows run one after another, each in a
fresh child process of this one (so that peak RSS is the row's own and no row warms another's caches).
tokens/s counts real tokens only (chosen + rejected sequences, no padding) over the measured steps
(after the warm-up steps). The table, with machine, date, versions and command, is appended to
benchmarks/RESULTS.md (--no-write to skip).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import datasets, model_dir, write_skewed  # noqa: E402

TRAIN_ROWS = {  # key -> (script, extra spec)
    "dpo-ray": ("dpo_ray_rows.py train", {}),
    "seed": ("seed_loop.py", {}),
    "trl": ("trl_row.py", {"precompute_ref": False}),
    "trl-pre": ("trl_row.py", {"precompute_ref": True}),
}


def child(script: str, spec: dict) -> dict:
    cmd = [sys.executable, str(HERE / script.split()[0]), *script.split()[1:], json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.get("threads", 2)), "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode != 0 or not lines:
        raise SystemExit(f"benchmark row {script} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def median_row(results: list[dict]) -> dict:
    best = sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]
    return {**best, "runs": [round(r["tokens_per_s"]) for r in results]}


def train_table(name: str, rows: dict[str, dict]) -> list[str]:
    base = rows["dpo-ray"]
    out = [f"Training, {name} data: real (non-padding) tokens/s over the measured steps",
           "", "| row | tokens/s | dpo-ray speed-up | peak RSS MB | RSS vs dpo-ray | padding | pairs/s | runs (tokens/s) |",
           "|---|---:|---:|---:|---:|---:|---:|---|"]
    for key, r in rows.items():
        speed = base["tokens_per_s"] / r["tokens_per_s"]
        out.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {speed:.2f}x | {r['peak_rss_mb']:,.0f} | "
                   f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {100 * r['padding_fraction']:.1f}% | {r['pairs_per_s']:.1f} | "
                   f"{', '.join(map(str, r.get('runs', [])))} |")
    return out


def reference_table(rows: dict[str, dict]) -> list[str]:
    out = ["Reference log-probs (forward only, the starting policy over the training pairs)", "",
           "| row | data | rows/s | tokens/s | dpo-ray speed-up |", "|---|---|---:|---:|---:|"]
    for data, r in rows.items():
        ours, trl = r["dpo-ray"], r["trl-pre"]
        out.append(f"| dpo-ray reference stage (Ray Data actor, packed, inference_mode) | {data} | {ours['ref_rows_per_s']:,.0f} | "
                   f"{ours['ref_tokens_per_s']:,.0f} | 1.00x |")
        trl_tps = trl["ref_tokens"] / trl["ref_seconds"]
        out.append(f"| TRL precompute_ref_log_probs pass | {data} | {trl.get('ref_pairs', 0) / trl['ref_seconds']:,.0f} | {trl_tps:,.0f} | "
                   f"{ours['ref_tokens_per_s'] / trl_tps:.2f}x |")
    return out


def prep_table(rows: list[dict]) -> list[str]:
    base = rows[0]
    out = ["Data preparation (read, validate, chat template, masks, write Parquet); the Ray rows include starting "
           "their worker processes (imports, tokenizer load)", "",
           "| row | rows | seconds | rows/s | vs plain loop |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {r['rows_per_s'] / base['rows_per_s']:.2f}x |")
    return out


def targets(results: dict) -> list[str]:
    checks = []
    for name in ("skewed", "demo"):
        if name not in results:
            continue
        r = results[name]
        ours = r["dpo-ray"]["tokens_per_s"]
        checks += [(f"dpo-ray >= 1.5x TRL with precompute_ref_log_probs ({name})", ours / r["trl-pre"]["tokens_per_s"], 1.5),
                   (f"dpo-ray >= 1.4x the seed loop ({name})", ours / r["seed"]["tokens_per_s"], 1.4)]
    out = ["Targets (CPU, tiny model, ratios from this run)", ""]
    for text, got, want in checks:
        out.append(f"- {text}: {got:.2f}x — {'met' if got >= want else 'NOT met'}")
    pad = results["skewed"]["dpo-ray"]["padding_fraction"]
    out.append(f"- padding <= 5% of processed tokens (skewed): {100 * pad:.1f}% — {'met' if pad <= 0.05 else 'NOT met'}")
    return out


def machine() -> str:
    import torch
    import transformers

    cpu = next((x.split(":", 1)[1].strip() for x in open("/proc/cpuinfo") if x.startswith("model name")), platform.processor())
    mem = next((int(x.split()[1]) / 2**20 for x in open("/proc/meminfo") if x.startswith("MemTotal")), 0)
    try:
        import trl
        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    import ray
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, no GPU | Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, trl {trl_v}, ray {ray.__version__}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="measured optimizer steps per training row")
    ap.add_argument("--warmup-steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--max-prompt-length", type=int, default=256)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=1, help="runs of each training row (interleaved); the median is reported")
    ap.add_argument("--data", default="demo,skewed")
    ap.add_argument("--prep-rows", type=int, default=12000, help="lines of skewed data for the data-prep rows")
    ap.add_argument("--rows", default="dpo-ray,seed,trl,trl-pre")
    ap.add_argument("--work", default=str(HERE / ".work"), help="model, data and caches")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    work = Path(args.work)
    model = model_dir(work)
    data = datasets(work)
    spec = {"model_dir": str(model), "tokenizer_dir": str(model), "batch_size": args.batch_size, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "threads": args.threads, "lr": 1e-4, "beta": 0.1, "seed": 0}
    keys = args.rows.split(",")
    results: dict = {}
    for name in args.data.split(","):
        runs: dict = {k: [] for k in keys}
        for i in range(args.repeats):
            for k in keys:
                script, extra = TRAIN_ROWS[k]
                r = child(script, {**spec, **extra, "data": str(data[name])})
                print(f"[{name} {i + 1}/{args.repeats}] {r['name']}: {r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_mb']:,.0f} MB, "
                      f"padding {100 * r['padding_fraction']:.1f}%", flush=True)
                runs[k].append(r)
        results[name] = {k: median_row(v) for k, v in runs.items()}

    prep_data = write_skewed(work / "data" / f"skewed-{args.prep_rows}.jsonl", n=args.prep_rows, seed=8)
    prep = [child("dpo_ray_rows.py prep", {**spec, "data": str(prep_data), "cpus": c}) for c in (0, 1, 2)]
    lines = []
    for name in results:
        lines += train_table(name, results[name]) + [""]
    if "trl-pre" in keys and "dpo-ray" in keys:
        lines += reference_table(results) + [""]
    lines += prep_table(prep) + [""]
    if {"dpo-ray", "seed", "trl-pre"} <= set(keys) and "skewed" in results:
        lines += targets(results) + [""]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        cmd = "benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n- machine: {machine()}\n- command: "
                  f"`.venv/bin/python {cmd.strip()}`\n- settings: batch {args.batch_size} pairs, max_length {args.max_length}, "
                  f"max_prompt_length {args.max_prompt_length}, {args.warmup_steps} warm-up + {args.steps} measured steps, "
                  f"{args.threads} threads, fp32, fused AdamW lr 1e-4, beta 0.1, {args.repeats} run(s) per row (median)\n\n")
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(header + table + "\n")
        with open(work / f"results-{datetime.datetime.now():%Y%m%d-%H%M%S}.json", "w") as f:
            json.dump({"results": results, "prep": prep}, f, indent=1)


if __name__ == "__main__":
    main()
