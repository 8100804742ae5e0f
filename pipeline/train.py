"""Stage 3, train: Ray Train TorchTrainer over dpo_ray.train_loop.train_loop_per_worker -> final checkpoint."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dpo_ray import checkpoint
from dpo_ray.errors import UserError
from dpo_ray.rows import CacheReadError
from dpo_ray.train_loop import train_loop_per_worker

from . import console
from .artifacts import fingerprint
from .export import export_model
from .ray_compat import DEFAULT_WORKER_GROUP_START_TIMEOUT_S, WORKER_GROUP_START_TIMEOUT_S_ENV_VAR
from .reference import causes, split_files

log = logging.getLogger("dpo_ray")

# train config keys that change how the work is split over workers or logged, not what is computed
WORKER_LAYOUT = {"max_failures", "placement_timeout_s", "worker_resources", "resize_interval_s", "log_every", "num_workers", "batch_size_per_worker", "grad_accum_steps", "pairs_per_step", "cpus_per_worker",
                 "torch_threads", "use_gpu", "cpu_offload", "gpu_memory_gb", "resume_from", "prefetch_steps", "preemption_lead_s"}


@dataclass
class Trained:
    """What the train stage made: the directory to evaluate and log (the model, or an unmerged LoRA adapter) and the
    run's figures (steps, first and last loss, tokens/s, peaks, the checkpoint)."""

    model_dir: Path
    summary: dict


def train_policy(cfg, ctx, ref, run_id: str | None = None, name: str | None = None, callbacks: list | None = None) -> Trained:
    """Stage 3: the policy trained on the cached reference (`fit`), exported to <output_dir>/model (and adapter)."""
    result = fit(cfg, ctx, ref, run_id, name, callbacks)
    model_dir = export_model(result.checkpoint, ctx.tokenizer, ctx.out_dir, cfg, ctx.policy_path)
    m = result.metrics or {}
    return Trained(model_dir, {
        "steps": m.get("step"), "loss_first": m.get("loss_first"), "loss_last": m.get("loss_last"),
        "tokens_per_second": m.get("tokens_per_second"), "checkpoint": result.checkpoint.path,
        **({"mfu": m["mfu"]} if m.get("mfu") is not None else {}),  # on GPUs with a known datasheet peak
        # the largest worker's peaks (MB): host RSS, and allocated GPU memory on GPUs
        "host_memory_peak_mb": m.get("host_memory_peak_mb"), "gpu_peak_memory_mb": m.get("gpu_peak_memory_mb"),
        # train.compile: seconds compiling (the first step) and graphs compiled again after it
        **({"compile_seconds": m["compile_seconds"], "recompiles": m.get("recompiles")} if m.get("compile_seconds") is not None else {})})


@console.stage("train", lambda r: f"{r.metrics['step']} steps, loss {r.metrics['loss_first']:.4f} -> {r.metrics['loss_last']:.4f}")
def fit(cfg, ctx, ref, run_id: str | None = None, name: str | None = None, callbacks: list | None = None):
    """Ray Train over the workers the context planned (ctx.use_gpu, ctx.cpus_per_worker); returns the ray.train.Result
    (its MLflow metrics go to `run_id`). The Ray run name is a fingerprint of the inputs and the train config, so rerunning
    the same thing resumes its last checkpoint instead of starting over, also with another number of workers: the
    name keeps the pairs per step, not how they are split over workers. A sweep's trial passes its own name (its trial
    id) and Ray Tune's TuneReportCallback."""
    t = cfg.train
    for key in ("resume_from", "optimizer_from"):  # checked here, before any worker starts (object stores: by the workers)
        if (path := getattr(t, key)) and "://" not in path and (problem := checkpoint.mismatch(Path(path), t.strategy, t.lora is not None)):
            raise TrainingError(f"train.{key}: {problem}")
    use_gpu, cpus_per_worker = ctx.use_gpu, ctx.cpus_per_worker
    name = name or "dpo-" + fingerprint(ref.key, ctx.policy_path, t.model_dump(exclude=WORKER_LAYOUT), t.step_pairs, cfg.seed)
    storage = cfg.train.storage_path or str(Path(cfg.output_dir).resolve() / "ray_train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "policy_path": ctx.policy_path, "pad_id": ctx.tokenizer.pad_token_id,
                           "tracking_uri": ctx.uri, "run_id": run_id,
                           # the workers read their own rows of each step from these files (dpo_ray/rows.py): no Ray
                           # Dataset, so nothing of the train set passes through the object store
                           "train_files": split_files(ref.parts, "train"), "drop_ids": list(ref.drop_ids)},
        scaling_config=ScalingConfig(num_workers=(t.min_workers, t.max_workers) if t.elastic else t.max_workers, use_gpu=use_gpu,
                                     resources_per_worker={"CPU": cpus_per_worker, **t.worker_resources},
                                     elastic_resize_monitor_interval_s=t.resize_interval_s),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(
                                 max_failures=t.max_failures, controller_failure_limit=placement_tries(t.placement_timeout_s),
                                 # a preemption's restart this long before the drain's deadline (the grace's sign: earlier)
                                 preemption_grace_s=-t.preemption_lead_s),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )
    wait = f"up to train.placement_timeout_s={t.placement_timeout_s:g} s in all" if t.placement_timeout_s else "for ever"
    log.info("train: %s worker(s) of %s, %d pairs a step; restarts from the last checkpoint after a lost worker: up to "
             "train.max_failures=%d; waiting %s for workers that cannot be placed%s",
             f"{t.min_workers} to {t.max_workers} (elastic)" if t.elastic else t.max_workers,
             worker_resources(use_gpu, cpus_per_worker, t.worker_resources), t.step_pairs, t.max_failures, wait,
             "; with fewer workers when nodes are lost, more when they return" if t.elastic else "")
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the ones a user acts on as one line
        raise training_error(e, t, use_gpu, cpus_per_worker) from e


def worker_resources(use_gpu: bool, cpus_per_worker: float, extra: dict | None = None) -> str:
    return "{" + ", ".join([f"CPU: {cpus_per_worker:g}"] + (["GPU: 1"] if use_gpu else []) + [f"{k}: {v:g}" for k, v in (extra or {}).items()]) + "}"


def placement_tries(timeout_s: float | None) -> int:
    """Ray Train's controller_failure_limit for train.placement_timeout_s: each try to place the workers waits
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S (60 s by default) before it counts as a failure; -1: wait forever."""
    if timeout_s is None:
        return -1
    per_try = float(os.environ.get(WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, DEFAULT_WORKER_GROUP_START_TIMEOUT_S))
    return max(0, math.ceil(timeout_s / per_try) - 1)


def placement_message(t, use_gpu: bool, cpus_per_worker: float) -> str:
    """One line: what training waited for, what the cluster has now, and what to change."""
    import ray

    free = ray.available_resources() if ray.is_initialized() else {}
    alive = sum(1 for n in (ray.nodes() if ray.is_initialized() else []) if n.get("Alive"))
    want = t.min_workers
    return (f"train: {want} worker(s) of {worker_resources(use_gpu, cpus_per_worker, t.worker_resources)} could not be placed within "
            f"train.placement_timeout_s={t.placement_timeout_s:g} s (train.max_failures={t.max_failures}); the cluster has "
            f"{alive} node(s) alive, {free.get('CPU', 0):g} CPU(s) and {free.get('GPU', 0):g} GPU(s) free; bring the lost "
            f"node(s) back, or set train.num_workers lower or to [min, max] (elastic)")


class TrainingError(UserError, RuntimeError):
    """Training stopped for a reason the user can act on (non-finite loss, a cached file that cannot be read)."""


def training_error(err: BaseException, t=None, use_gpu: bool = False, cpus_per_worker: float = 1.0) -> BaseException:
    for e in causes(err):
        if isinstance(e, (FloatingPointError, CacheReadError)):
            return TrainingError(str(e))
    text = str(err)
    failure = getattr(err, "controller_failure", None)  # ray.train.ControllerError: what the controller raised
    if t is not None and (type(failure).__name__ == "WorkerGroupStartupTimeoutError" or "worker group startup timed out" in text):
        return TrainingError(placement_message(t, use_gpu, cpus_per_worker))
    for name in ("FloatingPointError: ", "CacheReadError: "):  # a worker's exception arrives as text in Ray's WorkerGroupError
        if name in text:
            return TrainingError(text.split(name, 1)[1].splitlines()[0])
    return err
