"""Scheduled retraining and the MLflow Model Registry, against a real `mlflow server` on 127.0.0.1.

First run: a base model trains and becomes the champion. A new data file arrives: `retrain` starts from
models:/NAME@champion, registers a challenger, compares it with the champion on the same eval set, moves
the alias. The same inputs again: nothing to do. An overlapping invocation is refused by the lock.
"""
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import small_config
from dpo_ray.config import load_config
from pipeline.artifacts import LockedError

pytestmark = pytest.mark.slow
NAME = "dpo-test"


def rest(server, method, path, body=None):
    req = urllib.request.Request(server.uri + path, method=method, data=json.dumps(body).encode() if body else None,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_register_retrain_promote_and_lock(tmp_path, cache_dir, small_pairs, demo_model, ray_local, mlflow_server):
    import mlflow
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    from pipeline.run import run

    data = tmp_path / "incoming"
    data.mkdir()
    lines = small_pairs.read_text().splitlines(keepends=True)
    (data / "day1.jsonl").write_text("".join(lines[:120]))
    base = small_config(tmp_path, cache_dir, data, **{"mlflow.tracking_uri": mlflow_server.uri, "registry.name": NAME,
                                                      "mlflow.experiment": "retrain"})
    first = run(load_config("configs/demo.yaml", base))
    reg = first["registry"]
    assert reg["decision"] == "promoted" and reg["champion_version"] is None and reg["challenger_version"] == "1"

    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias(NAME, "champion").version == "1"
    run1 = client.get_run(first["mlflow_run_id"])
    assert run1.info.status == "FINISHED" and run1.data.tags["registry.decision"] == "promoted"
    assert {"model", "config.yaml", "curves.png", "summary.json"} <= {a.path for a in client.list_artifacts(run1.info.run_id)}
    assert run1.info.run_name.startswith("tiny-llama-data") and "-sigmoid-b0.1-lr0.003" in run1.info.run_name
    # the same facts through the REST API
    alias = rest(mlflow_server, "GET", f"/api/2.0/mlflow/registered-models/alias?name={NAME}&alias=champion")
    assert alias["model_version"]["version"] == "1" and alias["model_version"]["run_id"] == first["mlflow_run_id"]
    found = rest(mlflow_server, "POST", "/api/2.0/mlflow/runs/search", {"experiment_ids": [run1.info.experiment_id]})
    metrics = {m["key"]: m["value"] for m in found["runs"][0]["data"]["metrics"]}
    assert metrics["eval/rewards/accuracies"] == pytest.approx(first["eval"]["rewards/accuracies"]) and "train/loss" in metrics

    # the registered champion is a plain HF directory
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(mlflow_server.uri)  # as a user loads it: tracking URI set, then a models:/ URI
    try:
        path = mlflow.artifacts.download_artifacts(f"models:/{NAME}@champion", dst_path=str(tmp_path / "dl"))
    finally:
        mlflow.set_tracking_uri(previous)
    AutoModelForCausalLM.from_pretrained(path)

    # new data arrives; the scheduler retrains from the champion
    (data / "day2.jsonl").write_text("".join(lines[120:]))
    retrain_sets = base + [f"model.policy=models:/{NAME}@champion", "output_dir=" + str(tmp_path / "retrain")]
    second = run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    reg = second["registry"]
    assert reg["challenger_version"] == "2" and reg["champion_version"] == "1"
    assert reg["champion_score"] == 0.5  # the champion is this run's reference: chance by construction
    want = "promoted" if reg["challenger_score"] >= 0.5 else "kept_champion"
    assert reg["decision"] == want and client.get_model_version_by_alias(NAME, "champion").version == ("2" if want == "promoted" else "1")
    assert client.get_model_version_by_alias(NAME, "challenger").version == "2"
    assert second["data"]["rows_read"] == 240 and second["reference_model_dir"].endswith(f"{NAME}-v1")
    run2 = client.get_run(second["mlflow_run_id"])
    assert run2.info.run_name.startswith(f"{NAME}@champion-data")
    assert run2.data.metrics["registry/champion_score"] == 0.5 and run2.data.tags["registry.decision"] == want

    # the same inputs again (the starting model now being the champion that retrain produced): nothing to do
    scored = sorted((cache_dir / "reference").iterdir())
    third = run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    assert sorted((cache_dir / "reference").iterdir()) == scored  # not even the new champion's reference pass
    assert third["skipped"] and len(client.search_model_versions(f"name='{NAME}'")) == 2

    # an overlapping invocation is refused and changes nothing
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from pipeline.artifacts import exclusive\n"
        f"with exclusive(Path({str(tmp_path / 'retrain')!r})):\n    print('held', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError, match=r"in use by another dpo-ray run \(pid \d+ since"):
            run(load_config("configs/demo.yaml", retrain_sets), retrain=True)
    finally:
        holder.kill()
        holder.wait()
    assert len(client.search_model_versions(f"name='{NAME}'")) == 2
