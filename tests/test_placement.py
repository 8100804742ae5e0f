"""Stages fit the cluster they find (pipeline/placement.py): the pool sizes, the bounded wait, and a whole run on the
1 CPU a cluster has left after losing a node, where Ray Data's 1-CPU file listing beside a 0.5-CPU scoring actor used
to wait for ever."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import small_config
from pipeline.placement import Nodes, fits

ROOT = Path(__file__).resolve().parents[1]


def test_fits_counts_actors_beside_a_task():
    one = Nodes([{"CPU": 1.0}])
    assert fits(one, {"CPU": 0.5}, 4) == 1  # a second 0.5-CPU actor would leave no CPU for the 0.25-CPU tasks
    assert fits(one, {"CPU": 0.5}, 4, task_cpus=0) == 2
    assert fits(Nodes([{"CPU": 2.0}, {"CPU": 1.0}]), {"CPU": 0.5}, 8) == 5
    assert fits(Nodes([{"CPU": 4.0, "GPU": 1.0}, {"CPU": 4.0}]), {"CPU": 1.0, "GPU": 1.0}, 2) == 1
    assert fits(Nodes([{"CPU": 4.0, "scorer": 1.0}, {"CPU": 1.0}]), {"CPU": 0.5, "scorer": 1.0}, 2) == 1
    assert fits(Nodes([{"CPU": 4.0}]), {"CPU": 0.5, "scorer": 1.0}, 2) == 0  # the custom resource is nowhere
    assert fits(Nodes([]), {"CPU": 0.5}, 1) == 0


SCRIPT = """
import json, logging, sys, time
import ray
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
from dpo_ray.config import load_config
from pipeline import placement
from pipeline.run import run
from pipeline.runtime import setup_logging
setup_logging()
out = {}
t0 = time.monotonic()
try:  # an actor the cluster cannot hold: a bounded wait, then one line
    placement.plan_pool("reference", "scoring actor", {"CPU": 0.5, "scorer": 1.0}, 2, wait_s=3)
except placement.ResourceError as e:
    out["error"], out["waited_s"] = str(e), time.monotonic() - t0
summary = run(load_config(None, json.loads(sys.argv[1])))
out["summary"] = summary
print("RESULT " + json.dumps(out, default=str))
"""


def test_a_run_on_one_cpu_finishes_and_a_stage_that_cannot_fit_stops_in_one_line(tmp_path, small_pairs, cache_dir):
    """The cluster a lost node leaves: 1 CPU. prepare, reference (0.5-CPU scoring actors), train, evaluate with
    generations and a function judge all finish. Before, the reference pass waited for ever (Ray Data's listing task
    could not start beside the actor)."""
    sets = small_config(tmp_path, tmp_path / "cache", small_pairs, **{
        "reference.num_actors": "2", "reference.cpus_per_actor": "0.5", "train.max_steps": "2", "train.checkpoint_every": "2",
        "eval.generate.prompts": "2", "eval.generate.max_new_tokens": "4", "eval.judge.function": "tests.judges_for_tests:words"})
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(sets)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=560)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, (proc.stdout[-3000:], proc.stderr[-6000:])
    out = json.loads(lines[-1][len("RESULT "):])
    # the bounded wait: about wait_s, then one line naming the stage, the need and what the cluster has
    assert 2.5 <= out["waited_s"] < 20 and "\n" not in out["error"], out
    assert out["error"].startswith("reference: needs 1 scoring actor(s) of {CPU: 0.5, scorer: 1}") and "1 node(s) alive with 1 CPU(s)" in out["error"], out
    assert "waiting for 1 scoring actor(s)" in proc.stderr
    # every stage ran on the one CPU, each pool planned for what is there: one scoring actor of the two asked
    s = out["summary"]
    assert s["train"]["steps"] == 2 and s["eval"]["win_rate"] is not None, s
    for stage in ("reference", "evaluate", "generate", "judge"):
        assert f"{stage}: 1 " in proc.stderr and "on 1 node(s) alive with 1 CPU(s)" in proc.stderr, (stage, proc.stderr[-4000:])
    assert "reference: 1 scoring actor(s) of {CPU: 0.5} (of 2 asked)" in proc.stderr
