"""A train worker's peak host memory against the size of the preference set: the same short training on N and 10 x N
generated pairs, through the real train path (pipeline.train.fit: Ray Train, the worker loop, the cached Parquet).

The pairs are written directly as a reference cache part (as the reference stage writes it: row groups of 64 rows,
a pair_tokens column, a marker with its manifest), since scoring 10 x N pairs on 2 CPUs would take an hour; what is
measured is training, which only reads that cache. Token ids are random (ids < the demo tokenizer's vocabulary), with
a shared prompt: prompt 100 tokens, replies 250-350 (sequences of ~400 tokens), so a pair is ~4 KiB of Arrow (int32 ids, int8 masks).

Peak RSS: the worker's own train/host_memory_peak_mb (ru_maxrss) where the code reports it, and /proc VmHWM of the
RayTrainWorker processes polled from here (the only figure for code older than that metric).

python benchmarks/scale_memory.py --pairs 7500 --scales 1 10 --object-store-mb 100 -> one JSON line per size, then a summary
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT, REPLY = 100, (250, 351)
ROWS_PER_FILE = 5000


def write_reference_part(out: Path, n_pairs: int, vocab: int, seed: int = 0) -> Path:
    """A complete reference cache part at out/ (train/ Parquet files with their marker): n_pairs generated pairs."""
    from pipeline.artifacts import DONE, complete_dir
    from pipeline.storage import local

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    with complete_dir(local(out / "train")) as tmp:
        for f, start in enumerate(range(0, n_pairs, ROWS_PER_FILE)):
            pq.write_table(_pairs(rng, start, min(n_pairs, start + ROWS_PER_FILE), vocab), f"{tmp.path}/part-{f:05d}.parquet", row_group_size=64)
    (out / DONE).write_text("ok\n")
    return out


def _pairs(rng, start: int, stop: int, vocab: int) -> pa.Table:
    n = stop - start
    lc, lr = rng.integers(*REPLY, n), rng.integers(*REPLY, n)
    cols = {}
    for side, lens in (("chosen", lc), ("rejected", lr)):
        offsets = np.concatenate([[0], np.cumsum(PROMPT + lens)]).astype(np.int32)
        ids = rng.integers(3, vocab, int(offsets[-1]), dtype=np.int32)
        mask = np.ones(int(offsets[-1]), dtype=np.int8)
        for o in offsets[:-1]:
            mask[o : o + PROMPT] = 0
        cols[f"{side}_input_ids"] = pa.ListArray.from_arrays(offsets, ids)
        cols[f"{side}_loss_mask"] = pa.ListArray.from_arrays(offsets, mask)
    # the shared prompt: the rejected sequence starts with the chosen one's prompt tokens
    ci, ri = cols["chosen_input_ids"], cols["rejected_input_ids"]
    rv = ri.values.to_numpy().copy()
    cv, co, ro = ci.values.to_numpy(), ci.offsets.to_numpy(), ri.offsets.to_numpy()
    for i in range(n):
        rv[ro[i] : ro[i] + PROMPT] = cv[co[i] : co[i] + PROMPT]
        if rv[ro[i] + PROMPT] == cv[co[i] + PROMPT]:
            rv[ro[i] + PROMPT] = 3 + (rv[ro[i] + PROMPT] - 2) % (vocab - 3)
    cols["rejected_input_ids"] = pa.ListArray.from_arrays(ri.offsets, pa.array(rv))
    return pa.table({
        "row_id": pa.array([f"scale.jsonl:{i + 1}" for i in range(start, stop)]),
        **{k: cols[k] for k in ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")},
        "ref_chosen_logps": pa.array(-rng.uniform(300, 900, n).astype(np.float32)),
        "ref_rejected_logps": pa.array(-rng.uniform(300, 900, n).astype(np.float32)),
        "pair_tokens": pa.array((PROMPT + lc + lr).astype(np.int32)),
    })


def _vmhwm_mb(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _train_workers() -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline"]) if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])]


def measure(n_pairs: int, work: Path, model: str, steps: int) -> dict:
    from dpo_ray.config import load_config
    from pipeline import train
    from pipeline.context import Context
    from pipeline.reference import Reference
    from pipeline.storage import local

    t0 = time.time()
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    part = write_reference_part(work / f"ref-{n_pairs}", n_pairs, vocab)
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in (part / "train").glob("*.parquet")) == n_pairs
    size = sum(f.stat().st_size for f in (part / "train").glob("*.parquet")) / 2**20
    arrow = sum(pq.read_table(f).nbytes for f in (part / "train").glob("*.parquet")) / 2**20  # one file at a time
    gen_s = time.time() - t0
    cfg = load_config(None, [f"output_dir={work / f'out-{n_pairs}'}", f"cache_dir={work / 'cache'}", "train.batch_size_per_worker=2",
                             f"train.max_steps={steps}", f"train.checkpoint_every={steps}", "train.log_every=1", "train.lr=1e-4",
                             "train.bf16=false", "mlflow.system_metrics=false"])
    ref = Reference([local(part)], f"scale-{n_pairs}", True, [])
    peaks, done = {}, threading.Event()

    def poll():
        while not done.is_set():
            for pid in _train_workers():
                v = _vmhwm_mb(pid)
                if v is not None:
                    peaks[pid] = max(v, peaks.get(pid, 0.0))
            time.sleep(0.1)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    t1 = time.time()
    result = train.fit(cfg, Context.for_models(cfg, model), ref)  # the pad id: the model's tokenizer's
    done.set()
    watcher.join()
    m = result.metrics or {}
    return {"pairs": n_pairs, "parquet_mb": round(size, 1), "arrow_mb": round(arrow, 1),
            "generate_seconds": round(gen_s, 1), "train_seconds": round(time.time() - t1, 1), "steps": m.get("step"),
            "host_memory_peak_mb": m.get("host_memory_peak_mb"), "vmhwm_mb": round(max(peaks.values()), 1) if peaks else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=7500)
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 10])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--object-store-mb", type=int, default=None)
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import os

    import ray

    from dpo_ray.model import resolve_model

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    work = Path(args.work or tempfile.mkdtemp(prefix="dpo-scale-"))
    model = resolve_model("demo:tiny-llama", work / "models")
    extra = {"object_store_memory": args.object_store_mb * 2**20} if args.object_store_mb else {}
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, **extra)
    rows = []
    try:
        for scale in args.scales:
            rows.append(measure(args.pairs * scale, work, model, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray.shutdown()
    print(json.dumps({"summary": rows, "object_store_mb": args.object_store_mb}), flush=True)


if __name__ == "__main__":
    main()
