"""Faults injected for real: a training worker killed with SIGKILL, a driver killed during the reference
stage, a diverging run, writers killed mid-write. Real Ray (2 CPUs), real files, real processes."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import small_config
from dpo_ray.config import load_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ref_cache(tmp_path_factory, ray_local, cache_dir, small_pairs, demo_model):
    from pipeline import prepare, reference
    from pipeline.context import Context

    tmp = tmp_path_factory.mktemp("faults")
    cfg = load_config(None, small_config(tmp, cache_dir, small_pairs))
    ctx = Context.for_models(cfg, demo_model, rejects_file=tmp / "rejects.jsonl")
    return cfg, reference.score_reference(cfg, ctx, prepare.prepare_pairs(cfg, ctx))


def pids_of(pattern: str) -> list[int]:
    """Processes matching `pattern` that descend from this test process (its own Ray runtime's workers), so that a
    second Ray job on the same machine (another test run, a user's run) is never touched."""
    out = subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True, text=True).stdout
    parent, args = {}, {}
    for line in out.splitlines():
        pid, ppid, *rest = line.split(None, 2)
        parent[int(pid)], args[int(pid)] = int(ppid), rest[0] if rest else ""

    def ours(pid: int) -> bool:
        while pid > 1:
            if pid == os.getpid():
                return True
            pid = parent.get(pid, 1)
        return False

    return [pid for pid, a in args.items() if pattern in a and "ps -eo" not in a and ours(pid)]


def kill_workers_after_first_checkpoint(storage: Path, timeout: float = 300) -> tuple[threading.Thread, list[int]]:
    """A thread that SIGKILLs this test's Ray Train workers once a checkpoint under `storage` has its state.json;
    returns it (started) and the list of the pids it killed."""
    killed: list[int] = []

    def watch():
        deadline = time.time() + timeout
        while time.time() < deadline and not killed:
            if [p for p in storage.glob("*/checkpoint_*") if (p / "state.json").exists()]:
                for pid in pids_of("RayTrainWorker"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher, killed


def train(cfg, ref, demo_model, tracking=(None, None)):
    from pipeline.context import Context
    from pipeline.train import fit

    uri, run_id = tracking
    return fit(cfg, Context.for_models(cfg, demo_model, uri=uri), ref, run_id)


def test_killed_worker_resumes_to_the_same_weights(ref_cache, demo_model, tmp_path):
    from mlflow.tracking import MlflowClient

    from dpo_ray.tracking import ensure_experiment

    cfg, ref = ref_cache
    # killed after step 20 (in epoch 1), the resumed run crosses into epoch 2
    sets = {"train.epochs": 2, "train.max_steps": None, "train.checkpoint_every": 20, "train.max_failures": 1}
    straight_cfg = cfg.model_copy(deep=True)
    killed_cfg = cfg.model_copy(deep=True)
    for c, out in ((straight_cfg, tmp_path / "straight"), (killed_cfg, tmp_path / "killed")):
        c.output_dir = str(out)
        for k, v in sets.items():
            setattr(c.train, k.split(".")[1], v)
    straight = train(straight_cfg, ref, demo_model)
    assert straight.error is None

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = MlflowClient(uri).create_run(ensure_experiment(uri, "faults")).info.run_id
    watcher, killed = kill_workers_after_first_checkpoint(tmp_path / "killed" / "ray_train")
    result = train(killed_cfg, ref, demo_model, (uri, run_id))
    watcher.join(timeout=1)
    assert killed, "no training worker was found to kill"
    assert result.error is None and result.metrics["step"] == straight.metrics["step"]

    with straight.checkpoint.as_directory() as a, result.checkpoint.as_directory() as b:
        wa, wb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=0)

    history = MlflowClient(uri).get_metric_history(run_id, "train/loss")
    steps = [m.step for m in history]
    assert sorted(set(steps)) == list(range(1, result.metrics["step"] + 1))  # one continuous history
    assert len(steps) > len(set(steps))  # the steps after the checkpoint were run (and logged) twice
    by_step = {}
    for m in history:
        by_step.setdefault(m.step, set()).add(round(m.value, 6))
    assert all(len(v) == 1 for v in by_step.values())  # and gave the same loss both times


def test_nonfinite_steps_stop_the_run_and_keep_the_last_good_checkpoint(ref_cache, demo_model, tmp_path):
    from pipeline.train import TrainingError

    cfg, ref = ref_cache
    cfg = cfg.model_copy(deep=True)
    cfg.output_dir = str(tmp_path)
    cfg.train.lr, cfg.train.warmup_ratio, cfg.train.checkpoint_every, cfg.train.max_nonfinite_steps = 1e30, 0.0, 1, 2
    cfg.train.max_steps = 20
    with pytest.raises(TrainingError, match="2 consecutive non-finite steps, the last at step 3"):
        train(cfg, ref, demo_model)
    ckpts = sorted(p for p in (tmp_path / "ray_train").glob("*/checkpoint_*") if p.is_dir())
    assert ckpts
    last = json.loads((ckpts[-1] / "state.json").read_text())
    assert last["step"] == 1
    weights = load_file(str(ckpts[-1] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_driver_killed_during_reference_leaves_nothing_half_done(tmp_path, cache_dir, small_pairs, demo_model, ray_local):
    from pipeline.run import run

    sets = small_config(tmp_path, tmp_path / "cache", small_pairs, **{"data.eval_fraction": "0.3"})
    shutil_models = tmp_path / "cache" / "models"
    shutil_models.mkdir(parents=True)
    os.symlink(Path(demo_model), shutil_models / Path(demo_model).name)
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "reference", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ref_root = tmp_path / "cache" / "reference"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(ref_root.glob("*/.tmp-eval-*")):  # the one pass over both splits began
            assert proc.poll() is None, "the reference stage ended before it could be killed"
            time.sleep(0.05)
        time.sleep(0.5)
        assert not list(ref_root.glob("*/_COMPLETE")), "the pass finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    (key_dir,) = list(ref_root.iterdir())
    assert not (key_dir / "_COMPLETE").exists()
    assert not any((key_dir / split / "_COMPLETE").exists() for split in ("train", "eval"))  # nothing says it finished

    s = run(load_config(None, sets), stages=("prepare", "reference"))
    assert s["reference_cache"]["path"] == str(key_dir) and not s["reference_cache"]["hit"]
    assert (key_dir / "_COMPLETE").exists() and all((key_dir / split / "_COMPLETE").exists() for split in ("train", "eval"))
    # what the killed run left is only .tmp-* directories, names no reader takes for a finished split
    assert {p.name for p in key_dir.iterdir() if not p.name.startswith(".tmp-")} == {"train", "eval", "key.json", "_COMPLETE"}
    assert any(p.name.startswith(".tmp-") for p in key_dir.iterdir())
    # a damaged split is scored again alone; the finished one is reused as it is
    train_files = {f: f.stat().st_mtime_ns for f in (key_dir / "train").iterdir()}
    (next((key_dir / "eval").glob("*.parquet"))).write_bytes(b"damaged")
    s = run(load_config(None, sets), stages=("prepare", "reference"))
    assert not s["reference_cache"]["hit"] and (key_dir / "eval" / "_COMPLETE").exists()
    assert {f: f.stat().st_mtime_ns for f in (key_dir / "train").iterdir()} == train_files  # reused, not recomputed

WRITER = """
import sys, time
from pathlib import Path
from pipeline.artifacts import atomic_dir, write_json_atomic
out = Path(sys.argv[1])
if sys.argv[2] == "json":
    i = 0
    while True:
        write_json_atomic(out, {"i": i, "blob": "x" * 200000}); i += 1
else:
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"0" * 1000)
        print("writing", flush=True)
        time.sleep(60)
"""


def test_outputs_are_never_seen_half_written(tmp_path):
    target = tmp_path / "summary.json"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), "json"], cwd=ROOT)
    try:
        seen = 0
        deadline = time.time() + 60
        while seen < 300 and time.time() < deadline:
            if target.exists():
                assert json.loads(target.read_text())["blob"] == "x" * 200000  # whole, every time
                seen += 1
        assert seen >= 300
    finally:
        proc.kill()
        proc.wait()
    assert json.loads(target.read_text())["i"] >= 0  # killed mid-loop: the last whole version remains

    model = tmp_path / "models" / "model"  # its own folder: the killed JSON writer may have left a .summary.json.*.tmp
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(model), "dir"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not model.exists()  # only a .tmp-* sibling, which no reader takes for the model
    assert [p.name.startswith(".tmp-model-") for p in model.parent.iterdir()] == [True]
