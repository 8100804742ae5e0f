"""train_loop_per_worker(config): the whole DPO step loop, top to bottom, run by each Ray Train worker.

The batch order is [chosen; rejected] (2B, T); reference log-probs come from the cached columns, so
no reference model is loaded here. Every worker reads the whole (small, tokenized) train table and
takes a fixed 1/world slice of each epoch's seeded permutation: the data order is then independent
of Ray's scheduling, which is what makes a resumed run equal to an uninterrupted one.
"""
from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from . import checkpoint, parallel
from .config import Config
from .forward import autocast, use_bf16
from .losses import dpo_loss
from .metrics import dpo_metrics
from .tracking import run_logger, system_metrics

log = logging.getLogger("dpo_ray")
COLUMNS = ["row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask", "ref_chosen_logps", "ref_rejected_logps"]


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_rows(shard) -> dict[str, list]:
    """The whole train table as Python lists, sorted by row_id (so the order never depends on Ray)."""
    import pyarrow as pa

    table = pa.concat_tables(list(shard.iter_batches(batch_format="pyarrow", batch_size=4096)))
    table = table.select(COLUMNS).sort_by("row_id")
    return {k: table.column(k).to_pylist() for k in COLUMNS}


def take(rows: dict[str, list], idx: list[int]) -> dict[str, list]:
    return {k: [v[i] for i in idx] for k, v in rows.items()}


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(t.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    tracker = run_logger(config["tracking_uri"], config["run_id"], enabled=rank == 0)
    monitor = system_metrics(config["tracking_uri"], config["run_id"], "train_rank0", enabled=rank == 0 and cfg.mlflow.system_metrics)

    # [1] data: the whole table on every worker, a seeded permutation per epoch, a fixed slice per rank
    rows = load_rows(ray.train.get_dataset_shard("train"))
    n_pairs, bs, accum = len(rows["row_id"]), t.batch_size_per_worker, t.grad_accum_steps
    pairs_per_step = bs * world * accum
    steps_per_epoch = n_pairs // pairs_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"train: {n_pairs} pairs are fewer than one step needs ({pairs_per_step} = batch_size_per_worker x workers x grad_accum_steps)")
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)

    # [2] model and optimizer: ddp (a full copy per worker) or fsdp (sharded), optionally LoRA (dpo_ray.parallel);
    # fp32 master weights; bf16 inside autocast (ddp) or as FSDP2's compute copies of the parameters (fsdp)
    bf16 = use_bf16(t.bf16, device)
    fsdp, lora = t.strategy == "fsdp", t.lora is not None
    policy, wrapper, model = parallel.build_policy(cfg, config["policy_path"], rank, world, device, bf16)
    optimizer = parallel.make_optimizer(policy, t, device)
    precision = autocast(bf16, device)  # the reference and evaluation scorers compute the same way (dpo_ray.scoring)
    start_step, loss_first = 0, None
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(t.resume_from) if t.resume_from else None)  # Ray's own first
    if ckpt:
        with ckpt.as_directory() as d:
            state = checkpoint.load(Path(d), policy, model, optimizer, fsdp, lora)
        start_step, loss_first = state["step"], state.get("loss_first")
        log.info("rank %d: resumed from checkpoint at step %d", rank, start_step)
    if rank == 0:
        n_train = sum(p.numel() for p in parallel.trainable(model))
        log.info("train: %d pairs, %d workers x %d pairs x %d accumulation = %d pairs/step, %d steps/epoch, %d steps, "
                 "batches %s%s, precision %s, %s%s", n_pairs, world, bs, accum, pairs_per_step, steps_per_epoch, total_steps,
                 f"packed (prompt once per pair, no padding; {t.attention} attention)" if wrapper.packed else "padded to the longest sequence",
                 ", activation checkpointing" if t.gradient_checkpointing else "",
                 "bf16 autocast" if bf16 else "fp32 (set train.bf16=true to force bf16; this CPU has no native bf16)" if device.type == "cpu" else "fp32",
                 f"{t.strategy}{' + cpu offload' if t.cpu_offload else ''}",
                 f", LoRA r={t.lora.r} on {t.lora.target_modules}: {n_train:,} trainable parameters" if lora else "")

    # [3] the loop
    policy.train()
    nonfinite, t_start, step_times, last = 0, time.time(), [], {}
    order, order_epoch = [], -1
    for step in range(start_step, total_steps):
        t0 = time.time()
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the permutation is a function of (seed, epoch): built once per epoch
            order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch)).tolist()
            order_epoch = epoch
        lr = lr_at(step, total_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        parts, tokens = [], 0
        for micro in range(accum):
            first = ((pos * accum + micro) * world + rank) * bs
            batch = wrapper.collate(take(rows, order[first : first + bs]), config["pad_id"], device)
            tokens += batch["tokens"]  # real tokens of the chosen and rejected sequences (prompt counted in both)
            with parallel.sync_gradients(policy, world, last_micro=micro == accum - 1):  # reduce once per step
                with precision:
                    logps, counts = policy(batch)  # (2B,) order [chosen; rejected]
                pc, pr, lc, lr_ = logps[:bs], logps[bs:], counts[:bs], counts[bs:]
                losses, cr, rr = dpo_loss(pc, pr, batch["ref_chosen_logps"], batch["ref_rejected_logps"], beta=t.beta,
                                          loss_type=t.loss_type, label_smoothing=t.label_smoothing, chosen_lengths=lc,
                                          rejected_lengths=lr_, simpo_gamma=t.simpo_gamma)
                loss = losses.mean()
                if t.nll_weight > 0:  # RPO: NLL of the chosen reply, per token
                    loss = loss + t.nll_weight * (-pc.sum() / lc.sum())
                (loss / accum).backward()
            parts.append((losses.detach(), cr, rr, pc.detach(), pr.detach()))
        grad_norm = parallel.clip_gradients(policy, t.max_grad_norm)
        losses, cr, rr, pc, pr = (torch.cat(x) for x in zip(*parts))
        if not (torch.isfinite(grad_norm) and torch.isfinite(losses).all()):
            optimizer.zero_grad(set_to_none=True)  # skip the update: the weights stay as they were
            nonfinite += 1
            log.warning("rank %d step %d: non-finite loss or gradient, update skipped (%d in a row)", rank, step + 1, nonfinite)
            if nonfinite >= t.max_nonfinite_steps:
                raise FloatingPointError(f"train: {nonfinite} consecutive non-finite steps, the last at step {step + 1}; "
                                         f"the last good checkpoint is kept; lower train.lr or check the data")
            continue
        nonfinite = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        # metrics: this worker's pairs, then the mean over workers (equal pair counts per worker)
        m = {"loss": losses.mean().item(), **dpo_metrics(cr, rr, pc, pr), "grad_norm": float(grad_norm), "learning_rate": lr}
        vec = torch.tensor(list(m.values()) + [tokens], dtype=torch.float64)
        if world > 1:
            dist.all_reduce(vec)
            vec[:-1] /= world
        m = dict(zip(m, vec[:-1].tolist()))
        step_times.append(time.time() - t0)
        m["tokens_per_second"] = vec[-1].item() / step_times[-1]
        m["step_seconds"] = step_times[-1]
        if device.type == "cuda":  # this worker's peak of allocated GPU memory so far
            m["gpu_peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        loss_first = m["loss"] if loss_first is None else loss_first
        tracker.log_metrics({f"train/{k}": v for k, v in m.items()}, step=step + 1)
        last = m
        if rank == 0 and ((step + 1) % t.log_every == 0 or step + 1 == total_steps):
            recent = step_times[-t.log_every:]
            eta = (total_steps - step - 1) * sum(recent) / len(recent)
            log.info("step %d/%d | loss %.4f | rewards chosen %.3f rejected %.3f acc %.2f margin %.3f | grad %.2f | lr %.2e | %.0f tok/s | ETA %dm%02ds",
                     step + 1, total_steps, m["loss"], m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"],
                     m["rewards/margins"], m["grad_norm"], lr, m["tokens_per_second"], eta // 60, eta % 60)
            tracker.flush()

        # checkpoint: every worker writes its part and reports it at the same steps (dpo_ray.checkpoint)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == total_steps:
            save = lambda d, st: checkpoint.save(d, policy, model, optimizer, st, rank, fsdp, lora, final=step + 1 == total_steps)  # noqa: E731
            report(save, {"step": step + 1, "loss_first": loss_first, "loss_last": m["loss"],
                                      "tokens_per_second": m["tokens_per_second"], "total_steps": total_steps})
    if start_step >= total_steps:  # resumed after the last step: report once so the run has a result
        save = lambda d, st: checkpoint.save(d, policy, model, optimizer, st, rank, fsdp, lora, final=True)  # noqa: E731
        report(save, {"step": total_steps, "loss_first": loss_first, "loss_last": last.get("loss"), "total_steps": total_steps})
    tracker.flush()
    monitor.finish()
    if rank == 0:
        log.info("train: done, %d steps in %.0f s", total_steps - start_step, time.time() - t_start)


def report(save, state: dict) -> None:
    """ray.train.report at a checkpoint step: every rank reports the directory it wrote (its RNG state; with fsdp its
    DCP shards; rank 0 also the model and state), and Ray Train gathers them into one checkpoint."""
    metrics = {k: v for k, v in state.items() if v is not None}
    with tempfile.TemporaryDirectory() as d:
        save(Path(d), state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
