"""The pipeline end to end on a real local Ray runtime and a real MLflow sqlite store.

One `dpo-ray run` through the console script (as a user runs it), then in-process reruns that must
reuse the prepared data and reference cache and resume training from its storage path.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from conftest import small_config

pytestmark = pytest.mark.slow
TRL_NAMES = ["loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected", "grad_norm", "learning_rate", "tokens_per_second"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, small_pairs, demo_model):
    tmp = tmp_path_factory.mktemp("cli")
    cache = tmp / "cache"  # this module's own cache (other modules score the same data): the first run must miss
    (cache / "models").mkdir(parents=True)
    os.symlink(demo_model, cache / "models" / Path(demo_model).name)
    sets = small_config(tmp, cache, small_pairs, **{"eval.generate.prompts": "8", "eval.generate.max_new_tokens": "12",
                                                   "eval.judge.function": "tests.judges_for_tests:words"}) + ["model.hf_token=hf_s3cret_value"]
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "run", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return tmp, sets, json.loads((tmp / "out" / "summary.json").read_text()), proc


def small_pairs_lines(cfg) -> list[str]:
    return Path(cfg.data.train[0]).read_text().splitlines(keepends=True)


def test_summary_contract(cli_run):
    tmp, _, s, proc = cli_run
    assert set(s) >= {"mlflow_run_id", "tracking_uri", "model_dir", "reference_model_dir", "data", "reference_cache", "train", "eval"}
    d = s["data"]
    assert d["rows_read"] == 240 and d["rows_used"] + d["rows_rejected"] + d["duplicates"] == 240
    assert d["rows_rejected"] == 2 and d["rejects_by_reason"] == {"identical_replies": 1, "invalid_json": 1}
    assert [json.loads(x)["line"] for x in Path(d["rejects_file"]).read_text().splitlines()] == [101, 201]
    assert "set aside 2 of 240 rows" in proc.stderr + proc.stdout
    assert s["reference_cache"]["hit"] is False and Path(s["reference_cache"]["path"]).is_dir()
    assert s["train"]["steps"] == 6 and s["train"]["loss_first"] == pytest.approx(0.6931, abs=2e-3)  # policy == reference at step 1
    assert s["train"]["loss_last"] < s["train"]["loss_first"] and s["train"]["tokens_per_second"] > 0
    assert 100 < s["train"]["host_memory_peak_mb"] < 8000 and s["train"]["gpu_peak_memory_mb"] is None  # the worker's peak RSS; no GPU
    assert 0.0 <= s["eval"]["rewards/accuracies"] <= 1.0
    # the reference scored against its own cache: chance accuracy, zero margin
    assert s["eval_reference"]["rewards/accuracies"] == 0.5 and abs(s["eval_reference"]["rewards/margins"]) < 1e-4
    assert "step 6/6 | loss" in proc.stderr + proc.stdout and "ETA" in proc.stderr + proc.stdout
    # the console tells dpo-ray's story; Ray Data's progress dumps (stdout is not a terminal here) are in the log file
    assert "prepare: finished in" in proc.stderr and "Running Dataset" not in proc.stderr + proc.stdout
    assert "reward accuracy" in proc.stdout and "mlflow ui --backend-store-uri" in proc.stdout
    assert "Running Dataset" in next((tmp / "out" / "logs").glob("run-*.log")).read_text()
    # the generations beside the reference's and the judge's win rate (tests.judges_for_tests, imported from the working dir)
    assert s["eval"]["generation/prompts"] == 8 and 0.0 <= s["eval"]["win_rate"] <= 1.0 and s["eval"]["judge/prompts"] == 8
    assert "generations: 8 prompts" in proc.stdout and "generate: finished in" in proc.stderr
    assert re.search(r"win rate [\d.]+ \[[\d.]+, [\d.]+\] over the reference by the judge, p [\d.e-]+ \(95% interval", proc.stdout), proc.stdout


def test_exported_model_loads_with_transformers(cli_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, _, s, _ = cli_run
    model = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    tok = AutoTokenizer.from_pretrained(s["model_dir"])
    assert (Path(s["model_dir"]) / "model.safetensors").exists() and tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(s["reference_model_dir"])
    moved = sum((a - b).abs().sum().item() for a, b in zip(model.parameters(), base.parameters()))
    assert moved > 0  # training changed the weights the reference still has


def test_mlflow_run_has_metrics_params_and_artifacts(cli_run):
    from mlflow.tracking import MlflowClient

    _, _, s, _ = cli_run
    client = MlflowClient(s["tracking_uri"])
    run = client.get_run(s["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    for name in TRL_NAMES:
        assert len(client.get_metric_history(run.info.run_id, f"train/{name}")) == 6, name
    peaks = [m.value for m in client.get_metric_history(run.info.run_id, "train/host_memory_peak_mb")]
    assert len(peaks) == 6 and peaks == sorted(peaks) and peaks[-1] == pytest.approx(s["train"]["host_memory_peak_mb"])  # a running peak
    assert run.data.metrics["eval/rewards/accuracies"] == pytest.approx(s["eval"]["rewards/accuracies"])
    assert run.data.params["train.beta"] == "0.1" and run.data.tags["dataset_fingerprint"] == s["data"]["key"]
    assert run.data.metrics["data/rows_rejected"] == 2
    # a secret-looking config value never reaches MLflow or the saved config
    assert run.data.params["model.hf_token"] == "***"
    config_text = Path(client.download_artifacts(run.info.run_id, "config.yaml")).read_text()
    assert "hf_s3cret_value" not in config_text and "hf_s3cret_value" not in (Path(s["output_dir"]) / "config.yaml").read_text()
    assert run.data.tags["reference_cache_key"] == s["reference_cache"]["key"]
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "data_stats.json", "summary.json", "rejects.jsonl"} <= arts
    # the model: an MLflow transformers model, the run's one Logged model, with the run's eval metrics
    [model] = client.search_logged_models([run.info.experiment_id])
    assert model.source_run_id == run.info.run_id and model.name == "model" and model.status.name == "READY"
    assert {m.key: m.value for m in model.metrics}["eval/rewards/accuracies"] == pytest.approx(s["eval"]["rewards/accuracies"])
    assert {m.key: m.value for m in model.metrics}["eval/win_rate"] == pytest.approx(s["eval"]["win_rate"])  # generation metrics too
    assert {"MLmodel", "model", "components"} <= {a.path for a in client.list_logged_model_artifacts(model.model_id)}
    assert "model/model.safetensors" in {a.path for a in client.list_logged_model_artifacts(model.model_id, "model")}
    table = json.loads(Path(client.download_artifacts(run.info.run_id, "eval_generations.json")).read_text())
    rows = [dict(zip(table["columns"], r)) for r in table["data"]]
    assert len(rows) == 8 and {"prompt", "chosen", "reference", "policy", "judge_policy", "judge_reference", "verdict"} <= set(rows[0])
    assert run.data.metrics["eval/win_rate"] == pytest.approx(
        sum(1.0 if r["judge_policy"] > r["judge_reference"] else 0.0 if r["judge_policy"] < r["judge_reference"] else 0.5 for r in rows) / 8)
    assert run.data.metrics["eval/generation/tokens_per_second"] > 0 and "eval/generation/length_reference" in run.data.metrics
    m = run.data.metrics  # the win rate's 95% interval and sign test, beside it in MLflow and the summary
    assert m["eval/win_rate_ci_low"] <= m["eval/win_rate"] <= m["eval/win_rate_ci_high"] and 0 < m["eval/win_rate_p"] <= 1
    assert m["eval/win_rate_ci_high"] == pytest.approx(s["eval"]["win_rate_ci_high"])


def test_cached_reference_logps_equal_a_direct_forward(cli_run):
    from transformers import AutoModelForCausalLM

    from dpo_ray.forward import autocast, use_bf16

    _, _, s, _ = cli_run
    table = pq.read_table(Path(s["reference_cache"]["path"]) / "train").slice(0, 5)
    model = AutoModelForCausalLM.from_pretrained(s["reference_model_dir"]).eval()
    bf16 = use_bf16("auto", "cpu")  # the reference is scored in the policy's numerics: bf16 autocast where training uses it
    for row in table.to_pylist():
        for side in ("chosen", "rejected"):
            ids = torch.tensor([row[f"{side}_input_ids"]])
            with torch.no_grad(), autocast(bf16, "cpu"):  # one sequence alone, plain forward, full logits
                lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
            mask = row[f"{side}_loss_mask"]
            want = sum(lp[t - 1, ids[0, t]].item() for t in range(1, len(mask)) if mask[t])
            # fp32: only summation order differs; bf16: the packed batch rounds differently from one sequence alone
            assert row[f"ref_{side}_logps"] == pytest.approx(want, abs=2e-3, rel=1e-3 if bf16 else 1e-5)


def test_rerun_reuses_caches_and_resumes_training(cli_run, ray_local):
    from mlflow.tracking import MlflowClient

    from dpo_ray.config import load_config
    from pipeline.run import run

    tmp, sets, first, _ = cli_run
    cfg = load_config("configs/demo.yaml", sets)
    again = run(cfg)
    assert again["data"]["hit"] and again["reference_cache"]["hit"]
    assert again["reference_cache"]["key"] == first["reference_cache"]["key"]
    assert again["train"]["steps"] == 6
    # resumed from the final checkpoint in its storage path: no step was trained again
    assert MlflowClient(again["tracking_uri"]).get_metric_history(again["mlflow_run_id"], "train/loss") == []
    assert again["eval"]["rewards/accuracies"] == pytest.approx(first["eval"]["rewards/accuracies"], abs=1e-6)
    # a new file next to the old one: only the new file is tokenized and scored
    extra = tmp / "extra.jsonl"
    extra.write_text("".join(small_pairs_lines(cfg)[:60]).replace("Tell me", "Please tell me"))
    grown = run(load_config("configs/demo.yaml", sets + [f"data.train=[{cfg.data.train[0]}, {extra}]"]), stages=("prepare", "reference"))
    assert [f["hit"] for f in grown["data"]["files"]] == [True, False]
    assert grown["reference_cache"]["parts"][0] == first["reference_cache"]["path"] and len(grown["reference_cache"]["parts"]) == 2
    assert not grown["reference_cache"]["hit"] and grown["data"]["rows_read"] == 240 + 60
    # a different max_length is different prepared data: a new key all the way down
    changed = run(load_config("configs/demo.yaml", sets + ["data.max_length=80"]), stages=("prepare", "reference"))
    assert not changed["data"]["hit"] and changed["reference_cache"]["key"] != first["reference_cache"]["key"]


def test_other_losses_train_from_the_same_reference_cache(cli_run, ray_local):
    """Switching the loss never runs the reference model again: a weighted list (MPO) with WPO, LD-DPO (from the cache's
    split sums) and an f-divergence trains and evaluates; a sorted loss (aot, batch-coupled) runs over token-budget
    micro-batches (two passes) and starts at ln 2 like DPO."""
    import math

    from mlflow.tracking import MlflowClient

    from dpo_ray.config import load_config
    from pipeline.run import run

    tmp, sets, first, _ = cli_run
    mixed = run(load_config("configs/demo.yaml", sets + [f"output_dir={tmp / 'out-mpo'}", "train.loss_type=[sigmoid,hinge,sft]",
                                                         "train.loss_weights=[0.8,0.2,1.0]", "train.use_weighting=true",
                                                         "train.ld_alpha=0.5", "train.f_divergence_type=js_divergence"]))
    assert mixed["reference_cache"]["hit"] and mixed["reference_cache"]["key"] == first["reference_cache"]["key"]
    client = MlflowClient(mixed["tracking_uri"])
    for term in ("sigmoid", "hinge", "sft"):
        assert len(client.get_metric_history(mixed["mlflow_run_id"], f"train/loss/{term}")) == 6, term
    metrics = client.get_run(mixed["mlflow_run_id"]).data.metrics
    assert {"eval/loss/sigmoid", "eval/loss/hinge", "eval/loss/sft"} <= set(metrics)
    assert metrics["eval/loss"] == pytest.approx(0.8 * metrics["eval/loss/sigmoid"] + 0.2 * metrics["eval/loss/hinge"] + metrics["eval/loss/sft"])
    assert mixed["eval"]["rewards/accuracies"] != first["eval"]["rewards/accuracies"] or mixed["eval"]["rewards/margins"] != first["eval"]["rewards/margins"]
    aot = run(load_config("configs/demo.yaml", sets + [f"output_dir={tmp / 'out-aot'}", "train.loss_type=aot",
                                                       "train.max_tokens_per_micro_batch=120", "train.max_steps=3"]),
              stages=("prepare", "reference", "train"))
    assert aot["reference_cache"]["hit"] and aot["train"]["steps"] == 3
    assert aot["train"]["loss_first"] == pytest.approx(math.log(2), abs=2e-3)


def test_damaged_reference_cache_is_named_and_recomputed(cli_run, ray_local, caplog):
    """As a user found it after a demo run: the reference split's Parquet cut in half, then removed. Each is reported in
    one line naming the file, and that split is scored again; training reads the recomputed cache."""
    import logging

    from dpo_ray.config import load_config
    from pipeline.run import run

    tmp, sets, first, _ = cli_run
    cfg = load_config("configs/demo.yaml", sets)
    split = Path(first["reference_cache"]["path"]) / "train"
    want = pq.read_table(split).sort_by("row_id")
    victim = sorted(split.glob("*.parquet"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        again = run(cfg, stages=("prepare", "reference"))
    assert f"cache: {victim} is damaged (" in caplog.text and "that part of the cache is recomputed" in caplog.text
    assert again["data"]["hit"] and not again["reference_cache"]["hit"] and again["reference_cache"]["path"] == first["reference_cache"]["path"]
    got = pq.read_table(split).sort_by("row_id")
    # the same fp32 sums, up to the shapes of the packed forwards: the recomputed split's Ray Data blocks (and so each
    # pair's batch-mates) need not be the first pass's, and CPU GEMMs round by shape (CI saw 2.4e-5 relative on 4 of 213)
    assert got["row_id"].equals(want["row_id"]) and got["ref_chosen_logps"].to_numpy() == pytest.approx(want["ref_chosen_logps"].to_numpy(), rel=1e-4)

    victim = sorted(split.glob("*.parquet"))[0]
    victim.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        trained = run(cfg, stages=("prepare", "reference", "train"))
    assert f"cache: {victim} is missing" in caplog.text and not trained["reference_cache"]["hit"]
    assert trained["train"]["steps"] == 6 and pq.read_table(split).num_rows == want.num_rows
