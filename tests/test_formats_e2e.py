"""`dpo-ray run` on the data people have, end to end: one directory with every layout (mixed in one JSONL file) and
every file type, plus LLaMA-Factory's own JSON arrays from ../shared as they ship; and what MLflow shows of it: the
files as dataset inputs (content-hash digests, counts, layouts), system metrics from the driver and the rank-0 train
worker, and the eval_pairs.json table."""
import gzip
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import ROOT, SHARED, small_config

pytestmark = pytest.mark.slow
LLAMAFACTORY = [SHARED / "llamafactory" / n for n in ("dpo_en_demo.json", "dpo_zh_demo.json")]


def as_layouts(pair: dict) -> dict[str, dict]:
    """One demo pair (whole conversations) written in each of the six layouts."""
    C, R = pair["chosen"], pair["rejected"]
    P, c, r = C[:-1], C[-1]["content"], R[-1]["content"]
    q = P[-1]["content"]
    to_from = {"system": "system", "user": "human", "assistant": "gpt"}
    return {
        "standard": {"prompt": q, "chosen": c, "rejected": r},
        "standard_implicit": {"chosen": f"User: {q}\nAssistant: {c}", "rejected": f"User: {q}\nAssistant: {r}"},
        "conversational": {"prompt": P, "chosen": [C[-1]], "rejected": [R[-1]]},
        "conversational_implicit": {"chosen": C, "rejected": R},
        "ultrafeedback": {"prompt": q, "prompt_id": hashlib.md5(q.encode()).hexdigest(), "chosen": C, "rejected": R,
                          "score_chosen": 8.0, "score_rejected": 2.0},
        "sharegpt": {"conversations": [{"from": to_from[m["role"]], "value": m["content"]} for m in P],
                     "chosen": {"from": "gpt", "value": c}, "rejected": {"from": "gpt", "value": r}},
    }


@pytest.fixture(scope="module")
def formats_run(tmp_path_factory, demo_model):
    from dpo_ray.demo import DEMO_DATA

    tmp = tmp_path_factory.mktemp("formats")
    data = tmp / "data"
    data.mkdir()
    pairs = [json.loads(x) for x in DEMO_DATA.read_text().splitlines()[:360]]
    names = list(as_layouts(pairs[0]))
    mixed = [as_layouts(p)[names[i % 6]] for i, p in enumerate(pairs[:180])]  # one file, six layouts, row by row
    (data / "mixed.jsonl").write_text("".join(json.dumps(x) + "\n" for x in mixed))
    pq.write_table(pa.Table.from_pylist([as_layouts(p)["ultrafeedback"] for p in pairs[180:240]]), data / "train-00000-of-00001.parquet")
    (data / "sharegpt.json.gz").write_bytes(gzip.compress(json.dumps([as_layouts(p)["sharegpt"] for p in pairs[240:300]], indent=2).encode()))
    (data / "implicit.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(as_layouts(p)["standard_implicit"]) + "\n" for p in pairs[300:360]).encode()))
    files = sorted(data.iterdir()) + [f for f in LLAMAFACTORY if f.exists()]

    cache = tmp / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(demo_model, cache / "models" / Path(demo_model).name)
    sets = small_config(tmp, cache, data, **{"data.train": json.dumps([str(data)] + [str(f) for f in LLAMAFACTORY if f.exists()]),
                                             "data.max_length": "128"})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "run", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # MLflow's own setting: samples every second in this short run
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return files, json.loads((tmp / "out" / "summary.json").read_text()), proc


def test_every_layout_and_file_type_is_read_and_trained_on(formats_run):
    files, s, _ = formats_run
    per_file = {Path(f["file"]).name: f for f in s["data"]["per_file"]}
    assert per_file["mixed.jsonl"]["layouts"] == {name: 30 for name in ("standard", "standard_implicit", "conversational",
                                                                       "conversational_implicit", "ultrafeedback", "sharegpt")}
    assert per_file["train-00000-of-00001.parquet"]["layouts"] == {"ultrafeedback": 60}
    assert per_file["sharegpt.json.gz"]["layouts"] == {"sharegpt": 60}
    assert per_file["implicit.jsonl.gz"]["layouts"] == {"standard_implicit": 60}
    for f in files:
        counts = per_file[f.name]
        assert counts["rows_used"] > 0 and counts["rows_read"] == counts["rows_used"] + counts["rows_rejected"] + counts["duplicates"]
    for f in LLAMAFACTORY:  # the JSON arrays LLaMA-Factory ships, read as they are
        if f.exists():
            assert per_file[f.name]["rows_read"] == 300 and per_file[f.name]["rows_rejected"] == 0
            assert per_file[f.name]["layouts"] == {"sharegpt": 300}  # valid rows, duplicates included
    assert s["train"]["steps"] == 6 and s["train"]["loss_last"] < s["train"]["loss_first"]
    assert s["eval"]["pairs"] == s["data"]["eval_rows"]


def test_mlflow_shows_the_files_system_metrics_and_the_eval_pairs(formats_run):
    from mlflow.tracking import MlflowClient

    files, s, _ = formats_run
    client = MlflowClient(s["tracking_uri"])
    run = client.get_run(s["mlflow_run_id"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {f.name for f in files}
    per_file = {Path(f["file"]).name: f for f in s["data"]["per_file"]}
    for f in files:
        d = inputs[f.name]
        assert d.dataset.digest == hashlib.sha256(f.read_bytes()).hexdigest()[:16]  # the file's content hash
        assert json.loads(d.dataset.source)["uri"] == str(f.resolve())
        assert {(t.key, t.value) for t in d.tags} == {("mlflow.data.context", "training")}
        profile = json.loads(d.dataset.profile)
        assert profile["num_rows"] == profile["rows_used"] + profile["rows_rejected"] + profile["duplicates"] > 0 and profile["layouts"]
        assert profile["rows_used"] == per_file[f.name]["rows_used"]

    for node in ("driver", "train_rank0"):  # MLflow's own sampler, from both processes
        for name in ("cpu_utilization_percentage", "system_memory_usage_megabytes"):
            history = client.get_metric_history(run.info.run_id, f"system/{node}/{name}")
            assert len(history) >= 2 and all(m.value >= 0 for m in history), (node, name)

    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_pairs.json")).read_text())
    assert table["columns"] == ["row_id", "prompt", "chosen", "rejected", "reference_logp_margin", "policy_logp_margin",
                                "reward_margin", "prefers_chosen"]
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == s["data"]["eval_rows"] and len({r["row_id"] for r in rows}) == len(rows)
    assert all(r["chosen"] and r["rejected"] and len(r["prompt"]) <= 301 for r in rows)
    margins = [r["reward_margin"] for r in rows]
    assert margins == sorted(margins)  # the pairs the model gets most wrong first
    assert {r["prefers_chosen"] for r in rows} <= {0.0, 0.5, 1.0}
    assert all(r["prefers_chosen"] == (1.0 if r["reward_margin"] > 0 else 0.0) for r in rows if r["prefers_chosen"] != 0.5)
    accuracy = sum(r["prefers_chosen"] for r in rows) / len(rows)
    assert accuracy == pytest.approx(s["eval"]["rewards/accuracies"], abs=1e-9)  # ties count 0.5 in both
    beta = 0.1
    assert all(r["reward_margin"] == pytest.approx(beta * (r["policy_logp_margin"] - r["reference_logp_margin"]), rel=1e-3, abs=1e-4)
               for r in rows)
