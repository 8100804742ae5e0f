"""train_loop_per_worker(config): the whole DPO step loop, top to bottom, run by each Ray Train worker.

The batch order is [chosen; rejected] (2B, T); reference log-probs come from the cached columns, so
no reference model is loaded here. Every worker holds a small index of the cached train rows (row_id order and
packed lengths, 12 bytes a pair; dpo_ray/rows.py) and reads only its own rows of each step from the cached Parquet,
a few steps ahead: its memory does not grow with the dataset. A step's rows are a fixed 1/world slice of each epoch's
seeded permutation: the data order is independent of Ray's scheduling, which is what makes a resumed run equal to an
uninterrupted one. With train.max_tokens_per_micro_batch a worker's pairs of a step are regrouped into micro-batches by
packed tokens; the loss is a sum over pairs divided by the step's pair count, so the update does not depend on the grouping.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.profiler import record_function

from . import checkpoint, parallel
from .config import Config
from .flops import batch_flops, datasheet_peak
from .forward import autocast, use_bf16
from .losses import combine, ld_logps, loss_terms
from .metrics import NAMES, metric_vector
from .packing import token_budget_groups
from .rows import RowIndex, RowReader, as_lists, prefetched, step_positions
from .tracking import run_logger, system_metrics

log = logging.getLogger("dpo_ray")


def lr_at(step: int, total: int, cfg) -> float:
    """Linear warmup, then cosine from lr down to lr * min_lr_ratio."""
    warmup = int(cfg.warmup_ratio * total)
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def micro_batches(tokens: list[int], bs: int, budget: int | None) -> list[list[int]]:
    """A worker's pairs of a step (positions 0..n-1) split into micro-batches: by a packed-token budget (a longer pair
    alone), or without one in consecutive slices of bs pairs, as before budgets existed."""
    if budget:
        return token_budget_groups(tokens, budget)
    return [list(range(i, min(i + bs, len(tokens)))) for i in range(0, len(tokens), bs)]


def split_to(groups: list[list[int]], n: int) -> list[list[int]]:
    """The same pairs in n micro-batches (n <= pairs): the largest group halved until there are n."""
    groups = [list(g) for g in groups]
    while len(groups) < n:
        i = max(range(len(groups)), key=lambda j: len(groups[j]))
        g = groups.pop(i)
        groups[i:i] = [g[: len(g) // 2], g[len(g) // 2 :]]
    return groups


def max_over_workers(n: int, device=None) -> int:
    x = torch.tensor([n], device=device)  # on the worker's device: NCCL reduces device tensors only
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return int(x.item())


def loss_extras(spec) -> tuple[str, ...]:
    """What the forward computes beyond the log-prob sums for this loss (PolicyLogps.collate's extras)."""
    return (("shared",) if spec.ld_alpha is not None else ()) + (("wpo",) if spec.use_weighting else ())


def pair_logps(out, batch: dict, spec) -> dict:
    """The forward's (2B,) outputs -> per pair (B,): policy pc/pr and reference rc/rr (LD-DPO combined when
    spec.ld_alpha is set), reply lengths lc/lr, the chosen sums without LD-DPO (nll: sft, orpo), WPO weights wc/wr."""
    logps, counts, extras = out if len(out) == 3 else (*out, {})
    b = len(batch["ref_chosen_logps"])
    alpha, shared = spec.ld_alpha, extras.get("shared")
    ref_shared = (batch.get("ref_chosen_shared_logps"), batch.get("ref_rejected_shared_logps"))
    if alpha is not None and ref_shared[0] is None:
        raise ValueError("train.ld_alpha needs the reference's split sums (ref_*_shared_logps): a reference cache of version >= 3")
    x = {"pc": ld_logps(logps[:b], shared[:b] if shared is not None else None, alpha),
         "pr": ld_logps(logps[b:], shared[b:] if shared is not None else None, alpha),
         "rc": ld_logps(batch["ref_chosen_logps"], ref_shared[0], alpha), "rr": ld_logps(batch["ref_rejected_logps"], ref_shared[1], alpha),
         "lc": counts[:b], "lr": counts[b:], "nll": logps[:b], "wc": None, "wr": None}
    if "wpo" in extras:
        x["wc"], x["wr"] = extras["wpo"][:b].exp(), extras["wpo"][b:].exp()
    return x


def pair_losses(spec, x: dict, tokens_per_pair):
    """(per-pair loss: sum_k weight_k term_k, {type: per-pair term}, chosen rewards, rejected rewards) of pair_logps."""
    terms, cr, rr = loss_terms(spec, x["pc"], x["pr"], x["rc"], x["rr"], x["lc"], x["lr"], nll_chosen=x["nll"],
                               tokens_per_pair=tokens_per_pair, wc=x["wc"], wr=x["wr"])
    return combine(spec, terms), terms, cr, rr


def micro_loss(policy, batch: dict, spec, step_pairs: int, tokens_per_pair, precision=nullcontext()):
    """A micro-batch's share of this worker's step loss: the sum of its pairs' losses / the worker's pairs in the step
    (an sft / orpo NLL term counts per chosen token of the worker's step: tokens_per_pair), so the step's gradient is the
    same however its pairs are grouped. Returns (loss, per-pair losses, {type: per-pair term}, chosen rewards,
    rejected rewards, chosen logps, rejected logps)."""
    with precision:  # the forward in the training precision; the loss in fp32
        out = policy(batch)  # (2B,) order [chosen; rejected]
    x = pair_logps(out, batch, spec)
    losses, terms, cr, rr = pair_losses(spec, x, tokens_per_pair)
    return losses.sum() / step_pairs, losses, terms, cr, rr, x["pc"], x["pr"]


def coupled_step(policy, batches: list[dict], spec, tokens_per_pair, precision, sync):
    """The step of a batch-coupled loss (aot's sort over the step's pairs) split over several micro-batches.
    Pass 1 runs every micro-batch without gradient and takes the step loss's gradient with respect to each pair's
    log-probs; pass 2 runs them again with gradient and back-propagates those coefficients (the same RNG state, so
    dropout draws the same masks): the gradient of the whole-step loss, with one micro-batch of activations at a time.
    Returns what micro_loss returns, for the whole step, without the loss."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        with torch.no_grad(), precision:
            xs = [pair_logps(policy(b), b, spec) for b in batches]
    cat = lambda k: torch.cat([x[k] for x in xs]) if xs[0][k] is not None else None  # noqa: E731
    x = {k: cat(k) for k in xs[0]}
    leaves = {k: x[k].detach().float().requires_grad_() for k in ("pc", "pr", "nll")}
    losses, terms, cr, rr = pair_losses(spec, {**x, **leaves}, tokens_per_pair)
    losses.mean().backward()
    start = 0
    for i, b in enumerate(batches):  # pass 2: same order, same RNG state as pass 1
        n = len(b["ref_chosen_logps"])
        with sync(i == len(batches) - 1):
            with precision:
                xi = pair_logps(policy(b), b, spec)
            surrogate = sum((leaves[k].grad[start:start + n] * xi[k]).sum() for k in leaves if leaves[k].grad is not None)
            surrogate.backward()
        start += n
    return losses.detach(), {k: v.detach() for k, v in terms.items()}, cr, rr, x["pc"], x["pr"]


def scored_tokens(masks: list[list[int]]) -> int:
    """Tokens scored in these loss masks (position 0 predicts nothing)."""
    return sum(sum(m[1:]) for m in masks)


def host_memory_peak_mb() -> float:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_step(policy, wrapper, optimizer, table, t, pad_id: int, device, precision=nullcontext(), world: int = 1, fsdp: bool = False,
               spec=None):
    """One optimizer step of this worker on its pairs of the step (`table`): micro-batches (collate, forward, loss,
    backward; gradients reduced across workers on the last), clip, AdamW. `spec`: the loss (dpo_ray.losses.LossSpec;
    default t.loss). Returns (this worker's metrics, or None when the loss or gradient was not finite on some worker and
    the update was skipped; this worker's real tokens of the step). The metrics are means over the workers (equal pair
    counts), "tokens" their sum: one all-reduce and one read of the device a step (no per-micro-batch or per-metric
    sync). The phases are marked for torch.profiler (dpo_ray.collate / forward / backward / optimizer):
    benchmarks/profile_step.py."""
    spec = spec or t.loss
    groups = micro_batches(table["pair_tokens"].to_pylist(), t.batch_size_per_worker, t.max_tokens_per_micro_batch)
    if fsdp and world > 1 and t.max_tokens_per_micro_batch:  # every forward all-gathers: the same count on every rank
        groups = split_to(groups, max_over_workers(len(groups), device))
    tokens_per_pair = scored_tokens(table["chosen_loss_mask"].to_pylist()) / table.num_rows if {"sft", "orpo"} & set(spec.types) else 1.0
    extras = loss_extras(spec)

    flops = 0.0  # model FLOPs of this worker's step (dpo_ray.flops: the positions and mask pairs the batches run)

    def collate(idx):
        nonlocal flops
        with record_function("dpo_ray.collate"):
            batch = wrapper.collate(as_lists(table, idx), pad_id, device, extras=extras)
        flops += batch_flops(wrapper.flops(), batch, wrapper.reply_only_head)
        return batch

    # gradients reduced once per step: on the last micro-batch (each worker has one, however many it has)
    sync = lambda last: parallel.sync_gradients(policy, world, last_micro=last)  # noqa: E731
    parts, tokens = [], 0
    if spec.batch_coupled and len(groups) > 1:  # aot's sort couples the step's pairs: two passes (coupled_step)
        batches = [collate(idx) for idx in groups]
        tokens = sum(b["tokens"] for b in batches)
        with record_function("dpo_ray.forward_backward"):
            parts.append(coupled_step(policy, batches, spec, tokens_per_pair, precision, sync))
    else:
        for micro, idx in enumerate(groups):
            batch = collate(idx)
            tokens += batch["tokens"]  # real tokens of the chosen and rejected sequences (prompt counted in both)
            with sync(micro == len(groups) - 1):
                with record_function("dpo_ray.forward"):
                    loss, losses, terms, cr, rr, pc, pr = micro_loss(policy, batch, spec, table.num_rows, tokens_per_pair, precision)
                with record_function("dpo_ray.backward"):
                    loss.backward()
            parts.append((losses.detach(), {k: v.detach() for k, v in terms.items()}, cr, rr, pc.detach(), pr.detach()))
    with record_function("dpo_ray.optimizer"):
        grad_norm = parallel.clip_gradients(policy, t.max_grad_norm)
        losses, cr, rr, pc, pr = (torch.cat([p[i] for p in parts]) for i in (0, 2, 3, 4, 5))
        names = [f"loss/{k}" for k in spec.types] if len(spec.types) > 1 else []  # each term, when there are several
        terms = [torch.cat([p[1][k] for p in parts]).mean().double().reshape(1) for k in spec.types] if names else []
        # the finite check and the metrics in one device vector, summed over workers, read by the host once a step
        bad = (~torch.isfinite(grad_norm)) | (~torch.isfinite(losses).all())
        stats = torch.cat([bad.double().reshape(1), losses.mean().double().reshape(1), *terms, metric_vector(cr, rr, pc, pr),
                           grad_norm.detach().double().reshape(1), torch.tensor([float(tokens), flops], dtype=torch.float64).to(grad_norm.device)])
        if world > 1:
            dist.all_reduce(stats)
        values = stats.tolist()
        if values[0] > 0:  # a worker's loss or the gradient is not finite: skip the update everywhere
            optimizer.zero_grad(set_to_none=True)  # the weights stay as they were
            return None, tokens
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    m = dict(zip(("loss", *names, *NAMES, "grad_norm"), (v / world for v in values[1:-2])))  # means over workers (equal pair counts)
    m["tokens"], m["model_flops"] = values[-2], values[-1]  # summed over workers
    return m, tokens


def train_loop_per_worker(config: dict) -> None:
    cfg = Config.model_validate(config["cfg"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.manual_seed(cfg.seed + rank)
    torch.set_num_threads(t.torch_threads or max(1, (os.cpu_count() or 1) // ctx.get_local_world_size()))
    device = ray.train.torch.get_device()
    log.info("train: rank %d of %d on node %s", rank, world, ray.get_runtime_context().get_node_id())
    tracker = run_logger(config["tracking_uri"], config["run_id"], enabled=rank == 0)
    monitor = system_metrics(config["tracking_uri"], config["run_id"], "train_rank0", enabled=rank == 0 and cfg.mlflow.system_metrics)

    # [1] data: a small index of the cached rows on every worker; each step reads this rank's slice of the epoch's
    # seeded permutation from the cached Parquet, prefetch_steps ahead
    index = RowIndex(config["train_files"], config["drop_ids"])
    reader = RowReader(index)
    # the pairs of a step are train.step_pairs at any world size (elastic runs): accumulation takes up the difference
    n_pairs, bs, accum = len(index), t.batch_size_per_worker, t.accum_for(world)
    pairs_per_step = t.step_pairs
    steps_per_epoch = n_pairs // pairs_per_step
    if steps_per_epoch == 0:
        raise ValueError(f"train: {n_pairs} pairs are fewer than one step needs ({pairs_per_step} = train.pairs_per_step, "
                         f"or batch_size_per_worker x num_workers x grad_accum_steps)")
    total_steps = min(steps_per_epoch * t.epochs, t.max_steps or 10**12)

    # [2] model and optimizer: ddp (a full copy per worker) or fsdp (sharded), optionally LoRA (dpo_ray.parallel);
    # fp32 master weights; bf16 inside autocast (ddp) or as FSDP2's compute copies of the parameters (fsdp)
    bf16 = use_bf16(t.bf16, device)
    fsdp, lora = t.strategy == "fsdp", t.lora is not None
    policy, wrapper, model = parallel.build_policy(cfg, config["policy_path"], rank, world, device, bf16)
    optimizer = parallel.make_optimizer(policy, t, device)
    precision = autocast(bf16, device)  # the reference and evaluation scorers compute the same way (dpo_ray.scoring)
    spec = t.loss  # the loss terms and their settings (dpo_ray.losses.LossSpec)
    start_step, loss_first = 0, None
    ckpt = ray.train.get_checkpoint() or (ray.train.Checkpoint(t.resume_from) if t.resume_from else None)  # Ray's own first
    if ckpt:
        with ckpt.as_directory() as d:
            state = checkpoint.load(Path(d), policy, model, optimizer, fsdp, lora)
        start_step, loss_first = state["step"], state.get("loss_first")
        log.info("rank %d: resumed from checkpoint at step %d with %d worker(s)", rank, start_step, world)
        if rank == 0 and ray.train.get_checkpoint():  # a restart of this run (a lost worker or node, a resize): say so in MLflow
            tracker.set_tag(f"restart.step_{start_step}", f"resumed from the step-{start_step} checkpoint with {world} worker(s), "
                                                         f"{accum} micro-batch(es) of {bs} pairs each")
    rows_of_step = lambda step: reader.read(step_positions(n_pairs, cfg.seed, step, steps_per_epoch, rank, world, bs, accum))
    step_digest = lambda step: pairs_digest(np.concatenate([step_positions(n_pairs, cfg.seed, step, steps_per_epoch, r, world, bs, accum)  # noqa: E731
                                                            for r in range(world)]))
    delay = float(os.environ.get("DPO_RAY_STEP_DELAY_S", 0))  # fault tests only: paces the steps so a node can be killed mid-run
    batches = prefetched(rows_of_step, range(start_step, total_steps), ahead=t.prefetch_steps)
    if rank == 0:
        n_train = sum(p.numel() for p in parallel.trainable(model))
        log.info("train: %d pairs (index %.1f MB a worker), %d workers x %d pairs x %d accumulation = %d pairs/step, %d steps/epoch, "
                 "%d steps, micro-batches %s, batches %s%s, precision %s, %s%s", n_pairs, index.nbytes() / 2**20, world, bs, accum,
                 pairs_per_step, steps_per_epoch, total_steps,
                 f"of up to {t.max_tokens_per_micro_batch} packed tokens" if t.max_tokens_per_micro_batch else f"of {bs} pairs",
                 f"packed (prompt once per pair, no padding; {t.attention} attention)" if wrapper.packed else "padded to the longest sequence",
                 ", activation checkpointing" if t.gradient_checkpointing else "",
                 "bf16 autocast" if bf16 else "fp32 (set train.bf16=true to force bf16; this CPU has no native bf16)" if device.type == "cpu" else "fp32",
                 f"{t.strategy}{' + cpu offload' if t.cpu_offload else ''}",
                 f", LoRA r={t.lora.r} on {t.lora.target_modules}: {n_train:,} trainable parameters" if lora else "")

    # [3] the loop
    peak = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    policy.train()
    nonfinite, t_start, step_times, last, window, notices = 0, time.time(), [], {}, [], set()
    for step in range(start_step, total_steps):
        t0 = time.time()
        with record_function("dpo_ray.read"):  # waits for the prefetch thread only when it is behind
            table = next(batches)  # this rank's bs x accum pairs of the step, read ahead
        lr = lr_at(step, total_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        m, tokens = train_step(policy, wrapper, optimizer, table, t, config["pad_id"], device, precision, world, fsdp, spec)
        compiled = wrapper.compile_stats  # train.compile: graphs compiled, seconds, recompiles after the first step
        if compiled is not None:
            if compiled.after_warm is None and rank == 0:
                log.info("train.compile: %d graphs compiled in %.1f s in the first step", compiled.graphs, compiled.seconds)
            compiled.mark_warm()
        if m is None:  # non-finite loss or gradient: the update was skipped, the weights stay as they were
            nonfinite += 1
            log.warning("rank %d step %d: non-finite loss or gradient, update skipped (%d in a row)", rank, step + 1, nonfinite)
            if nonfinite >= t.max_nonfinite_steps:
                raise FloatingPointError(f"train: {nonfinite} consecutive non-finite steps, the last at step {step + 1}; "
                                         f"the last good checkpoint is kept; lower train.lr or check the data")
            continue
        nonfinite = 0

        # metrics: means over workers from train_step; peaks: the largest worker's
        m["learning_rate"] = lr
        m["world_size"] = world
        if compiled is not None:
            m.update(compiled.metrics())
        if rank == 0:  # which pairs the step trained (over all ranks): the same at any world size, and after any restart
            m["pairs_digest"] = step_digest(step)
        if delay:
            time.sleep(delay)
        step_times.append(time.time() - t0)
        m["tokens_per_second"] = m.pop("tokens") / step_times[-1]
        # honest MFU: the model FLOPs the step executed (prompt once, the head where it runs, attention by the masks)
        # over the datasheet's dense bf16 peak of every worker's GPU (dpo_ray/flops.py); not on CPUs (no datasheet)
        m["model_tflops_per_second"] = m["model_flops"] / step_times[-1] / 1e12
        if peak:
            m["mfu"] = m["model_flops"] / step_times[-1] / (peak * world)
        m["step_seconds"] = step_times[-1]
        peaks = [host_memory_peak_mb(), torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0]
        if world > 1:  # the largest worker's peaks: host RSS, and allocated GPU memory so far (on the device: NCCL's too)
            peaks = torch.tensor(peaks, dtype=torch.float64, device=device)
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            peaks = peaks.tolist()
        m["host_memory_peak_mb"] = peaks[0]
        if device.type == "cuda":
            m["gpu_peak_memory_mb"] = peaks[1]
        loss_first = m["loss"] if loss_first is None else loss_first
        tracker.log_metrics({f"train/{k}": v for k, v in m.items()}, step=step + 1)
        last = m
        window.append((m["loss"], m["rewards/accuracies"]))  # since the last report: what a sweep's scheduler compares
        if rank == 0 and ((step + 1) % t.log_every == 0 or step + 1 == total_steps):
            recent = step_times[-t.log_every:]
            eta = (total_steps - step - 1) * sum(recent) / len(recent)
            log.info("step %d/%d | loss %.4f | rewards chosen %.3f rejected %.3f acc %.2f margin %.3f | grad %.2f | lr %.2e | %.0f tok/s | ETA %dm%02ds",
                     step + 1, total_steps, m["loss"], m["rewards/chosen"], m["rewards/rejected"], m["rewards/accuracies"],
                     m["rewards/margins"], m["grad_norm"], lr, m["tokens_per_second"], eta // 60, eta % 60)
            tracker.flush()

        # checkpoint: every worker writes its part and reports it at the same steps (dpo_ray.checkpoint); also at the
        # first step after a drain notice (a spot node's preemption), so that the restart loses no step
        noticed = preemption_notice(notices, rank, step + 1, tracker)
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == total_steps or noticed is not None:
            tracker.flush()  # the steps up to a checkpoint are in MLflow before it: a restart resumes after them
            save = lambda d, st: checkpoint.save(d, policy, model, optimizer, st, rank, fsdp, lora, final=step + 1 == total_steps)  # noqa: E731
            report(save, {"step": step + 1, "loss_first": loss_first, "loss_last": m["loss"], "tokens_per_second": m["tokens_per_second"],
                          "total_steps": total_steps, "host_memory_peak_mb": m["host_memory_peak_mb"],
                          "gpu_peak_memory_mb": m.get("gpu_peak_memory_mb"), "compile_seconds": m.get("compile_seconds"), "mfu": m.get("mfu"),
                          "recompiles": m.get("recompiles"), "train/loss": sum(w[0] for w in window) / len(window),
                          "train/rewards/accuracies": sum(w[1] for w in window) / len(window)})
            window = []
        if noticed is not None and step + 1 < total_steps:
            hold_until_restart(noticed, rank)
    if start_step >= total_steps:  # resumed after the last step: report once so the run has a result
        save = lambda d, st: checkpoint.save(d, policy, model, optimizer, st, rank, fsdp, lora, final=True)  # noqa: E731
        report(save, {"step": total_steps, "loss_first": loss_first, "loss_last": last.get("loss"), "total_steps": total_steps})
    tracker.flush()
    monitor.finish()
    if rank == 0:
        log.info("train: done, %d steps in %.0f s", total_steps - start_step, time.time() - t_start)


def pairs_digest(positions) -> float:
    """A step's pairs (their places in the row_id-ordered index) as one number: the first 48 bits of a SHA-1 of the
    sorted positions, exact in a float64 metric."""
    data = np.sort(np.asarray(positions, dtype=np.int64)).tobytes()
    return float(int(hashlib.sha1(data).hexdigest()[:12], 16))


def preemption_notice(seen: set, rank: int, step: int, tracker) -> float | None:
    """Whether a node of this worker group has been told to drain (a spot node's preemption notice: `ray drain-node`,
    a SIGTERM to its `ray start`, the autoscaler) since the last time: then this step is checkpointed. Ray Train's
    PreemptionWatcher marks the workers; ray.train.get_preemption_info agrees on one answer for all ranks (a barrier:
    every rank calls it once a step). At the drain's deadline Ray Train restarts the group from the latest checkpoint,
    without counting it against train.max_failures (FailureConfig.max_preemption_failures, unlimited)."""
    info = ray.train.get_preemption_info()
    nodes = frozenset(info.preempted_node_ids) if info is not None else frozenset()
    if not nodes or nodes <= seen:
        return None
    seen |= nodes
    if rank == 0:
        left = f"{info.deadline_ms / 1000 - time.time():.0f} s before its deadline" if info.deadline_ms else "no deadline given"
        log.warning("train: node(s) %s of this run are draining (preemption, %s): checkpoint at step %d", ", ".join(sorted(n[:12] for n in nodes)), left, step)
        tracker.set_tag(f"preempted.step_{step}", f"node(s) {', '.join(sorted(nodes))} draining, {left}: checkpoint at step {step}")
    return info.deadline_ms / 1000 if info.deadline_ms else time.time() + PREEMPTION_DEADLINE_S


PREEMPTION_DEADLINE_S = 120.0  # Ray Train's wait for a drain that names no deadline (DEFAULT_PREEMPTION_DEADLINE_S)
PREEMPTION_SLACK_S = 30.0  # past the deadline, a group that Ray Train has not restarted trains on


def hold_until_restart(deadline: float, rank: int) -> None:
    """After the notice's checkpoint the workers wait for Ray Train to restart them (at the drain's deadline) rather
    than train steps that the restart would throw away: the restart resumes at the notice's step, nothing is trained
    twice. A drain that ends without a restart (cancelled, or the node kept) lets the run train on after the slack."""
    until = deadline + PREEMPTION_SLACK_S
    if rank == 0:
        log.info("train: waiting for the restart at the drain's deadline (%.0f s; training goes on after %.0f s if none comes)",
                 max(0.0, deadline - time.time()), max(0.0, until - time.time()))
    while time.time() < until:
        time.sleep(0.5)
    if rank == 0:
        log.warning("train: no restart came %.0f s past the drain's deadline; training goes on", PREEMPTION_SLACK_S)


def report(save, state: dict) -> None:
    """ray.train.report at a checkpoint step: every rank reports the directory it wrote (its RNG state; with fsdp its
    DCP shards; rank 0 also the model and state), and Ray Train gathers them into one checkpoint."""
    metrics = {k: v for k, v in state.items() if v is not None}
    with tempfile.TemporaryDirectory() as d:
        save(Path(d), state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
