"""`dpo-ray sweep`: a Ray Tune search whose trials share one prepare + reference pass.

The driver checks the inputs (every trial's memory plan included), then runs the shared part of the stage sequence
(pipeline/sequence.py: prepare, reference, the reference's baseline) once per distinct setting of the keys that change
them (data.*, model.*, the scoring precision: pipeline/space.py STAGE_KEYS), before any trial. Each trial is a Tune
function trainable that runs the trained part (train with Tune's report callback, export, evaluate, log the model) in
its own MLflow run, a child of the sweep's. The best trial is copied to <output_dir>/best/ and, with registry.name,
goes through the champion/challenger gate. Rerunning the same command continues the sweep (Tuner.restore): finished
trials are not trained again.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from pathlib import Path

from dpo_ray.config import Config, ConfigError, masked, with_overrides
from dpo_ray.tracking import RunLogger

from . import sequence
from .artifacts import exclusive, fingerprint, keyed_state, write_json_atomic
from .context import Context, check_output_dir, preflight, resolve
from .evaluate import Evaluation
from .export import replace_dir
from .lease import naming_run
from .mlflow_run import child_run, fail_run, finish_run, log_model, masked_yaml, parent_run
from .placement import ResourceError
from .runtime import DATA_HEADROOM_CPUS, SetupError, check_memory, plan_resources, ray_runtime, setup_logging
from .space import expected_trials, group_key, param_space, parse_grid, parse_sample, stage_values, trial_configs
from .storage import open_location
from .sweep_report import close_stopped_runs, cost, drop_models, log_cost, log_parent, pick_best, record_invocation, trial_rows

log = logging.getLogger("dpo_ray")
TRIAL_CPUS = 0.01
# the train settings a memory plan reads (runtime.check_memory): trials that differ only elsewhere share one check
MEMORY_KEYS = {"strategy", "num_workers", "cpu_offload", "bf16", "gradient_checkpointing", "batch_size_per_worker", "lora", "gpu_memory_gb"}


# ---- one trial (runs in a Ray Tune trial actor)

def trial(overrides: dict, ctx: dict) -> None:
    """The trained part of the sequence for one point of the space; the last report carries the eval metrics."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup_logging()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the evaluation's bars would interleave with Tune's table
    trial_id = ray.tune.get_context().get_trial_id()
    out_dir = Path(ctx["out_dir"]) / "trials" / trial_id
    cfg = with_overrides({**ctx["cfg"], "output_dir": str(out_dir)}, overrides,
                         f"trial {trial_id} ({', '.join(f'{k}={v}' for k, v in overrides.items())})")
    if ctx["scheduler"]:  # a report (with a checkpoint) every eval_every steps: ASHA's rungs
        cfg.train.checkpoint_every = cfg.sweep.eval_every
    group = ctx["groups"][group_key(cfg)]
    shared, run_ctx = group["shared"], dataclasses.replace(group["ctx"], out_dir=out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tracker = child_run(cfg, run_ctx, shared.prepared, shared.ref, ctx["parent_run_id"], trial_id, overrides)
    try:
        part, evaluation, logged = sequence.trained_part(cfg, run_ctx, shared, tracker, name=trial_id, callbacks=[TuneReportCallback()],
                                                         log_the_model=cfg.sweep.keep_models)
        summary = {"trial_id": trial_id, "overrides": overrides, "mlflow_run_id": tracker.run_id, **part, "mlflow_model_logged": logged}
        finish_run(cfg, tracker, summary, out_dir)
    except BaseException as e:
        tracker.call("error tag", tracker.client.set_tag, "dpo_ray.error", str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
        fail_run(tracker)
        raise
    # the last thing the trial does: a scheduler may stop it on this report. No scheduler_metric in it, so ASHA lets it end
    ray.tune.report({**{k: v for k, v in evaluation.metrics.items() if k != cfg.sweep.scheduler_metric}, "step": part["train"]["steps"] or 0,
                     "eval_done": True, "mlflow_run_id": tracker.run_id})


# ---- the driver

def sweep_from_args(cfg: Config, args) -> dict:
    """The CLI's --grid/--sample/--samples/--scheduler added to cfg.sweep, then the sweep."""
    s = cfg.sweep
    grid = {**s.grid, **dict(parse_grid(g) for g in args.grid)}
    sample = {**s.sample, **dict(parse_sample(x) for x in args.sample)}
    s.grid, s.sample = grid, sample
    if args.samples is not None:
        s.samples = args.samples
    if args.scheduler is not None:
        s.scheduler = args.scheduler
    return sweep(cfg, address=args.address)


def sweep(cfg: Config, address: str | None = None) -> dict:
    """Runs the sweep in cfg.sweep; returns its summary (also <output_dir>/sweep_summary.json)."""
    out_dir = Path(cfg.output_dir).resolve()
    check_output_dir(out_dir)
    with exclusive(out_dir), naming_run(str(out_dir)):  # how this sweep's cache leases name it to waiting runs
        return _sweep(cfg, out_dir, address)


def _sweep(cfg: Config, out_dir: Path, address: str | None) -> dict:
    s = cfg.sweep
    if not s.grid and not s.sample:
        raise ConfigError("sweep: nothing to sweep; add --grid key=[a,b] or --sample 'key=loguniform(a,b)' (or a sweep: section)")
    t0 = time.time()
    space, groups_wanted = param_space(s), stage_values(s)
    group_cfgs = [with_overrides(cfg, g, f"sweep ({', '.join(f'{k}={v}' for k, v in g.items()) or 'base'})") for g in groups_wanted]
    ctx = preflight(cfg, ("train", "evaluate"))
    state = sweep_state(out_dir, cfg)
    earlier = list(state.get("invocations", []))  # a continued sweep: what its earlier invocations spent
    parent = None
    # a scheduler stops trials: Ray Train's PlacementGroupCleaner frees a stopped trial's workers' placement group only
    # when Ray's state API (the dashboard) answers; without it the next trial waits for ever (ray#54305)
    with ray_runtime(address, dashboard=s.scheduler is not None):
        try:
            ctx.on_cluster(cfg, trains=False)  # the plan of every trial instead: the base config need not be one
            check_trials(cfg, ctx)
            # [1] the shared part once per distinct data/reference setting, on the driver, before any trial
            groups, stage_seconds = {}, []
            for g, gcfg in zip(groups_wanted, group_cfgs):
                groups[group_key(gcfg)], seconds = group_part(gcfg, g, ctx)
                stage_seconds.append({"values": g, **seconds})
            parent = parent_run(cfg, ctx, state, out_dir)
            # [2] the trials on Ray Tune
            tune_ctx = {"cfg": cfg.model_dump(), "out_dir": str(out_dir), "groups": groups, "parent_run_id": parent.run_id,
                        "scheduler": s.scheduler != "none"}
            results = run_tuner(cfg, space, tune_ctx, out_dir, ctx.use_gpu)
            trials = trial_rows(results, s)
            # Tune returns normally after Ctrl+C; trials not yet created (Tune creates them as it goes) are missing
            missing = expected_trials(s) - len(trials)
            interrupted = [t for t in trials if t["status"] in ("PENDING", "RUNNING", "PAUSED")] + [{}] * max(0, missing)
            wall = time.time() - t0
            summary = {"output_dir": str(out_dir), "tracking_uri": ctx.uri, "mlflow_parent_run_id": parent.run_id, "metric": s.metric,
                       "mode": s.mode, "space": {**{k: v for k, v in s.grid.items()}, **s.sample}, "trials": trials,
                       "cost": cost(wall, stage_seconds, trials, earlier)}
            if interrupted:
                log.warning("sweep: interrupted with %d trial(s) unfinished; run the same command again to continue", len(interrupted))
                summary["interrupted"] = True
                record_invocation(out_dir, state, wall, stage_seconds)
                return summary
            close_stopped_runs(parent, trials)
            # [3] the best trial: copied to best/, registered, the other trials' models dropped
            best = pick_best(trials, s)
            summary["best"] = export_best(cfg, ctx, groups, best, out_dir) if best else None
            wall = time.time() - t0
            summary["cost"] = cost(wall, stage_seconds, trials, earlier)
            summary["wall_seconds"] = summary["cost"]["wall_seconds"]
            record_invocation(out_dir, state, wall, stage_seconds)
            log_parent(parent, summary, s)
            if not s.keep_models:
                drop_models(out_dir, trials, best)
            write_json_atomic(out_dir / "sweep_summary.json", summary)
            parent.call("sweep_summary.json", parent.client.log_artifact, str(out_dir / "sweep_summary.json"))
            parent.call("run status", parent.client.set_terminated, "FINISHED")
            log_cost(summary)
            return summary
        except BaseException:
            if parent is not None:
                parent.flush()
            raise


def check_trials(cfg: Config, ctx: Context) -> None:
    """Every trial's memory plan (each grid point, each sampled key's extremes; runtime.check_memory), before any
    work: a trial that cannot fit stops the sweep in one line naming its values, instead of costing a trial. Configs
    that do not validate are left to their trials, which end in ERROR with the reason (as any trial error)."""
    seen = set()
    for overrides, tcfg in trial_configs(cfg):
        policy = resolve(tcfg.model.policy, ctx.uri, ctx.cache)
        key = json.dumps([policy, tcfg.train.model_dump(include=MEMORY_KEYS), tcfg.data.max_length], sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        try:
            check_memory(tcfg, policy, ctx.use_gpu)
        except ResourceError as e:
            raise ResourceError(f"sweep: the trial {', '.join(f'{k}={v}' for k, v in overrides.items())} cannot fit: {e}") from None


def group_part(cfg: Config, values: dict, ctx: Context) -> tuple[dict, dict]:
    """The shared part for one distinct setting (its models resolved, its own rejects file); (what the trials need:
    the group's context and shared part, the seconds each stage took)."""
    log.info("sweep: prepare + reference for %s", ", ".join(f"{k}={v}" for k, v in values.items()) or "all trials")
    gctx = ctx.for_config(cfg, rejects_file=ctx.out_dir / "rejects" / f"{group_key(cfg)}.jsonl")
    shared = sequence.shared_part(cfg, gctx, ("prepare", "reference", "evaluate"))
    seconds = dict(shared.seconds)
    # what a run without the cache spends scoring: measured when this pass scored, else by the pass that filled the cache
    record = open_location(cfg.cache_dir) / "reference" / f"{shared.ref.key}.seconds.json"
    if not shared.ref.hit:
        record.write_text(json.dumps({"reference_seconds": seconds["reference_seconds"]}) + "\n")
    seconds["reference_seconds_measured"] = json.loads(record.read_text())["reference_seconds"] if record.is_file() else None
    return {"ctx": gctx, "shared": shared}, seconds


def sweep_state(out_dir: Path, cfg: Config) -> dict:
    """<output_dir>/sweep.json: the sweep's fingerprint and parent run; another sweep in the same output_dir is refused."""
    key = fingerprint("sweep", json.dumps(masked(cfg.model_dump()), sort_keys=True, default=str))
    path = out_dir / "sweep.json"
    return keyed_state(path, key, lambda: SetupError(f"{out_dir} holds another sweep (other config or space); set output_dir to a new "
                                                     f"directory, or delete {path} and {out_dir / 'tune'} to start this one over"))


def concurrency(cfg: Config, use_gpu: bool) -> int:
    """sweep.max_concurrent, else the trials the cluster holds side by side: each its train workers (and, in turn, its
    evaluation actor), leaving DATA_HEADROOM_CPUS for Ray Data's read tasks."""
    import ray

    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    res = ray.cluster_resources()
    _, cpw = plan_resources(cfg)
    per_trial = max(cfg.train.max_workers * cpw, cfg.reference.cpus_per_actor) + TRIAL_CPUS
    n = int((res.get("CPU", 0) - DATA_HEADROOM_CPUS + 1e-9) // per_trial)
    if use_gpu:
        n = min(n, int(res.get("GPU", 0) // cfg.train.max_workers))
    return max(1, n)


def state_api_answers() -> bool:
    """Whether Ray's state API answers (it is served by the dashboard): what Ray Train's PlacementGroupCleaner asks."""
    try:
        from ray.util.state import list_nodes

        list_nodes(limit=1, timeout=10)
        return True
    except Exception:
        return False


def run_tuner(cfg: Config, space: dict, ctx: dict, out_dir: Path, use_gpu: bool):
    """Tuner.fit, or Tuner.restore(...).fit when this output_dir holds the same sweep, interrupted."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.sweep
    # the trial actor only waits on its TorchTrainer (whose workers hold the CPUs/GPUs): it asks for next to nothing
    # (Tune refuses an empty resource request)
    trainable = tune.with_resources(tune.with_parameters(trial, ctx=ctx), {"cpu": TRIAL_CPUS})
    path = out_dir / "tune" / "sweep"
    # the final report (eval metrics) leaves out the scheduler's train metric on purpose (see `trial`): Tune's strict check
    # would refuse it, in a continued sweep too
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if tune.Tuner.can_restore(str(path)):
        log.info("sweep: continuing the sweep in %s (finished trials are not run again)", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=False).fit()
    total = cfg.train.max_steps or 10**9
    scheduler = (ASHAScheduler(time_attr="step", metric=s.scheduler_metric, mode=s.scheduler_mode, max_t=total + 1,
                               grace_period=s.eval_every, reduction_factor=s.reduction_factor, stop_last_trials=False)
                 if s.scheduler == "asha" else None)
    if scheduler and not state_api_answers():
        log.warning("sweep: Ray's state API (the dashboard) does not answer on this cluster: a trial that ASHA stops keeps "
                    "its workers' CPUs/GPUs and later trials can wait for ever (ray#54305); start the cluster with the "
                    "dashboard (`ray start --head --include-dashboard=true`), see docs/sweep.md")
    n = concurrency(cfg, use_gpu)
    log.info("sweep: %d trial(s) at a time%s", n, f", ASHA on {s.scheduler_metric} every {s.eval_every} steps" if scheduler else "")
    tuner = tune.Tuner(trainable, param_space=space,
                       tune_config=tune.TuneConfig(num_samples=s.samples, max_concurrent_trials=n, scheduler=scheduler),
                       run_config=tune.RunConfig(name="sweep", storage_path=str(out_dir / "tune"), verbose=1))
    return tuner.fit()


def export_best(cfg: Config, ctx: Context, groups: dict, best: dict, out_dir: Path) -> dict:
    """<output_dir>/best/{model,summary.json,config.yaml}; with registry.name the champion/challenger gate on the best
    trial's own run (its model logged there: by the trial with keep_models, else now)."""
    trial_dir = out_dir / "trials" / best["trial_id"]
    tsum = json.loads((trial_dir / "summary.json").read_text())
    bcfg = with_overrides({**cfg.model_dump(), "output_dir": str(trial_dir)}, best["overrides"])
    best_dir = out_dir / "best"
    best_dir.mkdir(exist_ok=True)
    model_name = Path(tsum["model_dir"]).name
    replace_dir(best_dir / model_name, lambda tmp: shutil.copytree(tsum["model_dir"], tmp, dirs_exist_ok=True))
    (best_dir / "config.yaml").write_text(masked_yaml(bcfg))
    write_json_atomic(best_dir / "summary.json", tsum)
    out = {**best, "model_dir": str(best_dir / model_name)}
    log.info("sweep: best trial %s (%s = %.4f): %s -> %s", best["trial_id"], cfg.sweep.metric, best[cfg.sweep.metric],
             best["overrides"], out["model_dir"])
    if cfg.registry.name:
        tracker = RunLogger(ctx.uri, tsum["mlflow_run_id"])
        g = groups[group_key(bcfg)]
        evaluation = Evaluation({f"eval/{k}": v for k, v in tsum["eval"].items()})
        logged = tsum.get("mlflow_model_logged") or log_model(bcfg, tracker, best_dir / model_name, trial_dir)  # not kept: logged now
        out["registry"] = sequence.registration(bcfg, dataclasses.replace(g["ctx"], out_dir=trial_dir), g["shared"], tracker,
                                                evaluation, logged, model_dir=best_dir / model_name)
        tracker.flush()
    return out
