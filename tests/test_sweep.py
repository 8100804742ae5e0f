"""`dpo-ray sweep` on a real local Ray runtime, Ray Tune and a real MLflow sqlite store, with the demo model.

One sweep through the console script covers the issue's cases: ASHA over a grid of data.max_length x train.lr (prepare
and reference run once per distinct max_length; ASHA stops the trials that do not learn and the sweep still ends: no
trial waits for ever on a stopped trial's resources, ray#54305), with one invalid value (those trials fail, the others
go on), interrupted (SIGINT) after its first trial and run again with the same command (the first trial is not trained
again), the best trial exported and registered.
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
GOOD_LR, FLAT_LR, BAD_LR = 3e-3, 1e-9, -1  # learns / does not (ASHA stops it) / invalid (the trial fails)


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
def asha_sweep(tmp_path_factory, cache, tiny_pairs, ray_local):
    """The CLI sweep (ASHA, 2 x 3 grid), interrupted after its first trial finished, then the same command again.

    Through the CLI, which starts its runtime with Ray's dashboard when a scheduler is set: Ray Train's cleaner then
    frees a stopped trial's placement group, so the next trial gets its CPU (without the state API it waited for ever).
    `ray_local`, this process's runtime, is another Ray instance on the machine: the state API's auto-detection fails
    beside one ("Found multiple active Ray instances"), so the CLI names its own dashboard to its processes."""
    tmp = tmp_path_factory.mktemp("sweep")
    sets = sweep_sets(tmp, cache, tiny_pairs, **{"registry.name": "sweep-demo", "sweep.eval_every": "2",
                                                 "sweep.scheduler_metric": "train/loss", "sweep.scheduler_mode": "min"})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "sweep", "configs/demo.yaml", "--scheduler", "asha",
           "--grid", "data.max_length=[64,72]", "--grid", f"train.lr=[{GOOD_LR},{FLAT_LR},{BAD_LR}]"]
    cmd += [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    root = Path(__file__).parent.parent
    logs = [tmp / "first.log", tmp / "second.log"]
    t0 = time.time()
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
    wall = time.time() - t0
    text = [p.read_text() for p in logs]
    assert rc == 0, text[1][-4000:]
    return tmp, json.loads((tmp / "out" / "sweep_summary.json").read_text()), rc_first, first_done, text, wall


@pytest.mark.slow
def test_sweep_shares_reference_passes_stops_weak_trials_and_nests_child_runs(asha_sweep):
    from mlflow.tracking import MlflowClient
    from transformers import AutoModelForCausalLM

    tmp, s, _, _, (first, second), wall = asha_sweep
    assert wall < 1200  # no trial waited for ever on resources a stopped trial kept (ray#54305)
    # prepare + reference once per distinct max_length (in the first invocation), never per trial; the rerun hit the cache
    assert first.count("sweep: prepare + reference for data.max_length=") == 2
    assert first.count("reference: scoring pairs.jsonl (train), pairs.jsonl (eval) with") == 2  # one pass each, both splits
    assert "reference: scoring" not in second and second.count("reference: cache hit for pairs.jsonl") == 2
    assert s["cost"]["reference_passes"] == 2 and s["cost"]["reference_seconds_one_pass_per_trial"] > 0
    # the continued sweep's cost adds up both invocations: the first one's reference passes are in it
    c = s["cost"]
    assert c["invocations"] == 2 and c["reference_seconds"] > 0 and 0 < c["reference_share"] < 1
    assert " over 2 invocations (continued)" in second
    assert "state API" not in first + second  # the warning for clusters without the dashboard
    trials = {(t["overrides"]["data.max_length"], t["overrides"]["train.lr"]): t for t in s["trials"]}
    assert sorted(trials) == sorted((m, lr) for m in (64, 72) for lr in (GOOD_LR, FLAT_LR, BAD_LR))
    # the invalid value fails its own trials with a message naming the key; the others end
    for m in (64, 72):
        assert trials[m, BAD_LR]["status"] == "ERROR" and "train.lr" in trials[m, BAD_LR]["error"]
        assert trials[m, GOOD_LR]["status"] == "FINISHED"
    # ASHA on train/loss every 2 steps stops a trial that does not learn (never one that does), before its last step
    stopped = [t for t in s["trials"] if t["status"] == "STOPPED"]
    assert stopped and all(t["overrides"]["train.lr"] == FLAT_LR and t["step"] < STEPS for t in stopped), s["trials"]
    metric = "eval/rewards/accuracies"
    ok = [t for t in s["trials"] if t["status"] == "FINISHED"]
    best = max(ok, key=lambda t: t[metric])
    assert s["best"]["trial_id"] == best["trial_id"] and s["best"][metric] == best[metric]
    assert best["overrides"]["train.lr"] == GOOD_LR

    client = MlflowClient(s["tracking_uri"])
    parent = client.get_run(s["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED" and json.loads(parent.data.params["space.train.lr"]) == [GOOD_LR, FLAT_LR, BAD_LR]
    assert parent.data.tags["best.trial_id"] == best["trial_id"] and parent.data.metrics[f"best/{metric}"] == pytest.approx(best[metric])
    assert {"trials.json", "sweep.png", "space.json", "sweep_summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    by_run = {c.info.run_id: c for c in children}
    assert sorted(by_run) == sorted(t["mlflow_run_id"] for t in ok + stopped)  # a trial whose config is invalid has no run
    for t in ok + stopped:
        c = by_run[t["mlflow_run_id"]]
        assert float(c.data.params["train.lr"]) == t["overrides"]["train.lr"]
        assert int(c.data.params["data.max_length"]) == t["overrides"]["data.max_length"]
        # every step logged (a trial interrupted mid-training resumed from its checkpoint, so a step may repeat)
        steps = {m.step for m in client.get_metric_history(c.info.run_id, "train/loss")}
        if t["status"] == "FINISHED":
            assert c.info.status == "FINISHED" and c.data.metrics[metric] == pytest.approx(t[metric])
            assert steps == set(range(1, STEPS + 1))
        else:  # stopped early: KILLED, tagged with the step of the report it was stopped on, no eval (its workers may
            # have trained a step or two more while Tune stopped it)
            assert c.info.status == "KILLED" and c.data.tags["dpo_ray.stopped_early"] == f"at step {t['step']}"
            assert metric not in c.data.metrics and 1 in steps
    model = AutoModelForCausalLM.from_pretrained(s["best"]["model_dir"])
    assert Path(s["best"]["model_dir"]) == tmp / "out" / "best" / "model" and model.num_parameters() > 0
    # the best trial went through the champion/challenger gate from its own run (the first version: promoted)
    assert s["best"]["registry"]["decision"] == "promoted"
    version = client.get_model_version_by_alias("sweep-demo", "champion")
    assert version.run_id == best["mlflow_run_id"]
    # sweep.keep_models=false: the trials' own models are gone, the best's copy stays
    assert not any((tmp / "out" / "trials").glob("*/model"))


@pytest.mark.slow
def test_interrupted_sweep_continues_without_retraining(asha_sweep):
    from mlflow.tracking import MlflowClient

    tmp, s, rc_first, first_done, (first, second), _ = asha_sweep
    assert rc_first == 130 and "interrupted; run the same command again" in first
    assert len(first_done) >= 1 and "continuing the sweep" in second
    for path, mtime in first_done.items():  # a trial finished before the interrupt was not run again: its record is untouched
        trial = next(t for t in s["trials"] if t["trial_id"] == path.parent.name)
        assert trial["status"] == "FINISHED" and path.stat().st_mtime_ns == mtime
        assert json.loads(path.read_text())["mlflow_run_id"] == trial["mlflow_run_id"]
        assert len(MlflowClient(s["tracking_uri"]).get_metric_history(trial["mlflow_run_id"], "train/loss")) == STEPS  # trained once
    assert len(s["trials"]) == 6  # and no trial was added or run twice


def test_space_parsing_and_stage_keys():
    """The CLI's --grid/--sample forms, their errors as one line naming the key, and which keys get their own reference pass."""
    from dpo_ray.config import ConfigError, SweepConfig
    from dpo_ray.config import with_overrides
    from pipeline.space import group_key, parse_grid, parse_sample, param_space, stage_values

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


def test_a_trial_whose_memory_plan_cannot_fit_stops_the_sweep_before_any_work(tmp_path, tiny_pairs, demo_model):
    """Every trial's memory plan is checked before the shared stages: on a stated 8 MB GPU the LoRA trial fits and the
    full fine-tune does not (the tiny Llama's 1.1M fp32 weights and AdamW state): one line naming that trial, exit 2,
    nothing prepared, no trial started."""
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(demo_model, cache / "models" / Path(demo_model).name)
    sets = sweep_sets(tmp_path, cache, tiny_pairs, **{"train.gpu_memory_gb": str(8 / 1024)})
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "sweep", "configs/demo.yaml", "--grid", "train.lora=[{r: 8}, null]",
           "--grid", "train.lr=[1e-3,3e-3]"] + [a for s in sets for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("dpo-ray: error:")]
    assert len(errors) == 1 and "sweep: the trial train.lora=None, train.lr=0.001 cannot fit: train: parameters and optimizer state need" in errors[0], proc.stderr[-3000:]
    assert "options that fit" in errors[0] and "train.lora" in errors[0]
    assert not (cache / "prepared").exists() and not (tmp_path / "out" / "trials").exists()
