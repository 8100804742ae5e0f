"""`dpo-ray sweep` on a real local Ray runtime, Ray Tune and a real MLflow sqlite store, with the demo model.

Two sweeps cover the issue's cases: (1) through the console script, a grid over train.beta with one invalid value
(that trial fails, the others go on), interrupted (SIGINT) after its first trial and run again with the same command
(the first trial is not trained again); (2) in-process, ASHA over 4 trials with data.max_length in the grid (prepare and
reference once per distinct value; ASHA stops weak trials and the sweep still ends).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import small_config

STEPS = 4


def sweep_sets(tmp: Path, cache: Path, data: Path, **extra) -> list[str]:
    return small_config(tmp, cache, data, **{"data.max_length": "64", "train.max_steps": str(STEPS), "train.checkpoint_every": "2",
                                             "mlflow.system_metrics": "false", "reference.batch_size": "64", **extra})


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory) -> Path:
    from dpo_ray.demo import DEMO_DATA

    path = tmp_path_factory.mktemp("sweepdata") / "pairs.jsonl"
    with open(DEMO_DATA, encoding="utf-8") as f:
        path.write_text("".join(line for _, line in zip(range(120), f)))
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory, demo_model) -> Path:
    cache = tmp_path_factory.mktemp("sweepcache")  # this module's own: its first pass must score the reference
    (cache / "models").mkdir()
    os.symlink(demo_model, cache / "models" / Path(demo_model).name)
    return cache


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, cache, tiny_pairs):
    """The CLI sweep, interrupted after its first trial finished, then the same command again."""
    tmp = tmp_path_factory.mktemp("grid")
    sets = sweep_sets(tmp, cache, tiny_pairs, **{"registry.name": "sweep-demo"})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "sweep", "configs/demo.yaml", "--grid", "train.beta=[0.05,0.3,-1]"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    root = Path(__file__).parent.parent
    logs = [tmp / "first.log", tmp / "second.log"]
    with open(logs[0], "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
        deadline = time.time() + 600
        # interrupt once Tune has recorded the first trial as completed (its summary.json is written just before that)
        while time.time() < deadline and proc.poll() is None and " completed after " not in logs[0].read_text(errors="replace"):
            time.sleep(1)
        first_done = {p: p.stat().st_mtime_ns for p in (tmp / "out" / "trials").glob("*/summary.json")}
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # as Ctrl+C: Tune saves its state and stops
        rc_first = proc.wait(timeout=300)
    with open(logs[1], "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, timeout=900).returncode
    text = [p.read_text() for p in logs]
    assert rc == 0, text[1][-4000:]
    return tmp, json.loads((tmp / "out" / "sweep_summary.json").read_text()), rc_first, first_done, text


@pytest.mark.slow
def test_grid_sweep_shares_one_reference_pass_and_nests_child_runs(grid_sweep):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    tmp, s, _, _, (first, second) = grid_sweep
    # the reference ran once (in the first invocation), never per trial, and the rerun found it in the cache
    assert first.count("reference: scoring pairs.jsonl (train), pairs.jsonl (eval) with") == 1  # one pass, both splits
    assert "reference: scoring" not in second and "reference: cache hit for pairs.jsonl" in second
    assert s["cost"]["reference_passes"] == 1 and s["cost"]["reference_seconds_one_pass_per_trial"] > 0
    by_beta = {t["overrides"]["train.beta"]: t for t in s["trials"]}
    assert sorted(by_beta) == [-1, 0.05, 0.3]
    # the invalid value fails its own trial with a message naming the key; the others finish
    assert by_beta[-1]["status"] == "ERROR" and "train.beta" in by_beta[-1]["error"]
    ok = [by_beta[b] for b in (0.05, 0.3)]
    assert all(t["status"] == "FINISHED" for t in ok)
    metric = "eval/rewards/accuracies"
    best = max(ok, key=lambda t: t[metric])
    assert s["best"]["trial_id"] == best["trial_id"] and s["best"][metric] == best[metric]

    client = MlflowClient(s["tracking_uri"])
    parent = client.get_run(s["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["space.train.beta"] == "[0.05, 0.3, -1]"
    assert parent.data.tags["best.trial_id"] == best["trial_id"] and parent.data.metrics[f"best/{metric}"] == pytest.approx(best[metric])
    assert {"trials.json", "sweep.png", "space.json", "sweep_summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(float(c.data.params["train.beta"]) for c in children) == [0.05, 0.3]
    for c in children:
        t = next(t for t in ok if t["mlflow_run_id"] == c.info.run_id)
        assert c.info.status == "FINISHED" and c.data.metrics[metric] == pytest.approx(t[metric])
        # every step logged (a trial interrupted mid-training resumed from its checkpoint, so a step may repeat)
        assert {m.step for m in client.get_metric_history(c.info.run_id, "train/loss")} == set(range(1, STEPS + 1))
    model = AutoModelForCausalLM.from_pretrained(s["best"]["model_dir"])
    assert Path(s["best"]["model_dir"]) == tmp / "out" / "best" / "model" and model.num_parameters() > 0
    # the best trial went through the champion/challenger gate from its own run (the first version: promoted)
    assert s["best"]["registry"]["decision"] == "promoted"
    version = client.get_model_version_by_alias("sweep-demo", "champion")
    assert version.run_id == best["mlflow_run_id"]
    # sweep.keep_models=false: the trials' own models are gone, the best's copy stays
    assert not any((tmp / "out" / "trials").glob("*/model"))


@pytest.mark.slow
def test_interrupted_sweep_continues_without_retraining(grid_sweep):
    from mlflow.tracking import MlflowClient

    tmp, s, rc_first, first_done, (first, second) = grid_sweep
    assert rc_first == 130 and "interrupted; run the same command again" in first
    assert len(first_done) >= 1 and "continuing the sweep" in second
    for path, mtime in first_done.items():  # a trial finished before the interrupt was not run again: its record is untouched
        trial = next(t for t in s["trials"] if t["trial_id"] == path.parent.name)
        assert trial["status"] == "FINISHED" and path.stat().st_mtime_ns == mtime
        assert json.loads(path.read_text())["mlflow_run_id"] == trial["mlflow_run_id"]
        assert len(MlflowClient(s["tracking_uri"]).get_metric_history(trial["mlflow_run_id"], "train/loss")) == STEPS  # trained once
    assert len(s["trials"]) == 3  # and no trial was added or run twice


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("DPO_RAY_ASHA_TEST"), reason=(
    "about 5 minutes the suite's 45-minute budget has no room for yet (it passed in 290 s on 2026-12-01 with the "
    "dashboard fix, docs/sweep.md); DPO_RAY_ASHA_TEST=1 runs it"))
def test_asha_stops_trials_early_and_stages_run_once_per_max_length(tmp_path, cache, tiny_pairs):
    """Through the CLI, which starts its runtime with Ray's dashboard when a scheduler is set: Ray Train's cleaner then
    frees a stopped trial's placement group, so the next trial gets its CPU (without the state API it waited for
    ever: ray#54305)."""
    sets = sweep_sets(tmp_path, cache, tiny_pairs, **{"train.max_steps": "6", "sweep.eval_every": "1",
                                                      "sweep.scheduler_metric": "train/loss", "sweep.scheduler_mode": "min"})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "sweep", "configs/demo.yaml", "--scheduler", "asha", "--json",
           "--grid", "data.max_length=[64,72]", "--grid", "train.lr=[3e-3,1e-9]"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert time.time() - t0 < 900  # no trial waited for ever on resources a stopped trial kept
    s = json.loads((tmp_path / "out" / "sweep_summary.json").read_text())  # stdout also holds Tune's status tables
    statuses = [t["status"] for t in s["trials"]]
    assert len(statuses) == 4 and "STOPPED" in statuses and "ERROR" not in statuses, s["trials"]
    stopped = [t for t in s["trials"] if t["status"] == "STOPPED"]
    assert all(t["step"] < 6 for t in stopped) and all(t["overrides"]["train.lr"] == 1e-9 for t in stopped)
    # prepare and reference: once per distinct max_length (64 was scored by the grid sweep's cache or here, 72 here)
    assert s["cost"]["reference_passes"] == 2 and proc.stderr.count("sweep: prepare + reference for data.max_length=") == 2
    assert s["best"]["overrides"]["train.lr"] == 3e-3
    assert "state API" not in proc.stderr  # the warning for clusters without the dashboard


def test_space_parsing_and_stage_keys():
    """The CLI's --grid/--sample forms, their errors as one line naming the key, and which keys get their own reference pass."""
    from dpo_ray.config import ConfigError, SweepConfig
    from pipeline.sweep import group_key, parse_grid, parse_sample, param_space, stage_values, with_overrides

    assert parse_grid("train.beta=[0.05, 0.1]") == ("train.beta", [0.05, 0.1])
    assert parse_grid("train.loss_type=[sigmoid,ipo]") == ("train.loss_type", ["sigmoid", "ipo"])
    assert parse_sample("train.lr=loguniform(1e-5,1e-3)") == ("train.lr", "loguniform(1e-5,1e-3)")
    for bad, words in [("train.beta=0.1", "--grid"), ("train.lr=lognormal(1,2)", "not one of"), ("train.lr=loguniform(0,1)", "low > 0"),
                       ("train.lr=uniform(2,1)", "low < high")]:
        with pytest.raises(ConfigError, match=words):
            (parse_grid if bad == "train.beta=0.1" else parse_sample)(bad)
    s = SweepConfig(grid={"train.beta": [0.1, 0.3], "data.max_length": [64, 96]}, sample={"train.lr": "loguniform(1e-5,1e-3)",
                                                                                            "model.reference": "choice([a, b])"})
    space = param_space(s)
    assert space["train.beta"] == {"grid_search": [0.1, 0.3]} and space["train.lr"].lower == 1e-5
    # data.max_length and model.reference change the prepared data / the reference: 2 x 2 passes; beta and lr do not
    assert len(stage_values(s)) == 4 and {tuple(sorted(v)) for v in stage_values(s)} == {("data.max_length", "model.reference")}
    with pytest.raises(ConfigError, match="grid or choice"):
        stage_values(SweepConfig(sample={"data.max_length": "randint(64,128)"}))
    base = with_overrides({}, {})
    assert group_key(with_overrides(base.model_dump(), {"train.beta": 0.3})) == group_key(base)
    assert group_key(with_overrides(base.model_dump(), {"data.max_length": 64})) != group_key(base)
    with pytest.raises(ConfigError, match="train.beta"):
        with_overrides(base.model_dump(), {"train.beta": -1})
