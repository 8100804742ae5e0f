"""What the train loop keeps beside its step: which pairs each step trains (and their digest), rank 0's tracker and log
lines, step timing and the step line, the test pacing, the step's derived metrics and the report's window.

No Ray, no collectives: train_loop.py makes every call that other ranks must match. Rank-0-only work goes through
Tracker, whose calls do nothing on the other ranks, so the loop has no `if rank == 0`.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass

import numpy as np

from .rows import step_positions

log = logging.getLogger("dpo_ray")


class Tracker:
    """The run's MLflow logger and the console, as rank 0 has them: on every other rank each call does nothing (the
    logger is tracking.NoLogger there: run_logger(enabled=rank == 0); the lines are rank 0's), as nanochat's print0
    and DummyWandb do."""

    def __init__(self, logger, rank: int):
        self.logger, self.rank0 = logger, rank == 0

    def set_tag(self, key: str, value: str) -> None:
        self.logger.set_tag(key, value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.logger.log_metrics(metrics, step=step)

    def flush(self) -> None:
        self.logger.flush()

    def info(self, msg: str, *args) -> None:
        if self.rank0:
            log.info(msg, *args)

    def warning(self, msg: str, *args) -> None:
        if self.rank0:
            log.warning(msg, *args)


def pairs_digest(positions) -> float:
    """A step's pairs (their places in the row_id-ordered index) as one number: the first 48 bits of a SHA-1 of the
    sorted positions, exact in a float64 metric."""
    data = np.sort(np.asarray(positions, dtype=np.int64)).tobytes()
    return float(int(hashlib.sha1(data).hexdigest()[:12], 16))


@dataclass(frozen=True)
class StepPlan:
    """Which pairs each rank trains at each step: a fixed 1/world slice of each epoch's seeded permutation of the
    n_pairs index positions (dpo_ray.rows.step_positions). A step is train.step_pairs pairs at any world size (elastic
    runs): accumulation takes up the difference."""

    n_pairs: int
    seed: int
    pairs_per_step: int
    steps_per_epoch: int
    total_steps: int
    rank: int
    world: int
    bs: int  # pairs per micro-batch per worker (train.batch_size_per_worker)
    accum: int  # micro-batches per worker per step

    @classmethod
    def of(cls, n_pairs: int, t, seed: int, rank: int, world: int) -> "StepPlan":
        pairs_per_step = t.step_pairs
        steps_per_epoch = n_pairs // pairs_per_step
        if steps_per_epoch == 0:
            raise ValueError(f"train: {n_pairs} pairs are fewer than one step needs ({pairs_per_step} = train.pairs_per_step, "
                             f"or batch_size_per_worker x num_workers x grad_accum_steps)")
        total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)
        return cls(n_pairs, seed, pairs_per_step, steps_per_epoch, total_steps, rank, world, t.batch_size_per_worker, t.accum_for(world))

    def positions(self, step: int, rank: int | None = None) -> np.ndarray:
        """A rank's (default: this one's) bs x accum index positions of the step."""
        return step_positions(self.n_pairs, self.seed, step, self.steps_per_epoch, self.rank if rank is None else rank,
                              self.world, self.bs, self.accum)

    def digest(self, step: int) -> float | None:
        """Which pairs the step trained over all ranks (pairs_digest): the same at any world size and after any restart,
        what the elastic tests compare. Rank 0 only (None elsewhere): only it logs the number."""
        if self.rank != 0:
            return None
        return pairs_digest(np.concatenate([self.positions(step, r) for r in range(self.world)]))


def start_line(t, plan: StepPlan, index_mb: float, packed: bool, bf16: bool, device_type: str, n_trainable: int) -> str:
    """The derived numbers of the run, said once at the start (rank 0)."""
    return ("train: %d pairs (index %.1f MB a worker), %d workers x %d pairs x %d accumulation = %d pairs/step, %d steps/epoch, "
            "%d steps, micro-batches %s, batches %s%s, precision %s, %s%s") % (
        plan.n_pairs, index_mb, plan.world, plan.bs, plan.accum, plan.pairs_per_step, plan.steps_per_epoch, plan.total_steps,
        f"of up to {t.max_tokens_per_micro_batch} packed tokens" if t.max_tokens_per_micro_batch else f"of {plan.bs} pairs",
        f"packed (prompt once per pair, no padding; {t.attention} attention)" if packed else "padded to the longest sequence",
        ", activation checkpointing" if t.gradient_checkpointing else "",
        "bf16 autocast" if bf16 else "fp32 (set train.bf16=true to force bf16; this CPU has no native bf16)" if device_type == "cpu" else "fp32",
        f"{t.strategy}{' + cpu offload' if t.cpu_offload else ''}",
        f", LoRA r={t.lora.r} on {t.lora.target_modules}: {n_trainable:,} trainable parameters" if t.lora is not None else "")


class Pacing:
    """DPO_RAY_STEP_DELAY_S seconds added to every step, for the fault tests only (tests/test_cluster.py): a run slow
    enough that a node can be killed mid-run. Unset: no delay. The delay counts in the step's seconds."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    @classmethod
    def from_env(cls) -> "Pacing":
        return cls(float(os.environ.get("DPO_RAY_STEP_DELAY_S", 0)))

    def wait(self) -> None:
        if self.seconds:
            time.sleep(self.seconds)


class Progress:
    """Each trained step's seconds (from its read to its metrics) and, every log_every steps and at the last, the step
    line on rank 0 with an ETA from the recent steps; the metrics so far go to MLflow with it."""

    def __init__(self, tracker: Tracker, total_steps: int, log_every: int):
        self.tracker, self.total_steps, self.log_every = tracker, total_steps, log_every
        self.times: list[float] = []
        self.t0 = 0.0

    def start(self) -> None:
        self.t0 = time.time()

    def stop(self) -> float:
        self.times.append(time.time() - self.t0)
        return self.times[-1]

    def log(self, step: int, m: dict, lr: float) -> None:
        if (step + 1) % self.log_every and step + 1 != self.total_steps:
            return
        recent = self.times[-self.log_every:]
        eta = (self.total_steps - step - 1) * sum(recent) / len(recent)
        self.tracker.info("step %d/%d | loss %.4f | rewards chosen %.3f rejected %.3f acc %.2f margin %.3f | grad %.2f | lr %.2e | %.0f tok/s | ETA %dm%02ds",
                          step + 1, self.total_steps, m["loss"], m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"],
                          m["rewards/margins"], m["grad_norm"], lr, m["tokens_per_second"], eta // 60, eta % 60)
        self.tracker.flush()


def mark_compiled(compiled, tracker: Tracker):
    """train.compile's stats (None without it): after the first step, say once what compiling cost; recompiles count
    from there (mark_warm)."""
    if compiled is not None:
        if compiled.after_warm is None:
            tracker.info("train.compile: %d graphs compiled in %.1f s in the first step", compiled.graphs, compiled.seconds)
        compiled.mark_warm()
    return compiled


def finish_metrics(m: dict, lr: float, world: int, seconds: float, *, compiled, digest: float | None, peak_flops: float | None,
                   peaks: list[float], cuda: bool) -> dict:
    """train_step's metrics (means over workers; tokens and model FLOPs summed) completed with the step's lr, world
    size, compile counts, pairs digest, throughput and the largest worker's memory peaks (host RSS, GPU allocated)."""
    m["learning_rate"] = lr
    m["world_size"] = world
    if compiled is not None:
        m.update(compiled.metrics())
    if digest is not None:
        m["pairs_digest"] = digest
    m["tokens_per_second"] = m.pop("tokens") / seconds
    # honest MFU: the model FLOPs the step executed (prompt once, the head where it runs, attention by the masks)
    # over the datasheet's dense bf16 peak of every worker's GPU (dpo_ray/flops.py); not on CPUs (no datasheet)
    m["model_tflops_per_second"] = m["model_flops"] / seconds / 1e12
    if peak_flops:
        m["mfu"] = m["model_flops"] / seconds / (peak_flops * world)
    m["step_seconds"] = seconds
    m["host_memory_peak_mb"] = peaks[0]
    if cuda:
        m["gpu_peak_memory_mb"] = peaks[1]
    return m


def report_metrics(m: dict, step: int, total_steps: int, loss_first: float | None) -> dict:
    """What a checkpoint's report says of the run so far (ray.train.Result.metrics; pipeline/train.py reads them)."""
    return {"step": step, "loss_first": loss_first, "loss_last": m["loss"], "tokens_per_second": m["tokens_per_second"],
            "total_steps": total_steps, "host_memory_peak_mb": m["host_memory_peak_mb"],
            "gpu_peak_memory_mb": m.get("gpu_peak_memory_mb"), "compile_seconds": m.get("compile_seconds"), "mfu": m.get("mfu"),
            "recompiles": m.get("recompiles")}


class ReportWindow:
    """The steps since the last report: each report carries their mean loss and reward accuracy, what a sweep's ASHA
    scheduler compares."""

    def __init__(self):
        self.steps: list[tuple[float, float]] = []

    def add(self, m: dict) -> None:
        self.steps.append((m["loss"], m["rewards/accuracies"]))

    def take(self) -> dict:
        """The means, and a new window."""
        w, self.steps = self.steps, []
        return {"train/loss": sum(s[0] for s in w) / len(w), "train/rewards/accuracies": sum(s[1] for s in w) / len(w)}
