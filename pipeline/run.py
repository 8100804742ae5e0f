"""`dpo-ray run` (and prepare, reference, train, evaluate, retrain): the stage sequence once, one MLflow run per call.

Checks that cost nothing come first (output dir, data, models, MLflow: pipeline/context.py), so a user mistake is
reported before any expensive work; finished stages are cache hits.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from dpo_ray.config import Config, masked
from dpo_ray.tracking import system_metrics

from . import register, sequence
from .artifacts import exclusive, write_json_atomic
from .context import Context, check_output_dir, preflight
from .lease import naming_run
from .mlflow_run import fail_run, finish_run, open_run
from .runtime import ray_runtime

log = logging.getLogger("dpo_ray")
STAGES = ("prepare", "reference", "train", "evaluate", "register")  # register runs only when registry.name is set
COMMANDS = {  # CLI command -> stages it runs; prepare and reference are cache look-ups when already done
    "prepare": ("prepare",),
    "reference": ("prepare", "reference"),
    "train": ("prepare", "reference", "train"),
    "evaluate": ("prepare", "reference", "evaluate"),
    "run": STAGES,
    "retrain": STAGES,  # run, but a no-op when neither the data nor the starting model changed since the last one
}


def run(cfg: Config, stages: tuple[str, ...] = STAGES, address: str | None = None, retrain: bool = False) -> dict:
    """Runs `stages` in order; returns the summary (also written to <output_dir>/summary.json).

    Holds <output_dir>/.dpo-ray.lock throughout: a second run on the same output directory exits at once.
    """
    out_dir = Path(cfg.output_dir).resolve()
    check_output_dir(out_dir)
    with exclusive(out_dir), naming_run(str(out_dir)):  # how this run's cache leases name it to waiting runs
        return _run(cfg, stages, address, retrain)


def _run(cfg: Config, stages: tuple[str, ...], address: str | None, retrain: bool) -> dict:
    t_start = time.time()
    ctx = preflight(cfg, stages)
    tracker = monitor = None
    with ray_runtime(address):
        try:
            ctx.on_cluster(cfg, trains="train" in stages)
            skip = RetrainSkip(cfg, ctx) if retrain else None
            shared = sequence.shared_part(cfg, ctx, stages, skip=skip)
            summary = {"output_dir": str(ctx.out_dir), "tracking_uri": ctx.uri, "reference_model_dir": ctx.reference_path,
                       "data": data_summary(shared.prepared, ctx.out_dir), **({"memory_plan_gb": ctx.memory_plan} if ctx.memory_plan else {})}
            if shared.skipped:
                return {**skip.last["summary"], "skipped": True}
            if shared.ref is None:
                return summary
            summary["reference_cache"] = shared.ref.summary()
            if stages[-1] == "reference":
                return summary

            tracker = open_run(cfg, ctx, shared.prepared, shared.ref, stages)
            monitor = system_metrics(ctx.uri, tracker.run_id, "driver", enabled=cfg.mlflow.system_metrics)
            summary["mlflow_run_id"] = tracker.run_id
            trained, evaluation, logged = sequence.trained_part(cfg, ctx, shared, tracker, stages)
            summary.update(trained)
            if evaluation is not None and "register" in stages and cfg.registry.name:
                summary["registry"] = sequence.registration(cfg, ctx, shared, tracker, evaluation, logged)
            summary["wall_seconds"] = round(time.time() - t_start, 1)
            finish_run(cfg, tracker, summary, ctx.out_dir, monitor)
            if skip is not None:
                skip.record(summary)
            log.info("done in %.0f s: model %s | summary %s | MLflow run %s at %s", summary["wall_seconds"], summary["model_dir"],
                     ctx.out_dir / "summary.json", tracker.run_id, ctx.uri)
            return summary
        except BaseException:
            fail_run(tracker)
            raise
        finally:
            if monitor is not None:
                monitor.finish()


class RetrainSkip:
    """`dpo-ray retrain` is a no-op when the data and config are as last time and the starting model is the one it
    started from or the champion it produced (else a promotion would trigger endless retraining)."""

    def __init__(self, cfg: Config, ctx: Context):
        self.cfg, self.ctx, self.file = cfg, ctx, ctx.out_dir / "last_retrain.json"
        self.last = json.loads(self.file.read_text()) if self.file.exists() else {}
        self.key = None

    def __call__(self, prepared) -> bool:
        self.key = {"data": prepared.key, "config": json.dumps(masked(self.cfg.model_dump()), sort_keys=True)}
        if self.last.get("key") == self.key and self.ctx.policy_path in self.last.get("policies", []):
            log.info("retrain: no new data and the same starting model as the last retrain; nothing to do")
            return True
        return False

    def record(self, summary: dict) -> None:
        policies = [self.ctx.policy_path]
        if summary.get("registry", {}).get("decision") == "promoted":
            policies.append(str(register.registry_dir(self.ctx.cache, self.cfg.registry.name, summary["registry"]["challenger_version"])))
        write_json_atomic(self.file, {"key": self.key, "policies": policies, "summary": summary})


def data_summary(prepared, out_dir: Path) -> dict:
    return {**{k: prepared.stats[k] for k in ("rows_read", "rows_used", "rows_rejected", "duplicates", "blank_lines",
                                               "train_rows", "eval_rows", "truncated", "rejects_by_reason", "layouts", "per_file")},
            "rejects_file": str(out_dir / "rejects.jsonl"), "key": prepared.key, "hit": prepared.hit,
            "files": [{"file": str(p.file), "prepared": str(p.path), "hit": p.hit} for p in prepared.parts]}
