"""The parts of benchmarks/gpu_check.sh that are Python: each writes its result to <work>/results/<part>.json.

    python benchmarks/gpu_check.py profile|trl|e2e|parity|bench|maxlen|table --device cuda|cpu --work DIR [--log DIR]

Call 1 (what matters most, ~7 min on an H100):
profile: benchmarks/profile_step.py on the Ray Train row's step (dpo_ray.train_loop.train_step, same model shape, data,
        batch and lengths; 2 warm-up + 3 profiled steps): <log>/profile-<attention>/ summary.txt, summary.json, trace.json.gz.
trl:    TRL + precompute_ref_log_probs on the e2e's model, data, batch and lengths (and the matmul peak, for MFU).
e2e:    `dpo-ray run` (python -m pipeline.cli) with the training row's settings: Ray Data prepare, the reference stage on
        a GPU actor, TorchTrainer(use_gpu), evaluation, MLflow on sqlite; must write summary.json. Its training steps,
        read back from MLflow (after the warm-up steps), are the Ray Train training row compared with TRL.
Call 2:
parity: step 1 of the policy against the reference stage's scorer (benchmarks/parity.py), every attention.
bench:  more dpo-ray rows of benchmarks/run.py (BENCH_ROWS, default: varlen and flex attention; `dpo-ray trl-pre trl` the
        old full set) on the same model, data, batch and lengths; the matmul peak first (MFU).
maxlen: the longest max_length whose training step fits at batch 1, doubling from 4096, for dpo-ray (sdpa, varlen, flex)
        and TRL + precompute; each row in its own process (an OOM leaves the next row a clean GPU).
table:  merges every part's JSON into <log>/results.json and prints the final table (also <log>/table.txt).
Sizes: cuda uses Qwen2.5-0.5B's shape (GPU_CHECK_MODEL=qwen-1.5b for the MFU target's size); cpu, the dry run, the
demo's tiny Llama and a few steps, through the same code (the profile: a tiny Qwen2 shape, `--model tiny`).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchmarks.common import flops_model, model_dir, write_long  # noqa: E402

PARTS = ("wheels", "trl", "e2e", "profile", "tests", "parity", "bench", "maxlen")
ATTENTION = os.environ.get("GPU_CHECK_ATTENTION", "sdpa")  # the Ray Train row's (and the e2e's) train.attention
COMPILE = os.environ.get("GPU_CHECK_COMPILE", "0") == "1"  # the e2e's train.compile (the profile compares both either way)


def sizes(device: str) -> dict:
    if device == "cuda":
        return {"model": os.environ.get("GPU_CHECK_MODEL", "qwen-0.5b"), "batch": 8, "max_length": 1024, "max_prompt_length": 512,
                "warmup": 2, "steps": 8, "threads": 8, "ref_batch": 64, "bench_pairs": 300, "e2e_pairs": 160, "parity_pairs": 32,
                "lengths": [4096 * 2**i for i in range(6)], "profile": []}
    # CPU: FlexAttention runs its eager, dense implementation there (an N x N score matrix per head): small batches
    return {"model": "tiny", "batch": 2, "max_length": 256, "max_prompt_length": 128, "warmup": 1, "steps": 2, "threads": 2, "ref_batch": 2, "bench_pairs": 40,
            "e2e_pairs": 40, "parity_pairs": 12, "lengths": [64, 128],
            "profile": ["--model", "tiny", "--vocab", "2048", "--batch", "2", "--max-length", "256", "--max-prompt-length", "128", "--warmup", "1", "--timed", "1", "--steps", "1"]}


def save(work: Path, part: str, result: dict) -> None:
    (work / "results").mkdir(parents=True, exist_ok=True)
    (work / "results" / f"{part}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)


def _subset(work: Path, n: int) -> Path:
    """The first n pairs of the long data set (sequences near 1024 tokens)."""
    data = work / "data" / f"long-{n}.jsonl"
    data.write_text("".join(write_long(work / "data" / "long.jsonl").read_text().splitlines(keepends=True)[:n]))
    return data


def spec_of(args, s: dict, data: Path, model: Path) -> dict:
    """The training row's settings, shared by the e2e (the Ray Train row), TRL and the bench rows."""
    return {"model_dir": str(model), "tokenizer_dir": str(model), "batch_size": s["batch"], "max_length": s["max_length"],
            "max_prompt_length": s["max_prompt_length"], "steps": s["steps"], "warmup_steps": s["warmup"], "threads": s["threads"],
            "lr": 1e-4, "beta": 0.1, "seed": 0, "device": args.device, "bf16": args.device == "cuda", "data": str(data),
            "reference_batch_size": s["ref_batch"]}


def e2e(args, s: dict) -> dict:
    """`dpo-ray run` on benchmarks/gpu_check.yaml (plain DPO, no generations) with the training row's settings; its
    measured steps (after the warm-up) are the Ray Train row. The run gets E2E_SECONDS (the part's limit less a margin):
    cut there, the row is still read from its MLflow store (or, failing that, from the step lines it printed)."""
    model = model_dir(args.work, s["model"])
    data = _subset(args.work, s["e2e_pairs"])
    spec = spec_of(args, s, data, model)
    out = args.work / "e2e"
    steps = s["warmup"] + s["steps"]
    sets = {"output_dir": out / "out", "cache_dir": out / "cache", "model.policy": model, "data.train": f"[{data}]",
            "data.max_length": s["max_length"], "data.max_prompt_length": s["max_prompt_length"],
            "train.batch_size_per_worker": s["batch"], "train.max_steps": steps, "train.checkpoint_every": steps,
            "train.lr": spec["lr"], "train.beta": spec["beta"], "train.attention": ATTENTION, "train.compile": str(COMPILE).lower(),
            "train.use_gpu": str(args.device == "cuda").lower(), "mlflow.tracking_uri": f"sqlite:///{out / 'mlflow.db'}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(HERE / "gpu_check.yaml")]
    cmd += [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    t0 = time.time()
    limit = float(os.environ.get("E2E_SECONDS", 0)) or None
    console = out / "console.log"
    out.mkdir(parents=True, exist_ok=True)
    with open(console, "w") as f:
        proc = subprocess.Popen(cmd, cwd=args.work, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:  # the run's whole process group (its Ray runtime too), then what it left
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            rc = "cut"
    sys.stdout.write(console.read_text()[-6000:])
    summary = out / "out" / "summary.json"
    r = {"ok": rc == 0 and summary.exists(), "returncode": rc, "seconds": round(time.time() - t0, 1)}
    sm = json.loads(summary.read_text()) if summary.exists() else {}
    if sm:
        r.update(train=sm.get("train"), eval=sm.get("eval"), eval_reference=sm.get("eval_reference"), rows=sm["data"]["rows_used"])
        first = sm.get("train", {}).get("loss_first")
        r["loss_first_minus_ln2"] = None if first is None else first - math.log(2)
    r["row"] = _row(args, s, model, out, sm.get("mlflow_run_id"), console)
    return r


def _row(args, s: dict, model: Path, out: Path, run_id: str | None, console: Path) -> dict | None:
    """The Ray Train row from the worker's own step metrics in the e2e's MLflow store (its latest run when the run was
    cut before summary.json), else the tokens/s of the step lines in its console."""
    from benchmarks.run import mfu

    name = f"dpo-ray (Ray Train worker in `dpo-ray run`, packed pairs, {ATTENTION} attention{', compiled layers' if COMPILE else ''})"
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
        if run_id is None:
            exp = client.get_experiment_by_name("dpo-ray-gpu-check")
            runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1) if exp else []
            run_id = runs[0].info.run_id if runs else None
        if run_id is None:
            raise LookupError("no MLflow run in the e2e's store")
        hist = {k: {m.step: m.value for m in client.get_metric_history(run_id, f"train/{k}")}
                for k in ("step_seconds", "tokens_per_second", "gpu_peak_memory_mb", "model_flops", "compile_seconds")}
        measured = [i for i in sorted(hist["step_seconds"]) if i > s["warmup"]]
        if not measured:
            raise LookupError(f"no step after the {s['warmup']} warm-up steps in MLflow")
        seconds = sum(hist["step_seconds"][i] for i in measured)
        tokens = sum(hist["step_seconds"][i] * hist["tokens_per_second"][i] for i in measured)
        flops = sum(hist["model_flops"].get(i, 0.0) for i in measured)
        row = {"name": name, "source": "MLflow", "steps": len(measured), "tokens": round(tokens), "seconds": seconds,
               "tokens_per_s": tokens / seconds, "model_tflops_per_s": flops / seconds / 1e12,
               "peak_gpu_mb": max(hist["gpu_peak_memory_mb"].values(), default=None),
               "compile_seconds": max(hist["compile_seconds"].values(), default=None)}
        peak = datasheet(args)
        row["mfu"] = flops / seconds / peak if peak and flops else None
        measured_peak = _peak(args)
        if measured_peak:
            row["mfu_effective"] = mfu({**row, "pairs": len(measured) * s["batch"]}, flops_model(model), measured_peak)
        return row
    except Exception as e:  # noqa: BLE001  a store that cannot be read: the step lines the run printed
        rates = [float(m.group(1).replace(",", "")) for m in re.finditer(r"\| ([\d,.]+) tok/s", console.read_text())]
        rates = rates[s["warmup"]:]
        if not rates:
            return {"name": name, "error": f"no row: {e!r}"[:300]}
        return {"name": name, "source": f"console step lines ({e!r}"[:200] + ")", "steps": len(rates),
                "tokens_per_s": sorted(rates)[len(rates) // 2]}


def datasheet(args) -> float | None:
    """The GPU's datasheet dense bf16 peak (honest MFU's denominator), None on CPU or an unlisted GPU."""
    if args.device != "cuda":
        return None
    import torch

    from dpo_ray.flops import datasheet_peak

    return datasheet_peak(torch.cuda.get_device_name(0))


def _peak(args) -> float | None:
    f = args.work / "results" / "trl.json"
    return json.loads(f.read_text()).get("peak", {}).get("flops_per_s") if f.exists() else None


def profile(args, s: dict) -> dict:
    """benchmarks/profile_step.py on the training row's step, for each variant in GPU_CHECK_PROFILE (default: sdpa,
    varlen, and sdpa with the layers compiled): unprofiled timed steps and the profiled ones, the summary (written
    before the trace) and the Chrome trace into <log>/profile-<variant>/; each variant saved as it ends."""
    out = {}
    for variant in os.environ.get("GPU_CHECK_PROFILE", "sdpa varlen sdpa+compile").split():
        attention, _, extra = variant.partition("+")
        d = args.log / f"profile-{variant}"
        cmd = [sys.executable, str(HERE / "profile_step.py"), "--device", args.device, "--attention", attention, "--out", str(d),
               "--work", str(args.work / "profile"), *s["profile"], *(["--compile"] if extra == "compile" else [])]
        if s["model"] != "tiny":
            cmd += ["--model", s["model"]]
        proc = subprocess.run(cmd)
        f = d / "summary.json"
        out[variant] = json.loads(f.read_text()) if f.exists() else {"error": f"exit {proc.returncode}"}
        save(args.work, "profile", out)
    if any("error" in v for v in out.values()):
        raise SystemExit(f"profile: {', '.join(k for k, v in out.items() if 'error' in v)} failed")
    return out


def trl(args, s: dict) -> dict:
    """TRL + precompute_ref_log_probs on the e2e's model, data, batch and lengths; the matmul peak first (MFU)."""
    from benchmarks.run import TRAIN_ROWS, child, mfu

    model = model_dir(args.work, s["model"])
    spec = spec_of(args, s, _subset(args.work, s["e2e_pairs"]), model)
    out = {"model": s["model"], "spec": spec, "peak": child("peak.py", spec), "rows": {}}
    save(args.work, "trl", out)
    script, extra = TRAIN_ROWS["trl-pre"]
    try:
        r = child(script, {**spec, **extra})
        rate_mfu(args, r, model, out["peak"]["flops_per_s"])
    except SystemExit as e:
        r = {"error": str(e)[-1500:]}
    out["rows"]["trl-pre"] = r
    return out


def rate_mfu(args, r: dict, model: Path, measured_peak: float) -> None:
    """A benchmark row's mfu_effective (real tokens x PaLM's count / the measured matmul peak) and its honest mfu: the
    row's own model FLOPs when it logged them (dpo-ray's rows), else those of a padded row that runs every real token
    of both sequences with the LM head everywhere (TRL's), attention causal at the row's mean sequence length."""
    from benchmarks.common import model_flops_of
    from benchmarks.run import mfu

    r["mfu_effective"] = mfu(r, flops_model(model), measured_peak)
    flops = r.get("model_flops")
    if flops is None:
        T = r["tokens"] / max(2 * r["pairs"], 1)
        flops = model_flops_of(model).train(r["tokens"], r["tokens"], r["tokens"] * (T + 1) / 2)
    r["model_tflops_per_s"] = flops / r["seconds"] / 1e12
    peak = datasheet(args)
    r["mfu"] = flops / r["seconds"] / peak if peak else None


def parity(args, s: dict) -> dict:
    from benchmarks import parity as p

    model = model_dir(args.work, s["model"])
    spec = {"model_dir": str(model), "tokenizer_dir": str(model), "data": str(_subset(args.work, s["parity_pairs"])), "pairs": s["parity_pairs"],
            "max_length": s["max_length"], "max_prompt_length": s["max_prompt_length"], "device": args.device, "bf16": True}
    out = {}
    for attention in ("sdpa", "varlen", "flex"):
        out[attention] = p.run({**spec, "attention": attention})
        save(args.work, "parity", out)  # what is done survives a timeout in the next one
    return out


def bench(args, s: dict) -> dict:
    from benchmarks.run import TRAIN_ROWS, child, mfu

    model = model_dir(args.work, s["model"])
    spec = spec_of(args, s, _subset(args.work, s["e2e_pairs"]), model)  # the e2e's and TRL's data: one table
    fm = flops_model(model)
    out = {"model": s["model"], "params": fm["params"], "spec": spec, "peak": child("peak.py", spec), "rows": {}}
    for key in os.environ.get("BENCH_ROWS", "dpo-ray-varlen dpo-ray-flex").split():  # most wanted first: the part has a time limit
        script, extra = TRAIN_ROWS[key]
        try:
            r = child(script, {**spec, **extra})
            rate_mfu(args, r, model, out["peak"]["flops_per_s"])
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
    for row, limit in (("dpo-ray-varlen", 12), ("trl-pre", 25), ("dpo-ray-sdpa", 10), ("dpo-ray-flex", 35)):  # seconds per row on CUDA (flex compiles)
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
        if rc is None:  # a part of the other call
            continue
        ok = rc == 0 and (p != "e2e" or res.get("e2e", {}).get("ok"))
        lines.append(f"| {p} | {'passed' if ok else 'not run' if rc is None else why.get(rc, 'FAILED')} | {secs} | {rc} |")
    lines += ["", "Figures", ""]
    e = res.get("e2e", {})
    if e.get("train"):
        lines.append(f"- e2e: {e['train']['steps']} steps, loss_first - ln2 = {e['loss_first_minus_ln2']:+.2e}, "
                     f"{e['train']['tokens_per_second']:,.0f} tokens/s, eval accuracy {e.get('eval', {}).get('rewards/accuracies')}"
                     + (f", compiled layers: {e['train']['compile_seconds']:.1f} s compiling, {e['train'].get('recompiles')} recompiles"
                        if e["train"].get("compile_seconds") is not None else ""))
    elif e:
        lines.append(f"- e2e: no summary.json (exit {e.get('returncode')} after {e.get('seconds')} s); the row: "
                     + (f"{e['row'].get('source')}, {e['row'].get('steps')} steps" if e.get("row") and "tokens_per_s" in e["row"] else
                        (e.get("row") or {}).get("error", "none")))
    for att, r in res.get("parity", {}).items():
        n, o = r["policy_numerics"], r["old_bf16_weights"]
        lines.append(f"- step-1 parity ({att}, {r['pairs']} pairs): loss - ln2 {n['loss_minus_ln2']:+.1e}, mean |margin| "
                     f"{n['mean_abs_margin']:.1e} (bf16-weight reference: {o['loss_minus_ln2']:+.1e}, {o['mean_abs_margin']:.1e}); "
                     f"target |loss - ln2| < 2e-3 and |margin| < 1e-2: {'met' if abs(n['loss_minus_ln2']) < 2e-3 and n['mean_abs_margin'] < 1e-2 else 'NOT met'}")
    for att, p in res.get("profile", {}).items():
        if "error" in p:
            lines.append(f"- profile ({att}): FAILED ({p['error']})")
            continue
        timed = p.get("timed_step_seconds")
        comp = p.get("compile")
        lines.append(f"- step ({att}): {timed or p['step_seconds']:.3f} s unprofiled, {p['tokens'] / (timed or p['step_seconds']):,.0f} tokens/s"
                     + (f"; compiled: {comp['compile_graphs']} graphs in {comp['compile_seconds']:.1f} s, {comp['recompiles']} recompiles" if comp else ""))
        gpu = (f", GPU kernels {p['gpu_kernels']:,.0f}, launch calls {p['kernel_launch_calls']:,.0f}, GPU idle {p['gpu_idle_fraction']:.0%}"
               if "gpu_kernels" in p else "")
        lines.append(f"- profile ({att}, {p['layers']} layers, per step): {p['step_seconds']:.3f} s, {p['tokens'] / p['step_seconds']:,.0f} tokens/s, "
                     f"aten calls {p['aten_calls']:,.0f}, kernel calls {p['kernel_calls']:,.0f}, Python reads {p['python_reads_total']:.0f}, "
                     f"sync ops {p['sync_ops_total']:.0f}{gpu} (profile-{att}/summary.txt)")
    b = res.get("bench", {})
    t = res.get("trl", {})
    all_rows = {}
    if e.get("row") and "tokens_per_s" in e["row"]:
        all_rows["dpo-ray"] = e["row"]
    all_rows.update(t.get("rows", {}))
    all_rows.update(b.get("rows", {}))
    rows = {k: r for k, r in all_rows.items() if "error" not in r}
    info = b or t
    if all_rows:
        peak = info.get("peak", {}) if info else {}
        head = (f"Training rows ({info['model']}, batch {info['spec']['batch_size']}, max_length {info['spec']['max_length']}; "
                f"peak {peak['flops_per_s'] / 1e12:,.1f} TFLOP/s, {peak['name']})") if peak else "Training rows"
        lines += ["", head, "", "mfu: the model FLOPs executed (prompt once, the LM head where it runs, attention by the masks; "
                  "TRL's: every real token, the head everywhere) / the datasheet bf16 peak; mfu_effective: real tokens x "
                  "(6N + 12 L H T) / the measured matmul peak (the older figure)", "",
                  "| row | tokens/s | mfu | mfu_effective | model TFLOP/s | peak GPU MB | reference tokens/s |", "|---|---:|---:|---:|---:|---:|---:|"]
        pct = lambda x: f"{100 * x:.1f}%" if x is not None else "-"  # noqa: E731
        for k, r in all_rows.items():
            if "error" in r:
                lines.append(f"| {k} | FAILED | | | | | |")
                continue
            ref = f"{r['ref_tokens_per_s']:,.0f}" if r.get("ref_tokens_per_s") else ""
            gpu = f"{r['peak_gpu_mb']:,.0f}" if r.get("peak_gpu_mb") is not None else "-"
            tf = f"{r['model_tflops_per_s']:,.2f}" if r.get("model_tflops_per_s") is not None else "-"
            lines.append(f"| {r['name']} | {r['tokens_per_s']:,.0f} | {pct(r.get('mfu'))} | {pct(r.get('mfu_effective'))} | {tf} | {gpu} | {ref} |")
    best = max((rows[k] for k in ("dpo-ray", "dpo-ray-varlen", "dpo-ray-flex") if k in rows), key=lambda r: r["tokens_per_s"], default=None)
    checks = []
    if best and "trl-pre" in rows:
        trl_r = rows["trl-pre"]
        checks.append((f"dpo-ray ({best['name'].split(', ')[-1].rstrip(')')}) >= 1.5x TRL + precompute tokens/s",
                       best["tokens_per_s"] / trl_r["tokens_per_s"], 1.5, True))
        if best.get("peak_gpu_mb") and trl_r.get("peak_gpu_mb"):
            checks.append(("peak GPU memory <= 0.6x TRL + precompute", best["peak_gpu_mb"] / trl_r["peak_gpu_mb"], 0.6, False))
    if best and best.get("mfu") is not None:
        checks.append((f"policy step mfu >= 40% ({info.get('model') if info else ''}; the target is for ~1.5B)", 100 * best["mfu"], 40, True))
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
    ap.add_argument("part", choices=("profile", "trl", "e2e", "parity", "bench", "maxlen", "table"))
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--log", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.part == "table":
        print(table(args))
        return
    s = sizes(args.device)
    args.log = args.log or args.work / "log"
    result = {"profile": profile, "trl": trl, "e2e": e2e, "parity": parity, "bench": bench, "maxlen": maxlen}[args.part](args, s)
    save(args.work, args.part, result)
    if args.part == "e2e" and not result["ok"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
