"""Benchmark row: the matmul peak this machine reaches (the MFU denominator), measured, not taken from a data sheet.

A square matmul in the precision the training rows compute in (bf16 on CUDA, fp32 on CPU), repeated for about
two seconds after warm-up; the best of five rounds. 2 * n^3 FLOPs per matmul.

python benchmarks/peak.py '<spec json>'  -> one JSON line
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import set_threads  # noqa: E402


def run(spec: dict) -> dict:
    set_threads(spec["threads"])
    device = torch.device(spec.get("device", "cpu"))
    dtype = torch.bfloat16 if spec.get("bf16") else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < 0.5:
        a @ b
        reps += 1
    sync()
    reps = max(1, int(reps * 0.4 / (time.perf_counter() - t0)))  # about 0.4 s a round
    best = 0.0
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t0))
    return {"name": f"{n}x{n} matmul, {str(dtype).removeprefix('torch.')}, {device.type}", "flops_per_s": best}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
