"""The prepare stage's driver memory against the size of the preference set: prepare_pairs on N and 10 x N generated
pairs (the long-tailed `skewed` set of common.py, short lengths, 1% exact duplicates), each size in a fresh process.

Measured: the driver's resident memory after Ray has started and the tokenizer is loaded (the baseline), and its peak
(VmHWM, reset at the baseline through /proc/self/clear_refs) during prepare.prepare_pairs; what grows with the data is the
difference. `--tree` runs another checkout's code (e.g. a git worktree of an older commit) for a before/after.

python benchmarks/prepare_memory.py --pairs 20000 --scales 1 10 [--tree /path/to/checkout]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _status_mb(field: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def child(spec: dict) -> dict:
    """In a fresh process (PYTHONPATH = the tree measured): prepare.prepare_pairs once, the driver's memory around it."""
    import ray

    from dpo_ray.config import load_config
    from pipeline import prepare
    from pipeline.context import Context

    work = Path(spec["work"])
    cfg = load_config(None, [f"{k}={v}" for k, v in {
        "name": "prepmem", "output_dir": work / "out", "cache_dir": work / "cache", "model.policy": spec["model"],
        "data.train": json.dumps([spec["data"]]), "data.eval_fraction": "0.05", "data.max_length": "256",
        "data.max_prompt_length": "128", "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}"}.items()])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    prepare.load_tokenizer(spec["model"], False)
    base = _status_mb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    prepared = prepare.prepare_pairs(cfg, Context.for_models(cfg, spec["model"], rejects_file=work / "rejects.jsonl"))
    seconds = time.perf_counter() - t0
    peak = _status_mb("VmHWM")
    ray.shutdown()
    return {"pairs": spec["pairs"], "rows_used": prepared.stats["rows_used"], "duplicates": prepared.stats["duplicates"],
            "seconds": round(seconds, 1), "driver_base_mb": round(base), "driver_peak_mb": round(peak), "driver_growth_mb": round(peak - base)}


def write_pairs(path: Path, n: int) -> Path:
    """n short long-tailed pairs; every 100th line repeats the line before it (an exact duplicate)."""
    from benchmarks.common import write_skewed

    raw = write_skewed(path.with_suffix(".src.jsonl"), n=n, max_words=60, seed=3, prompt_median=8, reply_median=8)
    lines = raw.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[i - 1] if i % 100 == 99 else line for i, line in enumerate(lines)))
    raw.unlink()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=20000)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--tree", type=Path, default=HERE.parent, help="the checkout whose prepare is measured")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    from benchmarks.common import model_dir

    root = Path(tempfile.mkdtemp(prefix="dpo-ray-prepmem-"))
    model = model_dir(root)
    rows = []
    for scale in args.scales:
        n = args.pairs * scale
        work = root / f"n{n}"
        work.mkdir()
        spec = {"pairs": n, "work": str(work), "model": str(model), "data": str(write_pairs(work / f"pairs-{n}.jsonl", n))}
        env = {**os.environ, "PYTHONPATH": f"{args.tree.resolve()}:{HERE.parent}"}
        print(f"prepare_memory: {n} pairs with {args.tree} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        print(json.dumps({"tree": str(args.tree), "growth_mb": [r["driver_growth_mb"] for r in rows],
                          "pairs": [r["pairs"] for r in rows]}))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
    else:
        main()
