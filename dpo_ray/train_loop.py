"""train_loop_per_worker(config): the whole DPO step loop, top to bottom, run by each Ray Train worker.

The batch order is [chosen; rejected] (2B, T); reference log-probs come from the cached columns, so
no reference model is loaded here. Every worker holds a small index of the cached train rows (row_id order and
packed lengths, 12 bytes a pair; dpo_ray/rows.py) and reads only its own rows of each step from the cached Parquet,
a few steps ahead: its memory does not grow with the dataset. A step's rows are a fixed 1/world slice of each epoch's
seeded permutation: the data order is independent of Ray's scheduling, which is what makes a resumed run equal to an
uninterrupted one. With train.max_tokens_per_micro_batch a worker's pairs of a step are regrouped into micro-batches by
packed tokens; the loss is a sum over pairs divided by the step's pair count, so the update does not depend on the grouping.
What the loop keeps beside its step (which pairs each step trains, rank 0's tracker and lines, timing, the derived
metrics, the report window) is in dpo_ray/bookkeeping.py; every call other ranks must match is made here.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.profiler import record_function

from . import checkpoint, parallel
from .bookkeeping import (Pacing, Progress, ReportWindow, StepPlan, Tracker, finish_metrics, mark_compiled, report_metrics,
                          start_line)
from .config import Config
from .flops import batch_flops, datasheet_peak
from .forward import autocast, use_bf16
from .losses import pair_inputs, pair_losses
from .metrics import NAMES, metric_vector
from .packing import token_budget_groups
from .rows import RowIndex, RowReader, as_lists, prefetched
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
    """The forward's (2B,) outputs and the batch's cached reference sums -> per pair (B,): losses.pair_inputs."""
    logps, counts, extras = out if len(out) == 3 else (*out, {})
    b = len(batch["ref_chosen_logps"])
    shared, wpo = extras.get("shared"), extras.get("wpo")
    return pair_inputs(spec, (logps[:b], logps[b:]), (batch["ref_chosen_logps"], batch["ref_rejected_logps"]), (counts[:b], counts[b:]),
                       policy_shared=(shared[:b], shared[b:]) if shared is not None else (None, None),
                       ref_shared=(batch.get("ref_chosen_shared_logps"), batch.get("ref_rejected_shared_logps")),
                       wpo_logweights=(wpo[:b], wpo[b:]) if wpo is not None else (None, None))


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
    tracker = Tracker(run_logger(config["tracking_uri"], config["run_id"], enabled=rank == 0), rank)  # no-ops off rank 0
    monitor = system_metrics(config["tracking_uri"], config["run_id"], "train_rank0", enabled=rank == 0 and cfg.mlflow.system_metrics)

    # [1] data: a small index of the cached rows on every worker; each step reads this rank's slice of the epoch's
    # seeded permutation from the cached Parquet, prefetch_steps ahead
    index = RowIndex(config["train_files"], config["drop_ids"])
    reader = RowReader(index)
    plan = StepPlan.of(len(index), t, cfg.seed, rank, world)  # train.step_pairs a step at any world size
    total_steps = plan.total_steps

    # [2] model and optimizer: ddp (a full copy per worker) or fsdp (sharded), optionally LoRA (dpo_ray.parallel);
    # fp32 master weights; bf16 inside autocast (ddp) or as FSDP2's compute copies of the parameters (fsdp)
    bf16 = use_bf16(t.bf16, device)
    fsdp, lora = t.strategy == "fsdp", t.lora is not None
    policy, wrapper, model = parallel.build_policy(cfg, config["policy_path"], rank, world, device, bf16)
    optimizer = parallel.make_optimizer(policy, t, device)
    precision = autocast(bf16, device)  # the reference and evaluation scorers compute the same way (dpo_ray.scoring)
    spec = t.loss  # the loss terms and their settings (dpo_ray.losses.LossSpec)
    start_step, loss_first = resume(t, policy, model, optimizer, fsdp, lora, plan, tracker)
    save = lambda d, state: checkpoint.save(d, policy, model, optimizer, state, rank, fsdp, lora, final=state["step"] == total_steps)  # noqa: E731
    batches = prefetched(lambda step: reader.read(plan.positions(step)), range(start_step, total_steps), ahead=t.prefetch_steps)
    tracker.info(start_line(t, plan, index.nbytes() / 2**20, wrapper.packed, bf16, device.type,
                            sum(p.numel() for p in parallel.trainable(model)) if lora else 0))

    # [3] the loop
    peak_flops = datasheet_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    progress, pacing, window = Progress(tracker, total_steps, t.log_every), Pacing.from_env(), ReportWindow()
    policy.train()
    nonfinite, notices, t_start = 0, set(), time.time()
    for step in range(start_step, total_steps):
        progress.start()
        with record_function("dpo_ray.read"):  # waits for the prefetch thread only when it is behind
            table = next(batches)  # this rank's bs x accum pairs of the step, read ahead
        lr = lr_at(step, total_steps, t)
        for group in optimizer.param_groups:
            group["lr"] = lr
        m, _ = train_step(policy, wrapper, optimizer, table, t, config["pad_id"], device, precision, world, fsdp, spec)
        compiled = mark_compiled(wrapper.compile_stats, tracker)  # train.compile: graphs, seconds, recompiles
        if m is None:  # non-finite loss or gradient: the update was skipped, the weights stay as they were
            nonfinite += 1
            log.warning("rank %d step %d: non-finite loss or gradient, update skipped (%d in a row)", rank, step + 1, nonfinite)
            if nonfinite >= t.max_nonfinite_steps:
                raise FloatingPointError(f"train: {nonfinite} consecutive non-finite steps, the last at step {step + 1}; "
                                         f"the last good checkpoint is kept; lower train.lr or check the data")
            continue
        nonfinite = 0

        # metrics: means over workers from train_step; peaks: the largest worker's
        digest = plan.digest(step)  # rank 0: which pairs the step trained (over all ranks)
        pacing.wait()  # fault tests only
        seconds = progress.stop()
        m = finish_metrics(m, lr, world, seconds, compiled=compiled, digest=digest, peak_flops=peak_flops,
                           peaks=peak_memory_mb(device, world), cuda=device.type == "cuda")
        loss_first = m["loss"] if loss_first is None else loss_first
        tracker.log_metrics({f"train/{k}": v for k, v in m.items()}, step=step + 1)
        window.add(m)  # since the last report: what a sweep's scheduler compares
        progress.log(step, m, lr)

        # checkpoint: every worker writes its part and reports it at the same steps (dpo_ray.checkpoint); also at the
        # first step after a drain notice (a spot node's preemption), so that the restart loses no step
        noticed = preemption_notice(notices, step + 1, tracker)  # a barrier: every rank, every trained step
        if (step + 1) % t.checkpoint_every == 0 or step + 1 == total_steps or noticed is not None:
            tracker.flush()  # the steps up to a checkpoint are in MLflow before it: a restart resumes after them
            report(save, {**report_metrics(m, step + 1, total_steps, loss_first), **window.take()})
        if noticed is not None and step + 1 < total_steps:
            hold_until_restart(noticed, t.preemption_lead_s, tracker)
    if start_step >= total_steps:  # resumed after the last step: report once so the run has a result
        report(save, {"step": total_steps, "loss_first": loss_first, "loss_last": None, "total_steps": total_steps})
    tracker.flush()
    monitor.finish()
    tracker.info("train: done, %d steps in %.0f s", total_steps - start_step, time.time() - t_start)


def resume(t, policy, model, optimizer, fsdp: bool, lora: bool, plan: StepPlan, tracker: Tracker):
    """(the step to start at, the run's first loss) from Ray Train's latest checkpoint of this run, else from
    train.resume_from, else (0, None), with train.optimizer_from's optimizer state when set. A restart of this run (a
    lost worker or node, a resize) is tagged in MLflow."""
    restart = ray.train.get_checkpoint()  # Ray's own first
    ckpt = restart or (ray.train.Checkpoint(t.resume_from) if t.resume_from else None)
    if not ckpt:
        if t.optimizer_from:  # a new training that keeps an earlier one's optimizer (iterate.keep_optimizer)
            with ray.train.Checkpoint(t.optimizer_from).as_directory() as d:
                step = checkpoint.load_optimizer(Path(d), policy, optimizer, fsdp, lora)
            tracker.info(f"train: the optimizer state of {t.optimizer_from} (its step {step}); the weights from model.policy, from step 0")
        return 0, None
    with ckpt.as_directory() as d:
        state = checkpoint.load(Path(d), policy, model, optimizer, fsdp, lora)
    step = state["step"]
    log.info("rank %d: resumed from checkpoint at step %d with %d worker(s)", plan.rank, step, plan.world)
    if restart:
        tracker.set_tag(f"restart.step_{step}", f"resumed from the step-{step} checkpoint with {plan.world} worker(s), "
                                                f"{plan.accum} micro-batch(es) of {plan.bs} pairs each")
    return step, state.get("loss_first")


def peak_memory_mb(device, world: int) -> list[float]:
    """The largest worker's peaks so far: host RSS, and allocated GPU memory (0 on CPUs). With several workers an
    all-reduce, on the device (NCCL's too): every rank calls it once a trained step."""
    peaks = [host_memory_peak_mb(), torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else 0.0]
    if world > 1:
        peaks = torch.tensor(peaks, dtype=torch.float64, device=device)
        dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        peaks = peaks.tolist()
    return peaks


def preemption_notice(seen: set, step: int, tracker: Tracker) -> float | None:
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
    left = f"{info.deadline_ms / 1000 - time.time():.0f} s before its deadline" if info.deadline_ms else "no deadline given"
    tracker.warning("train: node(s) %s of this run are draining (preemption, %s): checkpoint at step %d", ", ".join(sorted(n[:12] for n in nodes)), left, step)
    tracker.set_tag(f"preempted.step_{step}", f"node(s) {', '.join(sorted(nodes))} draining, {left}: checkpoint at step {step}")
    return info.deadline_ms / 1000 if info.deadline_ms else time.time() + PREEMPTION_DEADLINE_S


PREEMPTION_DEADLINE_S = 120.0  # Ray Train's wait for a drain that names no deadline (DEFAULT_PREEMPTION_DEADLINE_S)
PREEMPTION_SLACK_S = 30.0  # past the deadline, a group that Ray Train has not restarted trains on


def hold_until_restart(deadline: float, lead: float, tracker: Tracker) -> None:
    """After the notice's checkpoint the workers wait for Ray Train to restart them (`lead` seconds before the drain's
    deadline: train.preemption_lead_s) rather than train steps that the restart would throw away: the restart resumes
    at the notice's step, nothing is trained twice. A drain that ends without a restart (cancelled, or the node kept)
    lets the run train on after the slack."""
    until = deadline + PREEMPTION_SLACK_S
    tracker.info("train: waiting for the restart %.0f s before the drain's deadline (in %.0f s; training goes on after %.0f s if none comes)",
                 lead, max(0.0, deadline - lead - time.time()), max(0.0, until - time.time()))
    while time.time() < until:
        time.sleep(0.5)
    tracker.warning("train: no restart came %.0f s past the drain's deadline; training goes on", PREEMPTION_SLACK_S)


def report(save, state: dict) -> None:
    """ray.train.report at a checkpoint step: every rank reports the directory it wrote (its RNG state; with fsdp its
    DCP shards; rank 0 also the model and state), and Ray Train gathers them into one checkpoint."""
    metrics = {k: v for k, v in state.items() if v is not None}
    with tempfile.TemporaryDirectory() as d:
        save(Path(d), state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
