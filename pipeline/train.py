"""Stage 3, train: Ray Train TorchTrainer over dpo_ray.train_loop.train_loop_per_worker -> final checkpoint."""
from __future__ import annotations

from pathlib import Path

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from dpo_ray import checkpoint
from dpo_ray.rows import CacheReadError
from dpo_ray.train_loop import train_loop_per_worker

from . import console
from .artifacts import fingerprint
from .reference import split_files

# train config keys that change how the work is split over workers or logged, not what is computed
WORKER_LAYOUT = {"max_failures", "log_every", "num_workers", "batch_size_per_worker", "grad_accum_steps", "cpus_per_worker",
                 "torch_threads", "use_gpu", "cpu_offload", "gpu_memory_gb", "resume_from", "prefetch_steps"}


@console.stage("train", lambda r: f"{r.metrics['step']} steps, loss {r.metrics['loss_first']:.4f} -> {r.metrics['loss_last']:.4f}")
def run(cfg, ref, policy_path: str, pad_id: int, use_gpu: bool, cpus_per_worker: float, tracking_uri: str | None, run_id: str | None,
        name: str | None = None, callbacks: list | None = None):
    """Returns the ray.train.Result. The Ray run name is a fingerprint of the inputs and the train config, so rerunning
    the same thing resumes its last checkpoint instead of starting over, also with another number of workers: the
    name keeps the pairs per step, not how they are split over workers. A sweep's trial passes its own name (its trial
    id) and Ray Tune's TuneReportCallback."""
    t = cfg.train
    if t.resume_from and "://" not in t.resume_from:  # checked here, before any worker starts (object stores: by the workers)
        problem = checkpoint.mismatch(Path(t.resume_from), t.strategy, t.lora is not None)
        if problem:
            raise TrainingError(f"train.resume_from: {problem}")
    name = name or "dpo-" + fingerprint(ref.key, policy_path, t.model_dump(exclude=WORKER_LAYOUT), t.batch_size_per_worker * t.num_workers * t.grad_accum_steps, cfg.seed)
    storage = cfg.train.storage_path or str(Path(cfg.output_dir).resolve() / "ray_train")
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg.model_dump(), "policy_path": policy_path, "pad_id": pad_id,
                           "tracking_uri": tracking_uri, "run_id": run_id,
                           # the workers read their own rows of each step from these files (dpo_ray/rows.py): no Ray
                           # Dataset, so nothing of the train set passes through the object store
                           "train_files": split_files(ref.parts, "train"), "drop_ids": list(ref.drop_ids)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}),
        run_config=RunConfig(name=name, storage_path=storage, failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )
    try:
        return trainer.fit()
    except Exception as e:  # Ray wraps worker errors; surface the ones a user acts on as one line
        raise training_error(e) from e


class TrainingError(RuntimeError):
    """Training stopped for a reason the user can act on (non-finite loss, a cached file that cannot be read)."""


def training_error(err: BaseException) -> BaseException:
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (FloatingPointError, CacheReadError)):
            return TrainingError(str(e))
        e = e.__cause__ or e.__context__
    text = str(err)
    for name in ("FloatingPointError: ", "CacheReadError: "):  # a worker's exception arrives as text in Ray's WorkerGroupError
        if name in text:
            return TrainingError(text.split(name, 1)[1].splitlines()[0])
    return err
