"""The GPU check's call 1, dry-run on CPU (`benchmarks/gpu_check.sh --device cpu`, the tiny model, a few steps), so that
the check a rare GPU session runs first cannot rot while no GPU is there: every part passes, three files come back
(results.json, table.txt, logs.tgz with every log, profile and trace), the table prints last, and the Ray Train row is
read from the MLflow store even without summary.json (a run cut at its limit), or from the step lines without a store.
The e2e runs with the layers compiled here (GPU_CHECK_COMPILE=1): train.compile through Ray Train and MLflow."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def call1(tmp_path_factory):
    log, work = tmp_path_factory.mktemp("gpucheck-log"), tmp_path_factory.mktemp("gpucheck-work")
    env = {**os.environ, "PYTHON": sys.executable, "GPU_CHECK_WORK": str(work), "GPU_CHECK_COMPILE": "1"}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--device", "cpu", str(log), "call1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return SimpleNamespace(proc=proc, log=log, work=work, results=json.loads((log / "results.json").read_text()))


def test_call1_dry_run_passes_and_brings_back_three_files(call1):
    assert call1.proc.returncode == 0, call1.proc.stdout[-3000:] + call1.proc.stderr[-3000:]
    r = call1.results
    assert {p: rc for p, (rc, _) in r["status"].items()} == {"wheels": 0, "trl": 0, "e2e": 0, "profile": 0}
    assert sorted(os.listdir(call1.log)) == ["logs.tgz", "results.json", "table.txt"]
    with tarfile.open(call1.log / "logs.tgz") as t:
        names = set(t.getnames())
    for variant in ("sdpa", "varlen", "sdpa+compile"):
        assert {f"log/profile-{variant}/summary.txt", f"log/profile-{variant}/trace.json.gz"} <= names
    assert {"log/trl.log", "log/e2e.log", "log/profile.log"} <= names
    table = (call1.log / "table.txt").read_text().strip()
    assert call1.proc.stdout.strip().endswith(table)  # the table is the last thing printed


def test_call1_rows_and_profiles(call1):
    e, p = call1.results["e2e"], call1.results["profile"]
    # plain DPO: step 1 is ln 2 (no NLL term), to the parity target's 2e-3: train.bf16 is auto (bf16 autocast on CPUs with
    # native bf16, as on the GPU), and the compiled layers round in other places than the eager reference scorer
    assert e["ok"] and abs(e["loss_first_minus_ln2"]) < 2e-3
    row = e["row"]
    assert row["source"] == "MLflow" and row["steps"] == 2 and row["tokens_per_s"] > 0 and row["model_tflops_per_s"] > 0
    assert row["mfu"] is None and 0 < row["mfu_effective"] < 1  # no datasheet peak on a CPU; the measured one
    assert row["compile_seconds"] > 0  # the worker compiled its layers (train.compile through Ray Train, to MLflow)
    trl = call1.results["trl"]["rows"]["trl-pre"]
    assert trl["tokens_per_s"] > 0 and trl["model_tflops_per_s"] > 0
    for variant in ("sdpa", "varlen", "sdpa+compile"):
        assert p[variant]["timed_step_seconds"] > 0 and p[variant]["kernel_calls"] > 0
    assert p["sdpa+compile"]["compile"]["recompiles"] == 0 and p["sdpa+compile"]["compile"]["compile_graphs"] > 0
    assert p["sdpa+compile"]["kernel_calls"] < p["sdpa"]["kernel_calls"]  # the layers' elementwise ops fused


def test_the_row_without_summary_or_store(call1, tmp_path):
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu_check

    args = SimpleNamespace(device="cpu", work=call1.work)
    s = gpu_check.sizes("cpu")
    out, console = call1.work / "e2e", call1.work / "e2e" / "console.log"
    found = gpu_check._row(args, s, call1.work / "tiny-llama", out, None, console)  # a cut run: its latest MLflow run
    assert found["source"] == "MLflow" and found["tokens"] == call1.results["e2e"]["row"]["tokens"]
    lines = gpu_check._row(args, s, call1.work / "tiny-llama", tmp_path, None, console)  # no store: the step lines
    assert lines["source"].startswith("console step lines") and lines["steps"] == 2 and lines["tokens_per_s"] > 0
