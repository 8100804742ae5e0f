"""The evaluate stage's generations in MLflow 3's own evaluation views (issue 32).

`log_generations` hands the generations table (pipeline/generate.py: one row per held-out prompt) to
`mlflow.genai.evaluate` as precomputed data, no predict_fn: each prompt becomes one trace of the training run, its
request `{"prompt": ...}`, its response `{"policy": ..., "reference": ...}` (both replies), the data's chosen reply as
the expectation `chosen`, the table's `row_id` as a trace tag. The scorers are the judges' columns that the table has
(verdict, win, judge_policy, judge_reference, judge_policy_first, judge_policy_second): each returns the value already
in the table as a feedback named after its column, sourced from the judge (eval.judge's kind), and judge_error as the
feedback's error where the judge gave no score. Nothing is judged again (the judge may be a 7B reward model on a GPU
pool), so the Evaluation runs page and eval_generations.json agree by construction.

The evaluation is logged into the training run itself (mlflow.genai.evaluate uses the active run, made the training
run for the call): the Evaluation runs page lists that run, two runs' rows can be compared side by side, and the
scorers' means (judge_policy/mean, win/mean, ...) are metrics of the run. MLflow ends the run it was given; the run's
status from before the call is put back. A failure here is a warning: the training run goes on, eval_generations.json
still has the table.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time

import pandas as pd

log = logging.getLogger("dpo_ray")

# MLflow's usage telemetry posts to the internet; clusters here have none, and the pipeline sends nothing out.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

# The judge columns a generations table may have, in the order the view shows their scorers.
JUDGE_COLUMNS = ("verdict", "win", "judge_policy", "judge_reference", "judge_policy_first", "judge_policy_second")
DESCRIPTIONS = {
    "verdict": "which reply the judge preferred: policy, reference or tie",
    "win": "the policy's win value for the prompt (1 win, 0.5 tie, 0 loss; a pairwise judge's mean of both orders)",
    "judge_policy": "the pointwise judge's score of the policy's reply",
    "judge_reference": "the pointwise judge's score of the reference's reply",
    "judge_policy_first": "the pairwise judge's P(policy better) with the policy's reply shown first",
    "judge_policy_second": "the pairwise judge's P(policy better) with the policy's reply shown second",
}
# mlflow.genai.evaluate's threads: a sqlite store takes one writer at a time (10 threads exhaust SQLAlchemy's pool
# waiting for its lock); against a server, 4 predict + 4 score threads stay within the HTTP session's 10 connections.
# Each row's scorers only read the table: one thread for them.
WORKERS = {"sqlite": "4", "http": "4"}
_lock = threading.Lock()  # mlflow.genai.evaluate is not thread-safe, and the global URI and env are set for the call


def request_id(run_id: str, row_id) -> str:
    return f"{run_id}:{row_id}"


def eval_data(table: pd.DataFrame, run_id: str = "") -> pd.DataFrame:
    """mlflow.genai.evaluate's data: inputs, outputs, expectations (the chosen reply, when the table has it), tags, and
    request_id (run and row: MLflow tags the row's trace with it, and the scorers find the row by it)."""
    rows = []
    for r in table.itertuples(index=False):
        row = {"inputs": {"prompt": str(r.prompt)}, "outputs": {"policy": str(r.policy), "reference": str(r.reference)},
               "tags": {"row_id": str(r.row_id)}, "request_id": request_id(run_id, r.row_id)}
        chosen = getattr(r, "chosen", None)
        if isinstance(chosen, str) and chosen:
            row["expectations"] = {"chosen": chosen}
        rows.append(row)
    return pd.DataFrame(rows)


def _key(inputs: dict, outputs: dict) -> tuple:
    return inputs.get("prompt"), outputs.get("policy"), outputs.get("reference")


def _number(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def judge_scorers(table: pd.DataFrame, judge_kind: str | None = None, run_id: str = "") -> list:
    """One scorer per judge column in `table`, returning the table's values: the row is the one whose request_id
    (eval_data's) the trace is tagged with, else (a trace without the tag) the first with the trace's prompt and both
    replies. No judge columns: no scorers."""
    from mlflow.entities import AssessmentError, AssessmentSource, Feedback
    from mlflow.genai.scorers import scorer
    from mlflow.tracing.constant import TraceTagKey

    columns = [c for c in JUDGE_COLUMNS if c in table.columns]
    if not columns:
        return []
    kind = judge_kind or "eval.judge"
    source = AssessmentSource(source_type="CODE" if "function" in kind.split(" ", 2)[:2] else "LLM_JUDGE", source_id=kind)
    records = table.to_dict(orient="records")
    by_request = {request_id(run_id, rec["row_id"]): rec for rec in records}
    by_key = {}
    for rec in records:
        by_key.setdefault((str(rec["prompt"]), str(rec["policy"]), str(rec["reference"])), rec)
    numbers = [c for c in columns if c != "verdict"]

    def feedback(column: str, rec: dict):
        error = str(rec.get("judge_error") or "")
        if column == "verdict":
            value = rec.get("verdict")
            value = value if isinstance(value, str) and value else None
        else:
            value = _number(rec.get(column))
        if value is None:
            return Feedback(name=column, source=source, error=AssessmentError(
                error_code="JUDGE_ERROR", error_message=error or f"the judge gave no {column} for this prompt"))
        others = [f"{c} {_number(rec.get(c)):.4g}" for c in numbers if c != column and _number(rec.get(c)) is not None]
        rationale = ", ".join(others) if column in ("verdict", "win") and others else None
        if error:
            rationale = f"{rationale}; judge error: {error}" if rationale else f"judge error: {error}"
        return Feedback(name=column, value=value, rationale=rationale, source=source)

    def make(column: str):
        def fn(inputs, outputs, trace):
            tags = (trace.info.tags or {}) if trace is not None else {}
            rec = by_request.get(tags.get(TraceTagKey.EVAL_REQUEST_ID)) or by_key.get(_key(inputs or {}, outputs or {}))
            if rec is None:
                raise KeyError(f"no generations row for prompt {str((inputs or {}).get('prompt'))[:80]!r}")
            return feedback(column, rec)

        fn.__name__ = column
        return scorer(fn, name=column, description=DESCRIPTIONS[column], timeout=0,
                      aggregations=None if column == "verdict" else ["mean"])

    return [make(c) for c in columns]


@contextlib.contextmanager
def _env(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _quiet_harness():
    """No tqdm bar (stderr, a line per update in a log file) and no "view the results" banner on stdout from the
    harness: its module-level `tqdm` is None (its "no tqdm installed" path; TQDM_DISABLE is read only when tqdm is
    imported) and its display call a no-op for the call (our log line says where the results are). Patched, not
    redirected: Ray's driver prints its workers' lines to stdout from another thread meanwhile."""
    from mlflow.genai.evaluation import base, harness

    saved = [(m, name, getattr(m, name)) for m, name in ((harness, "tqdm"), (base, "display_evaluation_output"))
             if hasattr(m, name)]
    for m, name, _ in saved:
        setattr(m, name, None if name == "tqdm" else (lambda *a, **k: None))
    try:
        yield
    finally:
        for m, name, value in saved:
            setattr(m, name, value)


def _clear_earlier(client, experiment_id: str, run_id: str) -> int:
    """The run's rows from an earlier evaluation (a resumed or repeated evaluate stage): deleted, so the view shows
    this table's rows once, as eval_generations.json (overwritten) does."""
    import mlflow

    old = mlflow.search_traces(locations=[experiment_id], run_id=run_id, include_spans=False, return_type="list",
                               filter_string="tag.`mlflow.eval.requestId` != ''")
    ids = [t.info.trace_id for t in old if "row_id" in (t.info.tags or {})]
    if ids:
        client.delete_traces(experiment_id, trace_ids=ids)
    return len(ids)


def evaluate_run(uri: str, run_id: str, table: pd.DataFrame, judge_kind: str | None = None):
    """mlflow.genai.evaluate on `table` into run `run_id` of the store at `uri`; returns its EvaluationResult. The
    run keeps the status it had; MLflow's global tracking URI, its active run and the environment are as before."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from .register import tracking_uri

    client = MlflowClient(uri)
    run = client.get_run(run_id)
    workers = WORKERS["sqlite" if uri.startswith("sqlite:") else "http"]
    quiet = {"MLFLOW_GENAI_EVAL_MAX_WORKERS": workers, "MLFLOW_GENAI_EVAL_MAX_SCORER_WORKERS": "1",
             "MLFLOW_DISABLE_TELEMETRY": "true"}
    with _lock, _env(quiet), tracking_uri(uri), _quiet_harness():
        active = mlflow.active_run()
        if active is not None and active.info.run_id != run_id:
            raise RuntimeError(f"another MLflow run ({active.info.run_id}) is active in this thread")
        _clear_earlier(client, run.info.experiment_id, run_id)
        try:
            with mlflow.start_run(run_id=run_id, log_system_metrics=False) if active is None else contextlib.nullcontext():
                return mlflow.genai.evaluate(data=eval_data(table, run_id), scorers=judge_scorers(table, judge_kind, run_id))
        finally:
            if active is None and client.get_run(run_id).info.status != run.info.status:
                client.update_run(run_id, status=run.info.status)  # start_run's end marked it FINISHED (or FAILED)


def view_url(uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the Evaluation runs view of a server's UI (None for a sqlite store: `mlflow ui` on it)."""
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/evaluation-runs?selectedRunUuid={run_id}"
    return None


def log_generations(tracker, table: pd.DataFrame | None, judge_kind: str | None = None) -> None:
    """The generations table as the run's MLflow GenAI evaluation (see the module's doc). `tracker`: a RunLogger
    (dpo_ray.tracking); off rank 0 or with tracking off (NoLogger) nothing is logged. `judge_kind`: eval.judge's
    kind ('reward model PATH', 'function m:f', ...), the assessments' source. Never raises: a failure is one warning,
    and rows MLflow dropped (it warns per row and goes on) are counted in one."""
    client, run_id = getattr(tracker, "client", None), getattr(tracker, "run_id", None)
    if table is None or not len(table) or client is None or not run_id or getattr(tracker, "down", False):
        return
    uri = str(getattr(tracker, "uri", None) or client.tracking_uri)
    start = time.monotonic()
    try:
        result = evaluate_run(uri, run_id, table, judge_kind)
        rows = len(result.result_df) if result.result_df is not None else 0
        url = view_url(uri, client.get_run(run_id).info.experiment_id, run_id)
    except Exception as e:  # MLflow's API or a store away: the run goes on, eval_generations.json has the table
        log.warning("MLflow: the generations' evaluation view was not logged (%s); eval_generations.json has them",
                    (str(e).splitlines() or [type(e).__name__])[0][:200])
        return
    if rows != len(table):
        log.warning("MLflow: the evaluation view has %d of the %d generations (MLflow's warnings above say why); "
                    "eval_generations.json has all", rows, len(table))
    log.info("MLflow: %d generations with %d judge assessments each in the run's evaluation (%.1f s)%s", rows,
             len([c for c in JUDGE_COLUMNS if c in table.columns]), time.monotonic() - start, f": {url}" if url else "")
