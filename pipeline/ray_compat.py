"""Private Ray names that the pipeline reads, in one place: why Ray 2.60 (constraints.txt) has no public way to get
them, and one clear error if a Ray release moves them.

- The default wait for Ray Train's worker group to start (pipeline/train.py, placement_tries). The variable
  RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S is Ray's to read, and users may set it (Ray's own
  WorkerGroupStartupTimeoutError tells them to), but its default lives only in ray.train.v2._internal.constants. The
  default has changed before (30 s to 60 s, ray-project/ray#60376), so it is read from Ray, not copied here.
- Each Tune trial's status (pipeline/sweep.py, trial_rows). ResultGrid gives each trial's Result (metrics, error, path)
  but not its status: only the counts num_errors and num_terminated. The trials it was built from are in the private
  ResultGrid._experiment_analysis. The public tune.ExperimentAnalysis(results.experiment_path) loads them again from
  the experiment snapshot instead. Tune writes that snapshot before it stops the trials still running, and a RUNNING
  trial loads back as PENDING, so after an interrupt it gives other statuses than the in-memory trials (which end
  TERMINATED). It also reads every trial's result files again.
- The printer of the lines Ray forwards from workers to the driver (pipeline/console.py: the run's log file gets them
  all, the console not Ray's own noise). Ray 2.60 binds ray._private.worker.print_to_stdstream as the driver's handler
  when it connects; the public choice is all or nothing (ray.init(log_to_driver=...)), with no filter or handler.

Drop a name from here when a public API gives the same answer, and bump the Ray version named above.
"""
from __future__ import annotations

import ray

try:
    from ray.train.v2._internal.constants import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
except ImportError as e:  # a Ray release that moved them: say which and where, not a bare ImportError from pipeline/train.py
    raise ImportError(f"ray {ray.__version__} has no ray.train.v2._internal.constants.DEFAULT_WORKER_GROUP_START_TIMEOUT_S "
                      f"(dpo-ray is tested with ray==2.60.0, constraints.txt): install that version, or update "
                      f"pipeline/ray_compat.py") from e

__all__ = ["DEFAULT_WORKER_GROUP_START_TIMEOUT_S", "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR", "tune_trial_statuses", "wrap_worker_printer",
           "unwrap_worker_printer"]


def tune_trial_statuses(results) -> dict[str, str]:
    """trial_id -> Tune's status of each trial in a ray.tune.ResultGrid (TERMINATED, ERROR; PENDING for a trial not
    started when the sweep was interrupted): Tune's in-memory trials as the run left them, where a trial still running
    at an interrupt has been stopped and reads TERMINATED (Ray 2.60's TuneController.cleanup)."""
    try:
        trials = results._experiment_analysis.trials
        return {t.trial_id: t.status for t in trials}
    except AttributeError as e:
        raise RuntimeError(f"ray {ray.__version__}: ResultGrid._experiment_analysis.trials (trial_id, status) is gone "
                           f"(dpo-ray is tested with ray==2.60.0, constraints.txt): install that version, or update "
                           f"pipeline/ray_compat.py tune_trial_statuses") from e


def wrap_worker_printer(wrap) -> None:
    """Ray's printer of forwarded worker lines replaced by wrap(the original printer) (called before ray.init, which
    binds it); a no-op where Ray has no such printer."""
    import ray._private.worker as rw

    original = getattr(rw, "print_to_stdstream", None)
    original = getattr(original, "_wrapped", original)
    if original is None:
        return
    printer = wrap(original)
    printer._wrapped = original
    rw.print_to_stdstream = printer


def unwrap_worker_printer() -> None:
    """Ray's own printer back in place."""
    import ray._private.worker as rw

    if hasattr(rw, "print_to_stdstream"):
        rw.print_to_stdstream = getattr(rw.print_to_stdstream, "_wrapped", rw.print_to_stdstream)
