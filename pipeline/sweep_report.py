"""What a sweep reports: one row per trial (status, metric, MLflow run), the best trial, what the sweep cost (and
what scoring the reference once per trial would have), the parent run's trials table and plot."""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

from .artifacts import write_json_atomic
from .console import status_counts
from .ray_compat import tune_trial_statuses

log = logging.getLogger("dpo_ray")


def trial_rows(results, s) -> list[dict]:
    """One row per trial: id, overrides, status (FINISHED, STOPPED early, ERROR ...), metric, steps, error."""
    statuses = tune_trial_statuses(results)  # PENDING: not started before an interrupt
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name
        tid = next((t for t in statuses if t in str(r.path)), tid)
        status = statuses.get(tid, "TERMINATED")
        row = {"trial_id": tid, "overrides": r.config, "step": m.get("step"), "mlflow_run_id": m.get("mlflow_run_id"),
               s.metric: m.get(s.metric), **{k: m[k] for k in interval_keys(s.metric) if k in m}, "error": None}
        if r.error is not None:
            row["status"], row["error"] = "ERROR", first_line(r.error)
        elif status == "TERMINATED":
            row["status"] = "FINISHED" if m.get("eval_done") else "STOPPED"  # stopped by the scheduler before its end
        else:
            row["status"] = status
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


def interval_keys(metric: str) -> tuple[str, ...]:
    """The metric's interval and p where it has them (eval/win_rate: eval/win_rate_ci_low, _ci_high, _p)."""
    return (f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_p") if metric.endswith("win_rate") else ()


def close_stopped_runs(parent, trials: list[dict]) -> None:
    """A trial stopped by the scheduler never ended its MLflow run: KILLED, tagged, and its id put in the row."""
    stopped = {t["trial_id"]: t for t in trials if t["status"] == "STOPPED"}
    if not stopped:
        return
    client = parent.client
    exp_id = client.get_run(parent.run_id).info.experiment_id
    for run in client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent.run_id}'"):
        t = stopped.get(run.data.tags.get("dpo_ray.trial_id"))
        if t is not None:
            t["mlflow_run_id"] = run.info.run_id
            client.set_tag(run.info.run_id, "dpo_ray.stopped_early", f"at step {t['step']}")
            client.set_terminated(run.info.run_id, "KILLED")


def first_line(err: BaseException) -> str:
    """The user-facing line of a trial's error (Ray wraps it: the innermost 'XError: message' line)."""
    text = str(err)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]+(Error|Exception): ", ln)]
    return (lines[-1] if lines else text.splitlines()[0] if text else type(err).__name__)[:500]


def pick_best(trials: list[dict], s) -> dict | None:
    done = [t for t in trials if t["status"] == "FINISHED" and t.get(s.metric) is not None]
    if not done:
        log.error("sweep: no trial finished with %s; nothing exported", s.metric)
        return None
    return (max if s.mode == "max" else min)(done, key=lambda t: t[s.metric])


def record_invocation(out_dir: Path, state: dict, wall: float, stage_seconds: list[dict]) -> None:
    """This invocation's wall time and shared-stage seconds, in sweep.json: a continued sweep's cost adds them up."""
    state["invocations"] = state.get("invocations", []) + [{
        "wall_seconds": round(wall, 1), "prepare_seconds": round(sum(g["prepare_seconds"] for g in stage_seconds), 2),
        "reference_seconds": round(sum(g["reference_seconds"] for g in stage_seconds), 2)}]
    write_json_atomic(out_dir / "sweep.json", state)


def cost(wall: float, stage_seconds: list[dict], trials: list[dict], earlier: list[dict] = ()) -> dict:
    """The sweep's wall time, its shared stages' share, and what scoring the reference once per trial would cost; a
    continued sweep adds up its invocations (`earlier`: those before this one, from sweep.json)."""
    ran = [t for t in trials if t["status"] in ("FINISHED", "STOPPED")]
    wall += sum(e["wall_seconds"] for e in earlier)
    ref_now = sum(g["reference_seconds"] for g in stage_seconds) + sum(e["reference_seconds"] for e in earlier)
    prep_now = sum(g["prepare_seconds"] for g in stage_seconds) + sum(e["prepare_seconds"] for e in earlier)
    per_group_trials = max(1, len(ran)) / max(1, len(stage_seconds))  # trials are spread evenly over the grid's groups
    measured = [g["reference_seconds_measured"] for g in stage_seconds if g["reference_seconds_measured"] is not None]
    independent = sum(measured) * per_group_trials if len(measured) == len(stage_seconds) else None
    return {"wall_seconds": round(wall, 1), "prepare_seconds": round(prep_now, 1), "reference_seconds": round(ref_now, 1),
            "reference_share": round(ref_now / wall, 3) if wall else None, "reference_passes": len(stage_seconds),
            "trials_run": len(ran), "reference_seconds_one_pass_per_trial": round(independent, 1) if independent is not None else None,
            "invocations": len(earlier) + 1, "per_group": stage_seconds}


def log_cost(summary: dict) -> None:
    c, best = summary["cost"], summary.get("best")
    log.info("sweep: done in %.0f s%s, %d trial(s) (%s); reference: %d pass(es), %.0f s (%.0f%% of the wall time); %d independent "
             "runs would score it %d times%s | best: %s", c["wall_seconds"],
             f" over {c['invocations']} invocations (continued)" if c["invocations"] > 1 else "", len(summary["trials"]),
             ", ".join(f"{n} {st.lower()}" for st, n in sorted(status_counts(summary["trials"]).items())), c["reference_passes"],
             c["reference_seconds"], 100 * (c["reference_share"] or 0), c["trials_run"], c["trials_run"],
             f" (~{c['reference_seconds_one_pass_per_trial']:.0f} s)" if c["reference_seconds_one_pass_per_trial"] is not None else "",
             f"{best['trial_id']} {best['overrides']} -> {best['model_dir']}" if best else "none")


def log_parent(parent, summary: dict, s) -> None:
    """The parent run's trials table, the metric against each swept key (PNG), the best trial and the cost."""
    import pandas as pd

    rows = [{"trial_id": t["trial_id"], "status": t["status"], **{k: str(v) for k, v in t["overrides"].items()}, s.metric: t[s.metric],
             **{k: t.get(k) for k in interval_keys(s.metric)}, "step": t["step"], "error": t["error"] or "", "mlflow_run_id": t["mlflow_run_id"] or ""} for t in summary["trials"]]
    parent.call("trials table", parent.client.log_table, data=pd.DataFrame(rows), artifact_file="trials.json")
    path = Path(summary["output_dir"]) / "sweep.png"
    plot_space(summary["trials"], s, path)
    parent.call("sweep.png", parent.client.log_artifact, str(path))
    best = summary.get("best")
    if best:
        parent.call("best tags", lambda run_id: [parent.client.set_tag(run_id, k, v) for k, v in
                                                  {"best.trial_id": best["trial_id"], "best.mlflow_run_id": best["mlflow_run_id"] or "",
                                                   "best.overrides": json.dumps(best["overrides"])}.items()])
        parent.log_metrics({f"best/{s.metric}": best[s.metric]}, step=0)
    c = summary["cost"]
    parent.log_metrics({f"sweep/{k}": v for k, v in c.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, step=0)
    parent.log_metrics({f"sweep/trials_{st.lower()}": n for st, n in status_counts(summary["trials"]).items()}, step=0)
    parent.flush()


def plot_space(trials: list[dict], s, path: Path) -> None:
    """The metric against each swept key, one panel per key; categorical values on a categorical axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for t in trials for k in t["overrides"]})
    done = [t for t in trials if t[s.metric] is not None]
    fig, axes = plt.subplots(1, max(1, len(keys)), figsize=(4.5 * max(1, len(keys)), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        xs = [t["overrides"].get(key) for t in done]
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
        ax.scatter(xs if numeric else [str(x) for x in xs], [t[s.metric] for t in done])
        if numeric and xs and min(xs) > 0 and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(s.metric)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def drop_models(out_dir: Path, trials: list[dict], best: dict | None) -> None:
    """sweep.keep_models=false: the trials' exported models and train checkpoints go, the best's copy in best/ stays."""
    for t in trials:
        d = out_dir / "trials" / t["trial_id"]
        for name in ("model", "adapter", "ray_train"):
            shutil.rmtree(d / name, ignore_errors=True)
