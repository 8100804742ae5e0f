"""The parts of benchmarks/gpu_check.sh that are Python: each writes its result to <work>/results/<part>.json.

    python benchmarks/gpu_check.py e2e|parity|bench|maxlen|table --device cuda|cpu --work DIR [--log DIR]

e2e:    `dpo-ray run` (python -m pipeline.cli) on a Qwen2-shaped model: Ray Data prepare, the reference stage on a
        GPU actor, TorchTrainer(use_gpu), evaluation, MLflow on sqlite; must write summary.json.
parity: step 1 of the policy against the reference stage's scorer (benchmarks/parity.py), both attentions.
bench:  the CUDA rows of benchmarks/run.py: dpo-ray (sdpa and flex attention), TRL with and without
        precompute_ref_log_probs, on the same model, data, batch and lengths; the matmul peak first (MFU).
maxlen: the longest max_length whose training step fits at batch 1, doubling from 1024, for dpo-ray (both
        attentions) and TRL + precompute; each row in its own process (an OOM leaves the next row a clean GPU).
table:  merges every part's JSON into <log>/results.json and prints the final table (also <log>/table.txt).
Sizes: cuda uses Qwen2.5-0.5B's shape (GPU_CHECK_MODEL=qwen-1.5b for the MFU target's size); cpu, the dry run, the
demo's tiny Llama and a few steps, through the same code.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import flops_model, model_dir, write_long  # noqa: E402

PARTS = ("wheels", "tests", "e2e", "parity", "bench", "maxlen")


def sizes(device: str) -> dict:
    if device == "cuda":
        return {"model": os.environ.get("GPU_CHECK_MODEL", "qwen-0.5b"), "batch": 8, "max_length": 1024, "max_prompt_length": 512,
                "warmup": 3, "steps": 10, "threads": 8, "ref_batch": 64, "bench_pairs": 300, "e2e_steps": 6, "parity_pairs": 32, "lengths": [4096 * 2**i for i in range(6)]}
    # CPU: FlexAttention runs its eager, dense implementation there (an N x N score matrix per head): small batches
    return {"model": "tiny", "batch": 2, "max_length": 256, "max_prompt_length": 128, "warmup": 1, "steps": 2, "threads": 2, "ref_batch": 2, "bench_pairs": 40,
            "e2e_steps": 2, "parity_pairs": 12, "lengths": [64, 128]}


def save(work: Path, part: str, result: dict) -> None:
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{part}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def _subset(work: Path, n: int) -> Path:
    """The first n pairs of the long data set (sequences near 1024 tokens)."""
    data = work / "data" / f"long-{n}.jsonl"
    data.write_text("".join(write_long(work / "data" / "long.jsonl").read_text().splitlines(keepends=True)[:n]))
    return data


def e2e(args, s: dict) -> dict:
    model = model_dir(args.work, s["model"])
    data = _subset(args.work, 160)
    out = args.work / "e2e"
    sets = {"output_dir": out / "out", "cache_dir": out / "cache", "model.policy": model, "data.train": f"[{data}]",
            "data.max_length": s["max_length"], "data.max_prompt_length": s["max_prompt_length"], "data.eval_fraction": 0.1,
            "train.batch_size_per_worker": s["batch"], "train.max_steps": s["e2e_steps"], "train.log_every": 1,
            "train.checkpoint_every": s["e2e_steps"], "train.lr": 1e-5, "reference.batch_size": 16,
            "train.use_gpu": str(args.device == "cuda").lower(), "mlflow.tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(HERE.parent / "configs" / "demo.yaml")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=args.work)
    summary = out / "out" / "summary.json"
    r = {"ok": proc.returncode == 0 and summary.exists(), "returncode": proc.returncode, "seconds": round(time.time() - t0, 1)}
    if summary.exists():
        sm = json.loads(summary.read_text())
        r.update(train=sm.get("train"), eval=sm.get("eval"), eval_reference=sm.get("eval_reference"), rows=sm["data"]["rows_used"])
        first = sm.get("train", {}).get("loss_first")
        r["loss_first_minus_ln2"] = None if first is None else first - math.log(2)
    return r


def parity(args, s: dict) -> dict:
    from benchmarks import parity as p

    model = model_dir(args.work, s["model"])
    spec = {"model_dir": str(model), "tokenizer_dir": str(model), "data": str(_subset(args.work, s["parity_pairs"])), "pairs": s["parity_pairs"],
            "max_length": s["max_length"], "max_prompt_length": s["max_prompt_length"], "device": args.device, "bf16": True}
    out = {}
    for attention in ("sdpa", "flex"):
        out[attention] = p.run({**spec, "attention": attention})
        save(args.work, "parity", out)  # what is done survives a timeout in the next one
    return out


def bench(args, s: dict) -> dict:
    from benchmarks.run import TRAIN_ROWS, child, mfu

    model = model_dir(args.work, s["model"])
    spec = {"model_dir": str(model), "tokenizer_dir": str(model), "batch_size": s["batch"], "max_length": s["max_length"],
            "max_prompt_length": s["max_prompt_length"], "steps": s["steps"], "warmup_steps": s["warmup"], "threads": s["threads"],
            "lr": 1e-4, "beta": 0.1, "seed": 0, "device": args.device, "bf16": args.device == "cuda",
            "data": str(_subset(args.work, s["bench_pairs"])), "reference_batch_size": s["ref_batch"]}
    fm = flops_model(model)
    out = {"model": s["model"], "params": fm["params"], "spec": spec, "peak": child("peak.py", spec), "rows": {}}
    for key in ("dpo-ray", "trl-pre", "dpo-ray-flex", "trl"):  # most wanted first: the part has a time limit
        script, extra = TRAIN_ROWS[key]
        try:
            r = child(script, {**spec, **extra})
            r["mfu"] = mfu(r, fm, out["peak"]["flops_per_s"])
            if "ref_seconds" in r:
                r["ref_mfu"] = mfu(r, fm, out["peak"]["flops_per_s"], forward=True)
        except SystemExit as e:  # a failed row is reported, the others still run
            r = {"error": str(e)[-1500:]}
        out["rows"][key] = r
        save(args.work, "bench", out)
    return out


def maxlen(args, s: dict) -> dict:
    model = model_dir(args.work, s["model"])
    out = {"model": s["model"], "lengths": s["lengths"], "rows": {}}
    cuda = args.device == "cuda"
    for row, limit in (("dpo-ray-flex", 35), ("trl-pre", 25), ("dpo-ray-sdpa", 10)):  # seconds per row on CUDA (flex compiles first)
        limit = limit if cuda else 300
        spec = {"row": row, "model_dir": str(model), "lengths": s["lengths"], "device": args.device, "work": str(args.work)}
        cmd = [sys.executable, str(HERE / "max_length.py"), json.dumps(spec)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit)
            stdout, stderr, note = proc.stdout, proc.stderr, f"exit {proc.returncode}"
        except subprocess.TimeoutExpired as e:  # the probes done so far still count
            text = lambda b: b.decode() if isinstance(b, bytes) else (b or "")  # noqa: E731
            stdout, stderr, note = text(e.stdout), text(e.stderr), f"stopped at the row's {limit:.0f} s limit"
        lines = [x for x in stdout.splitlines() if x.startswith("{")]
        out["rows"][row] = {**(json.loads(lines[-1]) if lines else {"error": stderr[-1500:]}), "end": note}
        sys.stderr.write(stderr[-3000:])
        save(args.work, "maxlen", out)
    return out


def table(args) -> str:
    status = {}
    for line in (args.work / "parts.txt").read_text().splitlines() if (args.work / "parts.txt").exists() else []:
        name, rc, secs = line.split()
        status[name] = (int(rc), int(secs))
    res = {p: json.loads(f.read_text()) for p in PARTS if (f := args.work / "results" / f"{p}.json").exists()}
    res["status"] = status
    args.log.mkdir(parents=True, exist_ok=True)
    (args.log / "results.json").write_text(json.dumps(res, indent=1))
    why = {124: "timed out", 137: "killed at its time limit"}
    lines = [f"GPU check ({args.device}): parts", "", "| part | result | seconds | exit |", "|---|---|---:|---:|"]
    for p in PARTS:
        rc, secs = status.get(p, (None, 0))
        ok = rc == 0 and (p != "e2e" or res.get("e2e", {}).get("ok"))
        lines.append(f"| {p} | {'passed' if ok else 'not run' if rc is None else why.get(rc, 'FAILED')} | {secs} | {rc} |")
    lines += ["", "Figures", ""]
    e = res.get("e2e", {})
    if e.get("train"):
        lines.append(f"- e2e: {e['train']['steps']} steps, loss_first - ln2 = {e['loss_first_minus_ln2']:+.2e}, "
                     f"{e['train']['tokens_per_second']:,.0f} tokens/s, eval accuracy {e.get('eval', {}).get('rewards/accuracies')}")
    for att, r in res.get("parity", {}).items():
        n, o = r["policy_numerics"], r["old_bf16_weights"]
        lines.append(f"- step-1 parity ({att}, {r['pairs']} pairs): loss - ln2 {n['loss_minus_ln2']:+.1e}, mean |margin| "
                     f"{n['mean_abs_margin']:.1e} (bf16-weight reference: {o['loss_minus_ln2']:+.1e}, {o['mean_abs_margin']:.1e}); "
                     f"target |loss - ln2| < 2e-3 and |margin| < 1e-2: {'met' if abs(n['loss_minus_ln2']) < 2e-3 and n['mean_abs_margin'] < 1e-2 else 'NOT met'}")
    b = res.get("bench", {})
    rows = {k: r for k, r in b.get("rows", {}).items() if "error" not in r}
    if b:
        lines += ["", f"Training rows ({b['model']}, batch {b['spec']['batch_size']}, max_length {b['spec']['max_length']}; "
                      f"peak {b['peak']['flops_per_s'] / 1e12:,.1f} TFLOP/s, {b['peak']['name']})", "",
                  "| row | tokens/s | MFU | peak GPU MB | reference tokens/s |", "|---|---:|---:|---:|---:|"]
        for k, r in b.get("rows", {}).items():
            if "error" in r:
                lines.append(f"| {k} | FAILED | | | |")
                continue
            ref = f"{r['ref_tokens_per_s']:,.0f}" if r.get("ref_tokens_per_s") else ""
            gpu = f"{r['peak_gpu_mb']:,.0f}" if r.get("peak_gpu_mb") is not None else "-"
            lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.1f}% | {gpu} | {ref} |")
    best = max((rows[k] for k in ("dpo-ray", "dpo-ray-flex") if k in rows), key=lambda r: r["tokens_per_s"], default=None)
    checks = []
    if best and "trl-pre" in rows:
        trl = rows["trl-pre"]
        checks.append((f"dpo-ray ({best['name'].split(', ')[-1].rstrip(')')}) >= 1.5x TRL + precompute tokens/s",
                       best["tokens_per_s"] / trl["tokens_per_s"], 1.5, True))
        if best.get("peak_gpu_mb") and trl.get("peak_gpu_mb"):
            checks.append(("peak GPU memory <= 0.6x TRL + precompute", best["peak_gpu_mb"] / trl["peak_gpu_mb"], 0.6, False))
    if best:
        checks.append((f"policy step MFU >= 40% ({b['model']}; the target is for ~1.5B)", 100 * best["mfu"], 40, True))
    m = res.get("maxlen", {}).get("rows", {})
    if m:
        lines += ["", "Longest max_length whose training step fits at batch 1 (tried: " + ", ".join(map(str, res["maxlen"]["lengths"])) + ")", ""]
        for k, r in m.items():
            lines.append(f"- {k}: {r.get('longest')} (first failure: {r.get('first_failure')} {r.get('failure', '')}; "
                         f"peak GPU MB at the longest: {r.get('peak_gpu_mb')}; {r.get('end')})")
        ours = max((m[k].get("longest") or 0 for k in ("dpo-ray-sdpa", "dpo-ray-flex") if k in m), default=0)
        if m.get("trl-pre", {}).get("longest"):
            checks.append(("longest max_length at batch 1 >= 2x TRL", ours / m["trl-pre"]["longest"], 2, True))
    if checks and args.device == "cuda":  # on the CPU dry run the figures only show that the code runs
        lines += ["", "Targets", ""] + [f"- {t}: {got:.2f} — {'met' if (got >= want if hi else got <= want) else 'NOT met'}"
                                        for t, got, want, hi in checks]
    text = "\n".join(lines)
    (args.log / "table.txt").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=("e2e", "parity", "bench", "maxlen", "table"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--log", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part == "table":
        print(table(args))
        return
    s = sizes(args.device)
    result = {"e2e": e2e, "parity": parity, "bench": bench, "maxlen": maxlen}[args.part](args, s)
    save(args.work, args.part, result)
    if args.part == "e2e" and not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
