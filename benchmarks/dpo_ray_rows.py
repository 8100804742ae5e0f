"""Benchmark rows for dpo-ray itself, each run as the pipeline runs it.

  train: `pipeline.run.run` with the stages prepare, reference, train on a local Ray runtime. The reference
         stage (Ray Data actor pool) is timed around its own call; the training steps are timed inside the Ray
         Train worker (the train/step_seconds and train/tokens_per_second metrics it logs to MLflow), and the
         worker's peak RSS is read from /proc (VmHWM) while it runs; on CUDA its peak GPU memory is the worker's
         train/gpu_peak_memory_mb metric.
  prep:  the prepare stage alone (Ray Data read, validate, tokenize, write Parquet) with `cpus` CPUs, and a plain
         Python loop over the same lines with the same row functions, for comparison.

python benchmarks/dpo_ray_rows.py train|prep '<spec json>'  -> one JSON line
"""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _config(spec: dict, work: Path, **extra):
    from dpo_ray.config import load_config

    sets = {
        "name": "bench", "output_dir": str(work / "out"), "cache_dir": str(work / "cache"), "seed": str(spec["seed"]),
        "model.policy": spec["model_dir"], "model.tokenizer": spec["tokenizer_dir"], "data.train": json.dumps([spec["data"]]),
        "data.eval_fraction": "0.0", "data.max_length": str(spec["max_length"]), "data.max_prompt_length": str(spec["max_prompt_length"]),
        "reference.batch_size": str(spec.get("reference_batch_size", 64)), "train.batch_size_per_worker": str(spec["batch_size"]),
        "train.max_steps": str(spec["warmup_steps"] + spec["steps"]), "train.lr": str(spec["lr"]), "train.beta": str(spec["beta"]),
        "train.weight_decay": "0.0", "train.warmup_ratio": "0.0", "train.torch_threads": str(spec["threads"]),
        "train.checkpoint_every": "1000000", "train.log_every": "10", "train.grad_accum_steps": "1",
        "train.bf16": str(bool(spec.get("bf16"))).lower(), "train.use_gpu": str(spec.get("device", "cpu") == "cuda").lower(),
        "train.attention": spec.get("attention", "sdpa"),
        "mlflow.tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
    }
    sets.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


class WorkerPeakRss(threading.Thread):
    """Polls the peak RSS (VmHWM) of every process whose command line names `marker` until stopped."""

    def __init__(self, marker: str = "RayTrainWorker"):
        super().__init__(daemon=True)
        self.marker, self.peak_mb, self._done = marker, 0.0, threading.Event()

    def run(self):
        import psutil

        pids: list[int] = []
        while not self._done.wait(1.0):
            if not pids:  # look for the worker once it exists; then read only its /proc entry
                pids = [p.pid for p in psutil.process_iter(["cmdline"]) if self.marker in " ".join(p.info["cmdline"] or ())]
            for pid in pids:
                try:
                    for line in open(f"/proc/{pid}/status"):
                        if line.startswith("VmHWM:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except OSError:
                    pids = []  # it exited (or restarted): look again

    def stop(self) -> float:
        self._done.set()
        self.join()
        return self.peak_mb


def _timed(fn, record: dict, name: str):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        record[name] = time.perf_counter() - t0
        return out
    return wrapper


def train(spec: dict) -> dict:
    import ray
    from mlflow.tracking import MlflowClient

    import pipeline.run as pr
    import pipeline.sequence as seq

    work = Path(tempfile.mkdtemp(prefix="dpo-ray-bench-"))
    cfg = _config(spec, work)
    ray.init(num_cpus=spec["threads"], num_gpus=1 if spec.get("device") == "cuda" else 0, include_dashboard=False, log_to_driver=False)
    times: dict = {}
    seq.score_reference = _timed(seq.score_reference, times, "reference")  # time the stage's own call, nothing else
    rss = WorkerPeakRss()
    rss.start()
    summary = pr.run(cfg, stages=("prepare", "reference", "train"))
    peak = rss.stop()
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    hist = {k: {m.step: m.value for m in client.get_metric_history(summary["mlflow_run_id"], f"train/{k}")}
            for k in ("step_seconds", "tokens_per_second", "loss", "gpu_peak_memory_mb", "model_flops")}
    measured = [s for s in sorted(hist["step_seconds"]) if s > spec["warmup_steps"]]
    seconds = sum(hist["step_seconds"][s] for s in measured)
    tokens = sum(hist["step_seconds"][s] * hist["tokens_per_second"][s] for s in measured)

    rows, ref_tokens = _prepared_counts(work / "cache")
    ray.shutdown()
    return {"name": f"dpo-ray (Ray Train worker, packed pairs, {spec.get('attention', 'sdpa')} attention)", "steps": len(measured), "pairs": len(measured) * spec["batch_size"],
            "peak_gpu_mb": max(hist["gpu_peak_memory_mb"].values(), default=None),
            "model_flops": sum(hist["model_flops"].get(s, 0.0) for s in measured),  # dpo_ray.flops: what the steps ran
            "tokens": round(tokens), "positions": None, "padding_fraction": 0.0, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "pairs_per_s": len(measured) * spec["batch_size"] / seconds, "peak_rss_mb": peak, "loss_first": hist["loss"].get(1),
            "ref_seconds": times["reference"], "ref_rows": rows, "ref_tokens": ref_tokens,
            "ref_rows_per_s": rows / times["reference"], "ref_tokens_per_s": ref_tokens / times["reference"]}


def _prepared_counts(cache: Path) -> tuple[int, int]:
    """Rows and tokens (chosen + rejected) the reference stage scored: every prepared row of every split."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    rows = tokens = 0
    for f in (cache / "prepared").rglob("*.parquet"):
        if f.name == "meta.parquet":
            continue
        t = pq.read_table(f, columns=["chosen_input_ids", "rejected_input_ids"])
        rows += t.num_rows
        tokens += sum(pc.sum(pc.list_value_length(t.column(c))).as_py() or 0 for c in t.column_names)
    return rows, tokens


def prep(spec: dict) -> dict:
    """The prepare stage with spec['cpus'] CPUs (Ray Data), or spec['cpus'] = 0: a plain loop, no Ray."""
    from pipeline.artifacts import resolve_data_files  # noqa: F401  (same import cost in both rows)

    work = Path(tempfile.mkdtemp(prefix="dpo-ray-bench-prep-"))
    n_lines = sum(1 for _ in open(spec["data"], "rb"))
    if spec["cpus"] == 0:
        from benchmarks.common import tokenized_pairs

        t0 = time.perf_counter()
        rows = tokenized_pairs(Path(spec["data"]), Path(spec["tokenizer_dir"]), spec["max_length"], spec["max_prompt_length"])
        seconds = time.perf_counter() - t0
        return {"name": "plain Python loop (same row functions)", "rows": n_lines, "rows_ok": len(rows), "seconds": seconds,
                "rows_per_s": n_lines / seconds}
    import ray

    from pipeline import prepare
    from pipeline.context import Context

    cfg = _config(spec, work)
    ray.init(num_cpus=spec["cpus"], include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    t0 = time.perf_counter()
    prepared = prepare.prepare_pairs(cfg, Context.for_models(cfg, spec["tokenizer_dir"], rejects_file=work / "rejects.jsonl"))
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return {"name": f"dpo-ray prepare (Ray Data, {spec['cpus']} CPU)", "rows": n_lines, "rows_ok": prepared.stats["rows_used"],
            "seconds": seconds, "rows_per_s": n_lines / seconds}


if __name__ == "__main__":
    print(json.dumps({"train": train, "prep": prep}[sys.argv[1]](json.loads(sys.argv[2]))))
