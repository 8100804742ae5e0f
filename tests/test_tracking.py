"""MLflow tracking against a real `mlflow server`: the server dies mid-run and the run goes on."""
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import MlflowServer, small_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def test_server_dies_mid_run_training_goes_on_and_losses_are_reported(tmp_path, cache_dir, small_pairs, demo_model, mlflow_server):
    from mlflow.tracking import MlflowClient

    sets = small_config(tmp_path, cache_dir, small_pairs, **{"mlflow.tracking_uri": mlflow_server.uri, "train.max_steps": "null",
                                                             "train.epochs": "1", "train.checkpoint_every": "10", "train.log_every": "10"})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "run", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    storage = tmp_path / "out" / "ray_train"

    def kill_server_after_first_checkpoint():
        deadline = time.time() + 400
        while time.time() < deadline:
            if [p for p in storage.glob("*/checkpoint_*") if p.is_dir()]:
                mlflow_server.stop()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_server_after_first_checkpoint, daemon=True)
    killer.start()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    killer.join(timeout=1)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert mlflow_server.proc.poll() is not None  # the server really was gone
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    total = summary["train"]["steps"]
    assert total == summary["data"]["train_rows"] // 4 and (tmp_path / "out" / "model" / "model.safetensors").exists()
    assert summary["mlflow_values_lost"] > 0 and "metric values lost after 3 tries" in out

    # back up on the same store: what was written before the failure is there, the rest is missing, not invented
    revived = MlflowServer(mlflow_server.root, port=mlflow_server.port).start()
    try:
        steps = {m.step for m in MlflowClient(revived.uri).get_metric_history(summary["mlflow_run_id"], "train/loss")}
        assert steps and steps == set(range(1, max(steps) + 1)) and max(steps) < total
    finally:
        revived.stop()
