"""MLflow: tracking URI and reachability, the experiment (created on the driver), and the rank-0 metric logger.

Workers log with `MlflowClient.log_batch(run_id, ...)`; other ranks, and runs with tracking off, get a
no-op logger so the loop has no `if rank == 0` around each call. Metric writes are buffered, retried,
and reported as lost in the log if the server stays away: never dropped silently, never a crash.
"""
from __future__ import annotations

import logging
import os
import time
import urllib.request
from pathlib import Path

from .errors import UserError

log = logging.getLogger("dpo_ray")
# MLflow's HTTP client retries 7 times with exponential backoff (minutes) by default; we retry ourselves
# and report what was lost, so a dead server must fail fast. Set these variables to override.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class TrackingError(UserError, ValueError):
    """The MLflow tracking store cannot be used."""


def resolve_tracking_uri(configured: str | None) -> str:
    """Config value, else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db. sqlite paths are made absolute."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except OSError as e:
            raise TrackingError(f"MLflow server {uri} does not answer ({e}); start it with "
                                f"`mlflow server --host 127.0.0.1 --port 5000` or set mlflow.tracking_uri") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not os.access(db.parent if db.parent.exists() else Path.cwd(), os.W_OK):
            raise TrackingError(f"MLflow store {db} is not writable; set mlflow.tracking_uri to a writable place")


def default_artifact_location(uri: str, experiment: str) -> str | None:
    """For a sqlite store: <db dir>/mlartifacts/<experiment>, a lasting place (not a Ray temp folder)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).parent / "mlartifacts" / experiment).as_uri()
    return None  # a server decides (its --artifacts-destination)


def ensure_experiment(uri: str, name: str) -> str:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(name, artifact_location=default_artifact_location(uri, name))


class RunLogger:
    """Buffers metrics and writes them with log_batch; retries, then logs how many values were lost.

    The driver uses `call` for everything else it writes to the run (params, artifacts, status):
    a failure there is logged as lost, and the pipeline goes on.
    """

    def __init__(self, uri: str, run_id: str, retries: int = 3, backoff_s: float = 1.0):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id, self.retries, self.backoff_s = MlflowClient(uri), run_id, retries, backoff_s
        self.buffer: list = []
        self.lost = 0
        self.down = False  # after a write failed every try: one try per write until one succeeds (no stalls)

    def _tries(self) -> int:
        return 1 if self.down else self.retries

    def call(self, what: str, fn, *args, **kwargs):
        tries = self._tries()
        for attempt in range(tries):
            try:
                result = fn(self.run_id, *args, **kwargs)
                self.down = False
                return result
            except Exception as e:
                if attempt == tries - 1:
                    self.down = True
                    log.error("MLflow: %s lost after %d tries (%s)", what, tries, str(e).splitlines()[0][:200])
                    return None
                time.sleep(self.backoff_s * 2**attempt)

    def set_tag(self, key: str, value: str) -> None:
        self.call(f"tag {key}", self.client.set_tag, key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.buffer += [Metric(k, float(v), ts, step) for k, v in metrics.items()]

    def flush(self) -> None:
        while self.buffer:
            chunk = self.buffer[:1000]  # MLflow's log_batch limit
            tries = self._tries()
            for attempt in range(tries):
                try:
                    self.client.log_batch(self.run_id, metrics=chunk, synchronous=True)
                    self.down = False
                    break
                except Exception as e:  # a server away, a locked db: retry, then count as lost
                    if attempt == tries - 1:
                        self.lost += len(chunk)
                        self.down = True
                        log.error("MLflow: %d metric values lost after %d tries (%s); %d lost in this run so far",
                                  len(chunk), tries, str(e).splitlines()[0][:200], self.lost)
                    else:
                        time.sleep(self.backoff_s * 2**attempt)
            self.buffer = self.buffer[len(chunk):]


class _NoMonitor:
    def finish(self) -> None:
        pass


def system_metrics(uri: str | None, run_id: str | None, node_id: str, enabled: bool = True):
    """MLflow's own system-metrics monitor on this process's machine, logging to the run as system/<node_id>/...:
    CPU and memory (psutil), disk, network, and GPU utilization and memory where NVML answers. It samples every
    MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL seconds (default 10) on a daemon thread; call .finish() at the end."""
    if not (enabled and uri and run_id):
        return _NoMonitor()
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, node_id=node_id, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as e:  # psutil missing, a store that does not answer: the run goes on without them
        log.warning("MLflow: no system metrics from %s (%s)", node_id, str(e).splitlines()[0][:200])
        return _NoMonitor()


def dataset_input(name: str, digest: str, source: str, context: str, profile: dict):
    """One input file as an MLflow dataset input (the run's Datasets column): its content hash as the digest,
    counts and layouts as the profile."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    dataset = Dataset(name=name, digest=digest, source_type="local", source=json.dumps({"uri": source}),
                      profile=json.dumps(profile))
    return DatasetInput(dataset=dataset, tags=[InputTag(key=MLFLOW_DATASET_CONTEXT, value=context)])


class NoLogger:
    lost = 0

    def set_tag(self, key, value) -> None:
        pass

    def log_metrics(self, metrics, step) -> None:
        pass

    def flush(self) -> None:
        pass


def run_logger(uri: str | None, run_id: str | None, enabled: bool):
    return RunLogger(uri, run_id) if enabled and uri and run_id else NoLogger()
