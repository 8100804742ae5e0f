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

__all__ = ["DEFAULT_WORKER_GROUP_START_TIMEOUT_S", "WORKER_GROUP_START_TIMEOUT_S_ENV_VAR", "tune_trial_statuses"]


def tune_trial_statuses(results) -> dict[str, str]:
    """trial_id -> Tune's status of each trial in a ray.tune.ResultGrid: TERMINATED, ERROR, or PENDING / RUNNING
    after an interrupt. These are Tune's in-memory trials as the run left them (see the module docstring)."""
    try:
        trials = results._experiment_analysis.trials
        return {t.trial_id: t.status for t in trials}
    except AttributeError as e:
        raise RuntimeError(f"ray {ray.__version__}: ResultGrid._experiment_analysis.trials (trial_id, status) is gone "
                           f"(dpo-ray is tested with ray==2.60.0, constraints.txt): install that version, or update "
                           f"pipeline/ray_compat.py tune_trial_statuses") from e
