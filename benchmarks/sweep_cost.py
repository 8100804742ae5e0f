"""A sweep against the same trials as separate runs: wall time, and the reference pass's share.

    python benchmarks/sweep_cost.py [--betas 0.05,0.1,0.3,0.5] [--max-steps 60] [--out benchmarks/sweep_cost.json]

1. `dpo-ray sweep configs/demo.yaml --grid train.beta=[...]` on a fresh cache: prepare and reference once, one trial
   per beta (Ray Tune, one at a time on a 2-core machine), the best exported.
2. The same trials as separate `dpo-ray run`s, each on a fresh cache of its own, as N independent runs in a tool without
   dpo-ray's shared cache do: each prepares and scores the reference again.
Both through the CLI as a user types it, each command timed from the outside; the demo's data, model and settings, with
train.max_steps capping each trial (the comparison is about the shared stages). MLflow into one sqlite file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cli(args: list[str], log: Path, env: dict) -> float:
    t0 = time.time()
    with log.open("w") as f:
        rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    if rc != 0:
        sys.exit(f"sweep_cost: `dpo-ray {' '.join(args)}` exited {rc}; see {log}")
    return time.time() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--betas", default="0.05,0.1,0.3,0.5")
    ap.add_argument("--max-steps", type=int, default=60)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "sweep_cost.json"))
    ap.add_argument("--work", default=None, help="working directory (default: a temporary one, removed after)")
    a = ap.parse_args()
    betas = [float(b) for b in a.betas.split(",")]
    work = Path(a.work or tempfile.mkdtemp(prefix="sweep-cost-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    common = ["--set", f"mlflow.tracking_uri=sqlite:///{work / 'mlflow.db'}", "--set", f"train.max_steps={a.max_steps}"]

    n = len(betas)
    print(f"[1/{n + 1}] sweep over train.beta={betas}, {a.max_steps} steps a trial, fresh cache", flush=True)
    sweep_s = cli(["sweep", "configs/demo.yaml", "--grid", f"train.beta=[{','.join(map(str, betas))}]", "--json", *common,
                   "--set", f"cache_dir={work / 'cache-sweep'}", "--set", f"output_dir={work / 'sweep'}"], work / "sweep.log", env)
    summary = json.loads((work / "sweep" / "sweep_summary.json").read_text())
    print(f"  sweep: {sweep_s:.0f} s, reference {summary['cost']['reference_seconds']:.0f} s", flush=True)

    runs = []
    for i, b in enumerate(betas):
        print(f"[{i + 2}/{n + 1}] dpo-ray run with train.beta={b}, fresh cache (ETA {(n - i) * sweep_s / n:.0f} s or more)", flush=True)
        s = cli(["run", "configs/demo.yaml", "--json", *common, "--set", f"train.beta={b}", "--set", f"cache_dir={work / f'cache-{i}'}",
                 "--set", f"output_dir={work / f'run-{i}'}"], work / f"run-{i}.log", env)
        rs = json.loads((work / f"run-{i}" / "summary.json").read_text())
        stages = {m[0]: float(m[1]) for m in re.findall(r"\b(prepare|reference|train|evaluate): finished in ([\d.]+) s", (work / f"run-{i}.log").read_text())}
        runs.append({"beta": b, "seconds": round(s, 1), "wall_seconds": rs.get("wall_seconds"), "stage_seconds": stages,
                     "eval_accuracy": (rs.get("eval") or {}).get("rewards/accuracies")})
        print(f"  run beta={b}: {s:.0f} s", flush=True)

    separate = sum(r["seconds"] for r in runs)
    out = {"machine": f"{os.cpu_count()} CPUs", "betas": betas, "max_steps": a.max_steps,
           "sweep": {"seconds": round(sweep_s, 1), "cost": summary["cost"], "trials": [
               {k: t.get(k) for k in ("trial_id", "overrides", "status", "eval/rewards/accuracies")} for t in summary["trials"]]},
           "separate_runs": {"seconds": round(separate, 1), "runs": runs},
           "sweep_over_separate": round(sweep_s / separate, 3),
           "separate_reference_seconds": round(sum(r["stage_seconds"].get("reference", 0) for r in runs), 1)}
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"sweep {sweep_s:.0f} s against {separate:.0f} s as {n} separate runs ({sweep_s / separate:.2f}x); "
          f"reference {summary['cost']['reference_passes']} pass(es), {100 * (summary['cost']['reference_share'] or 0):.0f}% of the sweep -> {a.out}")
    if not a.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
