"""What a run prints: dpo-ray's own story on the console, everything else in the run's log file.

`setup(out_dir)` sends every log record at INFO and above to <output_dir>/logs/run-<time>.log. On the console stay
dpo-ray's lines (`dpo_ray` loggers: stage start and end, training progress with its ETA, the final summary) and the
warnings and errors of every library. The libraries' INFO chatter goes to the file only: Ray Data's per-operator
progress dumps (`ray.data._internal.progress.logging_progress`, written as log records when stdout is not a
terminal), its "Starting execution" plans, Ray's and MLflow's start-up lines. In an interactive terminal Ray Data
draws its own progress bars (tqdm, not log records), which stay.

Ray Data configures the `ray.data` logger when `ray.data` is first imported (and clears that logger's handlers then),
and MLflow its `mlflow` logger when `mlflow` is, so both are imported here first; `ray.init` later only changes the
`ray` logger's level and format, not its handlers.
"""
from __future__ import annotations

import functools
import logging
import sys
import time
from pathlib import Path

log = logging.getLogger("dpo_ray")
FORMAT = "%(asctime)s %(levelname)s %(message)s"
FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # the file also says whose line it is
# libraries that log to the console through handlers of their own (propagate=False): their INFO goes to the file
LIBRARY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "mlflow")
OWN = ("dpo_ray", "pipeline")  # logger names whose INFO lines are the console's story


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record comes (as logging's own last-resort handler does)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass

    announce: str | None = None  # said once, before the first line this handler prints: a one-line user error stays alone

    def emit(self, record):
        if self.announce:
            first, self.announce = self.announce, None
            super().emit(logging.makeLogRecord({"name": "dpo_ray", "levelno": logging.INFO, "levelname": "INFO", "msg": first}))
        super().emit(record)


class _File(logging.FileHandler):
    """The run's log file. Its format stays dpo-ray's: ray.init re-formats every handler of the `ray` logger."""

    def setFormatter(self, fmt):
        if self.formatter is None:
            super().setFormatter(fmt)


def _console_record(record: logging.LogRecord) -> bool:
    """On a console handler: dpo-ray's own lines at INFO, anyone's warnings and errors."""
    return record.levelno >= logging.WARNING or record.name.split(".")[0] in OWN


def log_path(out_dir: Path, started: float | None = None) -> Path:
    return out_dir / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S', time.localtime(started or time.time()))}.log"


def setup(out_dir: Path | None = None, command: str = "run") -> Path | None:
    """Console and log file for one CLI call; returns the log file's path (None without an output directory)."""
    import mlflow  # noqa: F401  (mlflow, too, gives its logger a console handler of its own when first imported)
    import ray.data  # noqa: F401  (configures the ray.data logger now, not after our handlers are in place)

    root = logging.getLogger()
    root.setLevel(logging.INFO)
    logging.getLogger("dpo_ray").setLevel(logging.INFO)
    close()  # a second call (tests) replaces the first's handlers
    console = _Stderr()
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_console_record)
    handlers: list[logging.Handler] = [console]
    path = None
    if out_dir is not None:
        path = log_path(out_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        file = _File(path, encoding="utf-8")
        file.setFormatter(logging.Formatter(FILE_FORMAT))
        file.setLevel(logging.INFO)
        handlers.append(file)
    for h in handlers:
        h._dpo_ray = True
        root.addHandler(h)
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        for h in lib.handlers:
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                if _console_record not in h.filters:
                    h.addFilter(_console_record)
        if path is not None and not lib.propagate:
            lib.addHandler(handlers[-1])
    route_worker_lines(handlers[-1] if path is not None else None)
    if path is not None:
        line = f"dpo-ray {command}: log file {path} (all of this run's messages, Ray Data's progress and the libraries' included)"
        console.announce = line
        handlers[-1].emit(logging.makeLogRecord({"name": "dpo_ray", "levelno": logging.INFO, "levelname": "INFO", "msg": line}))
    return path


# Ray's own per-worker chatter that its log monitor prints on the driver's console (log_to_driver): to the file only.
# A denylist, so that any other line of a worker (dpo-ray's training progress, a warning, a traceback) stays on the console.
WORKER_NOISE = ("Failed to query Ray Train Controller actor state", "Loading weights:", "Requesting resources:",
                "Attempting to start training worker group", "Started training worker group", "- (ip=",
                "Setting up process group for", "Moving model to device", "mlflow.system_metrics",
                "Writing model shards", "Checkpoint successfully created at", "Reporting training result")
# The first is a warning of Ray Train's PlacementGroupCleaner, repeated every few seconds while the machine is busy
# (1,034 times in one demo run on a loaded 2-core machine); it is Ray's and says nothing about the run: file only.


def route_worker_lines(file: logging.Handler | None) -> None:
    """Before ray.init: each line Ray forwards from a worker goes to the log file; WORKER_NOISE lines only there.
    (A no-op where Ray's printer is absent: pipeline/ray_compat.py.)"""
    from .ray_compat import wrap_worker_printer

    def wrap(original):
        def print_to_stdstream(data, ignore_prefix):
            lines = data.get("lines") or []
            if file is not None and data.get("pid") != "autoscaler":  # the autoscaler's status report, every few seconds
                who = data.get("actor_name") or data.get("task_name") or ""
                for line in lines:
                    file.emit(logging.makeLogRecord({"name": "ray.worker", "levelno": logging.INFO, "levelname": "INFO",
                                                     "msg": f"({who} pid={data.get('pid')}) {line}"}))
            keep = [line for line in lines if not any(n in line for n in WORKER_NOISE)]
            if keep:
                original({**data, "lines": keep}, ignore_prefix)

        return print_to_stdstream

    wrap_worker_printer(wrap)


def close() -> None:
    """Removes (and closes) the handlers setup() added, and unwraps Ray's worker-line printer."""
    from .ray_compat import unwrap_worker_printer

    unwrap_worker_printer()
    for logger in [logging.getLogger()] + [logging.getLogger(n) for n in LIBRARY_LOGGERS]:
        for h in [h for h in logger.handlers if getattr(h, "_dpo_ray", False)]:
            logger.removeHandler(h)
            h.close()


def stage(name: str, counts=None):
    """Decorator for a stage's run(): one line when it starts, one when it ends with its counts and seconds."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            log.info("%s: started", name)
            t0 = time.time()
            result = fn(*args, **kwargs)
            detail = ""
            if counts is not None:
                try:
                    detail = " | " + counts(result)
                except (KeyError, TypeError, AttributeError, IndexError):
                    detail = ""
            log.info("%s: finished in %.1f s%s", name, time.time() - t0, detail)
            return result
        return inner
    return wrap


def summary_lines(summary: dict) -> list[str]:
    """The run's last words: accuracy (and win rate when judged), where the model and the MLflow run are, how to look."""
    if "trials" in summary:  # dpo-ray sweep
        return sweep_lines(summary)
    lines = []
    if summary.get("skipped"):
        lines.append("nothing to do: no new data and the same starting model as the last retrain")
    d = summary.get("data") or {}
    if d:
        lines.append(f"data: {d.get('rows_used')} pairs used ({d.get('train_rows')} train / {d.get('eval_rows')} eval), "
                     f"{d.get('rows_rejected')} rejected -> {d.get('rejects_file')}")
    t = summary.get("train") or {}
    if t.get("steps") is not None:
        loss = f", loss {t['loss_first']:.4f} -> {t['loss_last']:.4f}" if t.get("loss_first") is not None and t.get("loss_last") is not None else ""
        lines.append(f"train: {t['steps']} steps{loss}")
    ev, ref = summary.get("eval") or {}, summary.get("eval_reference") or {}
    if "rewards/accuracies" in ev:
        base = f" (the reference: {ref['rewards/accuracies']:.3f})" if "rewards/accuracies" in ref else ""
        lines.append(f"eval: reward accuracy {ev['rewards/accuracies']:.3f}{base}, margin {ev.get('rewards/margins', float('nan')):.3f}")
    if "generation/prompts" in ev:
        nan = float("nan")
        win = (f": win rate {ev['win_rate']:.3f} [{ev.get('win_rate_ci_low', nan):.3f}, {ev.get('win_rate_ci_high', nan):.3f}] over the reference "
               f"by the judge, p {ev.get('win_rate_p', nan):.3g} (95% interval; sign test against 0.5)" if "win_rate" in ev else "")
        lines.append(f"generations: {ev['generation/prompts']:.0f} prompts, {ev['generation/length_policy']:.1f} tokens a reply "
                     f"(the reference: {ev['generation/length_reference']:.1f}){win} -> eval_generations.json in the MLflow run")
    if summary.get("registry"):
        r = summary["registry"]
        lines.append(f"registry: {r.get('decision')}" + (f" (version {r['challenger_version']})" if r.get("challenger_version") else "")
                     + (f": {r['reason']}" if r.get("reason") else ""))
    if summary.get("model_dir"):
        lines.append(f"model: {summary['model_dir']}")
    if summary.get("output_dir"):
        lines.append(f"summary: {Path(summary['output_dir']) / 'summary.json'}")
    return lines + mlflow_lines(summary.get("mlflow_run_id"), summary.get("tracking_uri"))


def sweep_lines(summary: dict) -> list[str]:
    """A sweep's last words: its trials by status, the best one and where it went, the parent MLflow run."""
    counts = status_counts(summary["trials"])
    lines = [f"sweep: {len(summary['trials'])} trial(s): " + ", ".join(f"{n} {st.lower()}" for st, n in sorted(counts.items()))]
    if summary.get("interrupted"):
        lines.append("interrupted: run the same command again to continue")
    best = summary.get("best")
    if best:
        lines.append(f"best: trial {best['trial_id']} {best['overrides']}: {summary['metric']} {best[summary['metric']]:.4f}")
        lines.append(f"model: {best['model_dir']}")
        if best.get("registry"):
            lines.append(f"registry: {best['registry'].get('decision')}")
    if summary.get("output_dir"):
        lines.append(f"summary: {Path(summary['output_dir']) / 'sweep_summary.json'}")
    return lines + mlflow_lines(summary.get("mlflow_parent_run_id"), summary.get("tracking_uri"))


def status_counts(trials: list[dict]) -> dict[str, int]:
    """{status: trials with it} of a sweep's trial rows."""
    out: dict[str, int] = {}
    for t in trials:
        out[t["status"]] = out.get(t["status"], 0) + 1
    return out


def mlflow_lines(run_id: str | None, uri: str | None) -> list[str]:
    if not (run_id and uri):
        return []
    ui = "--host 127.0.0.1" if uri.startswith("http") else f"--backend-store-uri {uri} --host 127.0.0.1"
    return [f"MLflow run {run_id} at {uri}", "open it: " + (f"{uri}" if uri.startswith("http") else f"mlflow ui {ui}")]


def print_summary(summary: dict, file=None) -> None:
    for line in summary_lines(summary):
        print(line, file=file or sys.stdout)
