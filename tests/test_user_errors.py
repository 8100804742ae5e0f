"""User mistakes: one or two lines naming the thing and the fix, exit status 2, no traceback, before any work."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cli import main

ROOT = Path(__file__).resolve().parent.parent


def run_cli(capsys, *args):
    rc = main(["run", "configs/demo.yaml", "--set", "model.policy=demo:tiny-llama", *args])  # the built model: no SFT pass first
    err = capsys.readouterr().err.strip()
    return rc, err


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.mark.parametrize("args,expect", [
    (["--set", "data.train=[no/such/pairs.jsonl]"], "data file no/such/pairs.jsonl not found"),
    (["--set", "train.lr_sched=cosine"], "unknown key train.lr_sched"),
    (["--set", "train.lr"], "expected dotted.key=value"),
    (["--set", "train.batch_size_per_worker=many"], "train.batch_size_per_worker"),
    (["--set", "model.policy=/no/such/model"], "model path /no/such/model does not exist"),
    (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"], "MLflow server http://127.0.0.1:9 does not answer"),
    (["--address", "127.0.0.1:9"], "Ray cluster at 127.0.0.1:9 does not answer"),
    (["--set", "output_dir=/etc/hostname/out"], "output_dir /etc/hostname/out is not writable"),
    (["--set", "cache_dir=/etc/hostname/cache"], "cache_dir /etc/hostname/cache is not writable"),
    (["--set", "cache_dir=foo://bucket/cache"], "cache_dir foo://bucket/cache cannot be opened"),
    (["--set", "output_dir=s3://bucket/runs"], "output_dir must be a local or shared-mount path"),
])
def test_mistake_is_one_clear_line(capsys, tmp_path, cache_dir, demo_model, args, expect):
    rc, err = run_cli(capsys, "--set", f"cache_dir={cache_dir}", "--set", f"output_dir={tmp_path}/out", *args)
    assert rc == 2
    assert expect in err, err
    assert err.startswith("dpo-ray: error: ") and len(err.splitlines()) <= 2 and "Traceback" not in err


def test_real_process_exit_code_and_no_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([str(Path(sys.executable).parent / "dpo-ray"), "run", "configs/demo.yaml", "--set", "train.bta=0.3"],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "dpo-ray: error: configs/demo.yaml with --set train.bta=0.3: unknown key train.bta (did you mean train.beta?)"


def test_the_cause_chain_names_what_the_cluster_lost_and_what_training_raised():
    """An error from Ray wraps what happened; the walk reads the whole chain once (a cycle ends it)."""
    from ray import exceptions as rx

    from pipeline.reference import causes, lost_to_the_cluster
    from pipeline.train import TrainingError, training_error

    def chain(inner: BaseException, outer: BaseException) -> BaseException:
        try:
            try:
                raise inner
            except BaseException as e:
                raise outer from e
        except BaseException as e:
            return e

    lost = chain(rx.NodeDiedError("node 1a2b died\nmore"), RuntimeError("the pass failed"))
    assert [type(e) for e in causes(lost)] == [RuntimeError, rx.NodeDiedError]
    assert lost_to_the_cluster(lost) == "NodeDiedError: node 1a2b died"
    assert lost_to_the_cluster(chain(OSError("disk full"), RuntimeError("the pass failed"))) is None  # not the cluster's
    looped = RuntimeError("a")
    looped.__context__ = ValueError("b")
    looped.__context__.__context__ = looped
    assert len(list(causes(looped))) == 2
    nan = training_error(chain(FloatingPointError("train: loss is nan at step 3"), RuntimeError("worker group failed")))
    assert isinstance(nan, TrainingError) and str(nan) == "train: loss is nan at step 3"
    other = RuntimeError("a bug")
    assert training_error(other) is other
