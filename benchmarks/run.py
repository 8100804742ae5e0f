"""dpo-ray against the seed loop and TRL's DPOTrainer, side by side, in one command.

    .venv/bin/python benchmarks/run.py                 # CPU: the demo's tiny Llama, demo + skewed data
    .venv/bin/python benchmarks/run.py --repeats 3     # each training row 3 times, interleaved; the median is kept
    .venv/bin/python benchmarks/run.py --device cuda   # GPU: Qwen2.5-0.5B's shape (random weights), bf16 autocast

Every row trains the same model on the same data with the same batch, sequence lengths, optimizer (AdamW,
constant lr, grad clip 1.0), precision (fp32 on CPU, bf16 autocast on CUDA) and threads. Rows run one after another, each in a
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

from benchmarks.common import (MODELS, datasets, flops_model, forward_flops_per_token, model_dir,  # noqa: E402
                               train_flops_per_token, write_skewed)

TRAIN_ROWS = {  # key -> (script, extra spec)
    "dpo-ray": ("dpo_ray_rows.py train", {}),
    "dpo-ray-flex": ("dpo_ray_rows.py train", {"attention": "flex"}),  # FlexAttention for the packed pairs
    "dpo-ray-varlen": ("dpo_ray_rows.py train", {"attention": "varlen"}),  # flash varlen_attn, the prompt's K/V copied per reply
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


def mfu(r: dict, fm: dict, peak: float, forward: bool = False) -> float:
    """mfu_effective of a row (dpo_ray/flops.py has the honest mfu): its real tokens/s times the FLOPs a token costs at the row's mean sequence
    length (6N + attention for training, 2N + attention for the reference forward), over the measured matmul peak.
    Every row is credited the same FLOPs for the same tokens, whatever it skips (padding, a repeated prompt)."""
    if forward:
        tokens, seqs, tps = r["ref_tokens"], 2 * r.get("ref_rows", r.get("ref_pairs", 0)), r["ref_tokens"] / r["ref_seconds"]
        return tps * forward_flops_per_token(fm, tokens / max(seqs, 1)) / peak
    return r["tokens_per_s"] * train_flops_per_token(fm, r["tokens"] / max(2 * r["pairs"], 1)) / peak


def train_table(name: str, rows: dict[str, dict], fm: dict, peak: float) -> list[str]:
    base = rows["dpo-ray"]
    gpu = base.get("peak_gpu_mb") is not None
    out = [f"Training, {name} data: real (non-padding) tokens/s over the measured steps", "",
           "| row | tokens/s | dpo-ray speed-up | mfu_effective | " + ("peak GPU MB | GPU memory vs dpo-ray | " if gpu else "")
           + "peak RSS MB | RSS vs dpo-ray | padding | pairs/s | runs (tokens/s) |",
           "|---|---:|---:|---:|" + ("---:|---:|" if gpu else "") + "---:|---:|---:|---:|---|"]
    for key, r in rows.items():
        speed = base["tokens_per_s"] / r["tokens_per_s"]
        mem = f"{r['peak_gpu_mb']:,.0f} | {r['peak_gpu_mb'] / base['peak_gpu_mb']:.2f} | " if gpu else ""
        out.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {speed:.2f}x | {100 * mfu(r, fm, peak):.1f}% | {mem}{r['peak_rss_mb']:,.0f} | "
                   f"{r['peak_rss_mb'] / base['peak_rss_mb']:.2f} | {100 * r['padding_fraction']:.1f}% | {r['pairs_per_s']:.1f} | "
                   f"{', '.join(map(str, r.get('runs', [])))} |")
    return out


def reference_table(rows: dict[str, dict], fm: dict, peak: float) -> list[str]:
    out = ["Reference log-probs (forward only, the starting policy over the training pairs)", "",
           "| row | data | rows/s | tokens/s | dpo-ray speed-up | mfu_effective |", "|---|---|---:|---:|---:|---:|"]
    for data, r in rows.items():
        ours, trl = r["dpo-ray"], r["trl-pre"]
        out.append(f"| dpo-ray reference stage (Ray Data actor, packed, inference_mode) | {data} | {ours['ref_rows_per_s']:,.0f} | "
                   f"{ours['ref_tokens_per_s']:,.0f} | 1.00x | {100 * mfu(ours, fm, peak, forward=True):.1f}% |")
        trl_tps = trl["ref_tokens"] / trl["ref_seconds"]
        out.append(f"| TRL precompute_ref_log_probs pass | {data} | {trl.get('ref_pairs', 0) / trl['ref_seconds']:,.0f} | {trl_tps:,.0f} | "
                   f"{ours['ref_tokens_per_s'] / trl_tps:.2f}x | {100 * mfu(trl, fm, peak, forward=True):.1f}% |")
    return out


def prep_table(rows: list[dict]) -> list[str]:
    base = rows[0]
    out = ["Data preparation (read, validate, chat template, masks, write Parquet); the Ray rows include starting "
           "their worker processes (imports, tokenizer load)", "",
           "| row | rows | seconds | rows/s | vs plain loop |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['name']} | {r['rows']:,} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} | {r['rows_per_s'] / base['rows_per_s']:.2f}x |")
    return out


def targets(results: dict, fm: dict, peak: float, device: str, model: str) -> list[str]:
    """The benchmark issue's targets: speed ratios and padding (CPU), MFU and GPU memory (CUDA)."""
    checks = []  # (text, got, want, higher is better, unit)
    for name in ("skewed", "demo"):
        if name not in results:
            continue
        r = results[name]
        ours = r["dpo-ray"]
        if device == "cpu":
            checks += [(f"dpo-ray >= 1.5x TRL with precompute_ref_log_probs ({name})", ours["tokens_per_s"] / r["trl-pre"]["tokens_per_s"], 1.5, True, "x"),
                       (f"dpo-ray >= 1.4x the seed loop ({name})", ours["tokens_per_s"] / r["seed"]["tokens_per_s"], 1.4, True, "x")]
        else:
            checks += [(f"policy step mfu_effective >= 45% ({name})", 100 * mfu(ours, fm, peak), 45, True, "%"),
                       (f"reference stage mfu_effective >= 55% ({name})", 100 * mfu(ours, fm, peak, forward=True), 55, True, "%"),
                       (f"peak GPU memory <= 0.6x TRL with precompute_ref_log_probs ({name})",
                        ours["peak_gpu_mb"] / r["trl-pre"]["peak_gpu_mb"], 0.6, False, "x")]
    out = [f"Targets ({device}, {model} model, ratios from this run)", ""]
    if not checks and "skewed" not in results:
        out.append("- none: the targets are read on the demo and skewed data sets")
    for text, got, want, higher, unit in checks:
        met = got >= want if higher else got <= want
        out.append(f"- {text}: {got:.2f}{unit} — {'met' if met else 'NOT met'}")
    if "skewed" in results:
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
    gpu = f"GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB, {gpu} | Python {platform.python_version()}, torch {torch.__version__}, "
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
    ap.add_argument("--data", default="demo,skewed", help="data sets: demo, skewed, long (near 1024 tokens), or paths of JSONL files (chat format)")
    ap.add_argument("--prep-rows", type=int, default=12000, help="lines of skewed data for the data-prep rows")
    ap.add_argument("--rows", default="dpo-ray,seed,trl,trl-pre")
    ap.add_argument("--work", default=str(HERE / ".work"), help="model, data and caches")
    ap.add_argument("--no-write", action="store_true", help="do not append to benchmarks/RESULTS.md")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="auto: cuda when torch sees a GPU. On cuda every row computes in bf16 autocast over fp32 weights")
    ap.add_argument("--model", choices=MODELS, default=None,
                    help="tiny (the demo's Llama; the default on cpu) or qwen-0.5b (Qwen2.5-0.5B's shape, random weights; "
                         "the default on cuda)")
    args = ap.parse_args(argv)

    import torch

    device = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    model_name = args.model or ("qwen-0.5b" if device == "cuda" else "tiny")
    work = Path(args.work)
    model = model_dir(work, model_name)
    data = datasets(work)
    spec = {"model_dir": str(model), "tokenizer_dir": str(model), "batch_size": args.batch_size, "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length, "steps": args.steps, "warmup_steps": args.warmup_steps,
            "threads": args.threads, "lr": 1e-4, "beta": 0.1, "seed": 0, "device": device, "bf16": device == "cuda"}
    fm = flops_model(model)
    peak = child("peak.py", spec)
    print(f"model {model_name}: {fm['params'] / 1e6:,.1f}M parameters, N = {fm['N'] / 1e6:,.1f}M in the FLOP count | "
          f"peak {peak['flops_per_s'] / 1e12:,.2f} TFLOP/s ({peak['name']})", flush=True)
    keys = args.rows.split(",")
    results: dict = {}
    for name in args.data.split(","):
        runs: dict = {k: [] for k in keys}
        for i in range(args.repeats):
            for k in keys:
                script, extra = TRAIN_ROWS[k]
                r = child(script, {**spec, **extra, "data": str(data.get(name) or Path(name).resolve())})
                gpu = f", peak GPU {r['peak_gpu_mb']:,.0f} MB" if r.get("peak_gpu_mb") is not None else ""
                print(f"[{name} {i + 1}/{args.repeats}] {r['name']}: {r['tokens_per_s']:,.0f} tokens/s, peak RSS {r['peak_rss_mb']:,.0f} MB{gpu}, "
                      f"padding {100 * r['padding_fraction']:.1f}%", flush=True)
                runs[k].append(r)
        results[name] = {k: median_row(v) for k, v in runs.items()}

    prep_data = write_skewed(work / "data" / f"skewed-{args.prep_rows}.jsonl", n=args.prep_rows, seed=8)
    prep = [child("dpo_ray_rows.py prep", {**spec, "data": str(prep_data), "cpus": c}) for c in (0, 1, 2)]
    lines = []
    for name in results:
        lines += train_table(name, results[name], fm, peak["flops_per_s"]) + [""]
    if "trl-pre" in keys and "dpo-ray" in keys:
        lines += reference_table(results, fm, peak["flops_per_s"]) + [""]
    lines += prep_table(prep) + [""]
    if {"dpo-ray", "seed", "trl-pre"} <= set(keys):
        lines += targets(results, fm, peak["flops_per_s"], device, model_name) + [""]
    table = "\n".join(lines)
    print("\n" + table)
    if not args.no_write:
        cmd = "benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"\n## {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC\n\n- machine: {machine()}\n- command: "
                  f"`.venv/bin/python {cmd.strip()}`\n- settings: batch {args.batch_size} pairs, max_length {args.max_length}, "
                  f"max_prompt_length {args.max_prompt_length}, {args.warmup_steps} warm-up + {args.steps} measured steps, "
                  f"{args.threads} threads, {'bf16 autocast (fp32 weights)' if spec['bf16'] else 'fp32'}, fused AdamW lr 1e-4, "
                  f"beta 0.1, {args.repeats} run(s) per row (median)\n- model: {model_name}, {fm['params'] / 1e6:,.1f}M parameters; "
                  f"mfu_effective = real tokens/s x (6N + 12 x layers x hidden x mean sequence length) / {peak['flops_per_s'] / 1e12:,.2f} "
                  f"TFLOP/s, the peak measured here ({peak['name']}); N = {fm['N'] / 1e6:,.1f}M (all but the input embedding)\n\n")
        with open(HERE / "RESULTS.md", "a", encoding="utf-8") as f:
            f.write(header + table + "\n")
        with open(work / f"results-{datetime.datetime.now():%Y%m%d-%H%M%S}.json", "w") as f:
            json.dump({"results": results, "prep": prep, "peak": peak, "flops_model": fm, "device": device, "model": model_name}, f, indent=1)


if __name__ == "__main__":
    main()
