"""The console tells dpo-ray's story; Ray Data's progress dumps and the libraries' INFO lines go to the run's log file.

Real loggers: Ray Data's own `ray.data` logger as `import ray.data` configures it (its console handler included), and
the record its non-terminal progress manager writes (logging_progress.py)."""
from __future__ import annotations

import logging

import pytest

from pipeline import console


@pytest.fixture
def closing():
    yield
    console.close()


def library_streams_to_this_test(monkeypatch) -> None:
    """The libraries' console handlers, made when an earlier test first imported them, hold the stream pytest captured
    then: pointed at this test's stderr, as in a fresh CLI process (monkeypatch gives the old ones back)."""
    import sys

    for n in console.LIBRARY_LOGGERS:
        for h in logging.getLogger(n).handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler) and not type(h).__module__.startswith("_pytest"):
                monkeypatch.setattr(h, "stream", sys.stderr)  # not setStream: it flushes the old one, maybe closed


def test_progress_dumps_go_to_the_log_file_and_warnings_reach_the_console(tmp_path, closing, capsys, monkeypatch):
    run_log = console.setup(tmp_path / "out", "run")
    library_streams_to_this_test(monkeypatch)
    progress = logging.getLogger("ray.data._internal.progress.logging_progress")
    progress.info("======= Running Dataset: dataset_x =======")
    logging.getLogger("ray.data._internal.execution.streaming_executor").info("Starting execution of Dataset dataset_x")
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("ray.data").warning("a ray data warning")
    logging.getLogger("dpo_ray").info("prepare: started")
    logging.getLogger("some.library").error("a library error")
    assert any(console._console_record in h.filters for h in logging.getLogger("mlflow").handlers)  # MLflow's own handler
    for h in logging.getLogger("ray.data").handlers + logging.getLogger().handlers:
        h.flush()
    for h in logging.getLogger("ray").handlers:  # what ray.init does (ray._private.ray_logging.setup_logger)
        h.setFormatter(logging.Formatter("%(message)s"))
    logging.getLogger("ray.data").info("after ray.init")
    err = capsys.readouterr().err
    text = run_log.read_text()
    assert any(line.endswith("INFO ray.data: after ray.init") for line in text.splitlines())
    assert run_log.parent.name == "logs" and run_log.name.startswith("run-") and "log file" in err and str(run_log) in err
    for line in ("Running Dataset: dataset_x", "Starting execution of Dataset", "Creating initial MLflow"):
        assert line in text and line not in err
    for line in ("a ray data warning", "prepare: started", "a library error"):
        assert line in text and line in err


def test_worker_lines_reach_the_log_file_and_only_rays_chatter_leaves_the_console(tmp_path, closing, capsys):
    """The function Ray's log monitor calls on the driver for each batch of worker output (log_to_driver)."""
    import ray._private.worker as rw

    run_log = console.setup(tmp_path / "out", "run")
    noise = "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable."
    report = "Reporting training result 2: TrainingReport(checkpoint=Checkpoint(filesystem=local, path=/x), metrics={'step': 200})"
    rw.print_to_stdstream({"lines": [noise, report, "step 20/232 | loss 0.1860 | ETA 1m07s", "WARNING something odd"], "pid": 42,
                           "ip": "127.0.0.1", "localhost": "127.0.0.1", "is_err": False, "actor_name": "RayTrainWorker"}, False)
    out = capsys.readouterr().out
    text = run_log.read_text()
    assert "step 20/232" in out and "WARNING something odd" in out and noise not in out and "Reporting training result" not in out
    assert "Reporting training result 2" in text
    assert f"(RayTrainWorker pid=42) {noise}" in text and "(RayTrainWorker pid=42) step 20/232" in text
    console.close()
    assert not hasattr(rw.print_to_stdstream, "_wrapped")


def test_a_stage_says_when_it_starts_and_ends_with_counts_and_seconds(tmp_path, closing, capsys):
    console.setup(tmp_path / "out", "run")
    @console.stage("prepare", lambda r: f"{r['pairs']} pairs")
    def work():
        return {"pairs": 12}

    assert work() == {"pairs": 12}
    err = capsys.readouterr().err
    assert "prepare: started" in err and "prepare: finished in 0.0 s | 12 pairs" in err


def test_final_summary_names_accuracy_model_run_and_the_ui_command(tmp_path):
    summary = {"output_dir": str(tmp_path), "tracking_uri": "sqlite:////x/mlflow.db", "mlflow_run_id": "abc123",
               "model_dir": str(tmp_path / "model"), "train": {"steps": 6, "loss_first": 0.6931, "loss_last": 0.5},
               "data": {"rows_used": 10, "train_rows": 9, "eval_rows": 1, "rows_rejected": 0, "rejects_file": "r.jsonl"},
               "eval": {"rewards/accuracies": 0.85, "rewards/margins": 0.4}, "eval_reference": {"rewards/accuracies": 0.5}}
    text = "\n".join(console.summary_lines(summary))
    assert "reward accuracy 0.850 (the reference: 0.500)" in text and f"model: {tmp_path / 'model'}" in text
    assert "MLflow run abc123" in text and "mlflow ui --backend-store-uri sqlite:////x/mlflow.db --host 127.0.0.1" in text
    assert "6 steps, loss 0.6931 -> 0.5000" in text
