"""`dpo-ray sweep`: a Ray Tune search whose trials share one prepare + reference pass.

The driver checks the inputs, then runs prepare and reference once per distinct setting of the keys that change them
(data.*, model.*, the scoring precision: see STAGE_KEYS), before any trial. Each trial is a Tune function trainable
that builds and fits the TorchTrainer (Train V2's pattern; TuneReportCallback forwards rank 0's reports), evaluates the
exported model and logs to its own MLflow run, a child of the sweep's. The best trial is exported to <output_dir>/best/
and, with registry.name, goes through the champion/challenger gate. Rerunning the same command continues the sweep
(Tuner.restore): finished trials are not trained again.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from dpo_ray.config import Config, ConfigError, masked
from dpo_ray.tracking import ensure_experiment

from . import evaluate, prepare, reference
from .console import status_counts
from .artifacts import exclusive, fingerprint, write_json_atomic
from .lease import naming_run
from .storage import open_location
from .run import (DATA_HEADROOM_CPUS, Inputs, SetupError, check_memory, check_output_dir, evaluate_and_log, fail_run, finish_run,
                  log_model, open_run, plan_resources, plot_curves, preflight, register_model, replace_dir, setup_logging,
                  start_ray, stop_ray, train_and_export)

log = logging.getLogger("dpo_ray")
# keys whose value changes the prepared data or the reference log-probs (the cache keys of pipeline/prepare.py and
# pipeline/reference.py: data files and lengths, tokenizer and reference model (both default to the policy), scoring
# precision); the sweep runs those stages once per distinct value of these, not once per trial
STAGE_KEYS = ("data.", "model.", "cache_dir", "train.bf16", "train.strategy", "train.use_gpu")
DISTRIBUTIONS = {"uniform", "loguniform", "randint", "choice"}
TRIAL_CPUS = 0.01
NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
SPEC = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*$")


# ---- the space

def parse_grid(item: str) -> tuple[str, list]:
    """`train.beta=[0.05,0.1]` -> ("train.beta", [0.05, 0.1])."""
    key, sep, raw = item.partition("=")
    values = _yaml(raw, f"--grid {item!r}") if sep else None
    if not key or not isinstance(values, list) or not values:
        raise ConfigError(f"--grid {item!r}: expected dotted.key=[a,b,...], e.g. --grid train.beta=[0.05,0.1]")
    return key.strip(), values


def parse_sample(item: str) -> tuple[str, str]:
    """`train.lr=loguniform(1e-5,1e-3)` -> ("train.lr", "loguniform(1e-5,1e-3)"), checked."""
    key, sep, spec = item.partition("=")
    if not key or not sep:
        raise ConfigError(f"--sample {item!r}: expected dotted.key=DIST(args), e.g. --sample 'train.lr=loguniform(1e-5,1e-3)'")
    distribution(key.strip(), spec)
    return key.strip(), spec.strip()


def _yaml(raw: str, where: str):
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML ({e.problem})") from None
    return [_number(v) for v in value] if isinstance(value, list) else value


def _number(v):
    """YAML 1.1 reads 1e-5 (no dot) as a string: numbers are numbers here."""
    if isinstance(v, str) and NUMBER.match(v):
        return float(v)
    return [_number(x) for x in v] if isinstance(v, list) else v


def distribution(key: str, spec: str):
    """A sample spec -> the Ray Tune domain: uniform(a,b), loguniform(a,b), randint(a,b) (b excluded), choice([a,...])."""
    from ray import tune

    m = SPEC.match(spec)
    if not m or m.group(1) not in DISTRIBUTIONS:
        raise ConfigError(f"sweep.sample.{key}: {spec!r} is not one of {', '.join(sorted(DISTRIBUTIONS))}, e.g. loguniform(1e-5,1e-3)")
    name, args = m.group(1), _yaml(f"[{m.group(2)}]", f"sweep.sample.{key}")
    if name == "choice":
        values = args[0] if len(args) == 1 and isinstance(args[0], list) else args
        return tune.choice(values)
    if len(args) != 2 or not all(isinstance(a, (int, float)) for a in args) or not args[0] < args[1]:
        raise ConfigError(f"sweep.sample.{key}: {spec!r}: {name} takes two numbers, low < high")
    if name == "loguniform" and args[0] <= 0:
        raise ConfigError(f"sweep.sample.{key}: {spec!r}: loguniform needs low > 0")
    return getattr(tune, name)(*args)


def param_space(sweep) -> dict:
    from ray import tune

    space = {k: tune.grid_search(_number(list(v))) for k, v in sweep.grid.items()}
    space.update({k: distribution(k, v) for k, v in sweep.sample.items()})
    return space


def is_stage_key(key: str) -> bool:
    return any(key == p or key.startswith(p) for p in STAGE_KEYS)


def stage_values(sweep) -> list[dict]:
    """Every distinct setting of the swept keys that change prepare/reference ([{}] when none is swept)."""
    choices = {k: v for k, v in sweep.grid.items() if is_stage_key(k)}
    for k, spec in sweep.sample.items():
        if is_stage_key(k):
            domain = distribution(k, spec)
            if not hasattr(domain, "categories"):
                raise ConfigError(f"sweep.sample.{k}: {k} changes the prepared data or the reference; sweep it with a grid or "
                                  f"choice([...]) so that those stages run once per value, before the trials")
            choices[k] = list(domain.categories)
    return [dict(zip(choices, combo)) for combo in itertools.product(*choices.values())]


def with_overrides(base: dict, overrides: dict, where: str = "sweep") -> Config:
    """The base config (a model_dump) with dotted-key overrides, validated."""
    from pydantic import ValidationError

    from dpo_ray.config import _explain

    raw = json.loads(json.dumps(base))
    for key, value in overrides.items():
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key}: {part} is not a section")
        node[parts[-1]] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, where)) from None


def group_key(cfg: Config) -> str:
    """Trials with the same value of every STAGE_KEYS key share one prepared dataset and one reference pass."""
    flat = {k: v for k, v in _flat(cfg.model_dump()).items() if is_stage_key(k)}
    return fingerprint("sweep-group", json.dumps(flat, sort_keys=True, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


# ---- one trial (runs in a Ray Tune trial actor)

def trial(overrides: dict, ctx: dict) -> None:
    """Train, export, evaluate and log one point of the space; the last report carries the eval metrics."""
    import ray.data
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    setup_logging()
    ray.data.DataContext.get_current().enable_progress_bars = False  # the evaluation's bars would interleave with Tune's table
    trial_id = ray.tune.get_context().get_trial_id()
    out_dir = Path(ctx["out_dir"]) / "trials" / trial_id
    base = {**ctx["cfg"], "output_dir": str(out_dir)}
    cfg = with_overrides(base, overrides, f"trial {trial_id} ({', '.join(f'{k}={v}' for k, v in overrides.items())})")
    if ctx["scheduler"]:  # a report (with a checkpoint) every eval_every steps: ASHA's rungs
        cfg.train.checkpoint_every = cfg.sweep.eval_every
    group = ctx["groups"][group_key(cfg)]
    prepared, ref = group["prepared"], group["reference"]
    out_dir.mkdir(parents=True, exist_ok=True)
    inp = Inputs(out_dir, ctx["uri"], Path(ctx["cache"]), ctx["policy_path"], group["reference_path"], group["tokenizer_path"],
                 group["tokenizer"])
    use_gpu, cpus_per_worker = plan_resources(cfg)
    tracker = child_run(cfg, inp, prepared, ref, ctx["parent_run_id"], trial_id, overrides)
    try:
        model_dir, train_summary = train_and_export(cfg, inp, ref, use_gpu, cpus_per_worker, tracker, name=trial_id,
                                                    callbacks=[TuneReportCallback()])
        steps = train_summary["steps"] or 0
        ev, evs = evaluate_and_log(cfg, inp, ref, model_dir, use_gpu, tracker, step=steps, baseline=group["baseline"])
        plot_curves(tracker, out_dir / "curves.png")
        summary = {"trial_id": trial_id, "overrides": overrides, "mlflow_run_id": tracker.run_id, "model_dir": str(model_dir),
                   "train": train_summary, **evs}
        finish_run(cfg, tracker, summary, out_dir)
    except BaseException as e:
        tracker.call("error tag", tracker.client.set_tag, "dpo_ray.error", str(e).splitlines()[0][:500] if str(e) else type(e).__name__)
        fail_run(tracker)
        raise
    # the last thing the trial does: a scheduler may stop it on this report. No scheduler_metric in it, so ASHA lets it end
    ray.tune.report({**{k: v for k, v in ev.items() if k != cfg.sweep.scheduler_metric}, "step": steps, "eval_done": True,
                     "mlflow_run_id": tracker.run_id})


def child_run(cfg: Config, inp: Inputs, prepared, ref, parent_run_id: str, trial_id: str, overrides: dict):
    """The trial's MLflow run under the sweep's; a restarted trial finds and continues its own."""
    from mlflow.tracking import MlflowClient

    from dpo_ray.tracking import RunLogger

    client = MlflowClient(inp.uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`dpo_ray.trial_id` = '{trial_id}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return RunLogger(inp.uri, found[0].info.run_id)
    name = f"{trial_id} " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    tags = {"mlflow.parentRunId": parent_run_id, "dpo_ray.trial_id": trial_id, "dpo_ray.sweep_overrides": json.dumps(overrides)}
    return open_run(cfg, inp, prepared, ref, ("train", "evaluate"), name=name, tags=tags)


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
    base = cfg.model_dump()
    group_cfgs = [with_overrides(base, g, f"sweep ({', '.join(f'{k}={v}' for k, v in g.items()) or 'base'})") for g in groups_wanted]
    inp = preflight(cfg, ("train", "evaluate"))
    state = sweep_state(out_dir, cfg)
    earlier = list(state.get("invocations", []))  # a continued sweep: what its earlier invocations spent
    # a scheduler stops trials: Ray Train's PlacementGroupCleaner frees a stopped trial's workers' placement group only
    # when Ray's state API (the dashboard) answers; without it the next trial waits for ever (ray#54305)
    started_ray = start_ray(address, dashboard=s.scheduler is not None)
    parent = None
    try:
        use_gpu, _ = plan_resources(cfg)
        check_memory(cfg, inp.policy_path, use_gpu)
        # [1] prepare + reference once per distinct data/reference setting, on the driver, before any trial
        groups, stage_seconds = {}, []
        for g, gcfg in zip(groups_wanted, group_cfgs):
            groups[group_key(gcfg)], seconds = shared_stages(gcfg, g, inp, use_gpu)
            stage_seconds.append({"values": g, **seconds})
        parent = parent_run(cfg, inp, state, out_dir)
        # [2] the trials on Ray Tune
        ctx = {"cfg": base, "out_dir": str(out_dir), "uri": inp.uri, "cache": str(inp.cache), "policy_path": inp.policy_path,
               "groups": groups, "parent_run_id": parent.run_id, "scheduler": s.scheduler != "none"}
        results = run_tuner(cfg, space, ctx, out_dir, use_gpu)
        trials = trial_rows(results, s)
        # Tune returns normally after Ctrl+C; trials not yet created (Tune creates them as it goes) are missing
        missing = expected_trials(s) - len(trials)
        interrupted = [t for t in trials if t["status"] in ("PENDING", "RUNNING", "PAUSED")] + [{}] * max(0, missing)
        wall = time.time() - t0
        summary = {"output_dir": str(out_dir), "tracking_uri": inp.uri, "mlflow_parent_run_id": parent.run_id, "metric": s.metric,
                   "mode": s.mode, "space": {**{k: v for k, v in s.grid.items()}, **s.sample}, "trials": trials,
                   "cost": cost(wall, stage_seconds, trials, earlier)}
        if interrupted:
            log.warning("sweep: interrupted with %d trial(s) unfinished; run the same command again to continue", len(interrupted))
            summary["interrupted"] = True
            record_invocation(out_dir, state, wall, stage_seconds)
            return summary
        close_stopped_runs(parent, trials)
        # [3] the best trial: exported, registered, the other trials' models dropped
        best = pick_best(trials, s)
        summary["best"] = export_best(cfg, inp, groups, best, out_dir, parent, use_gpu) if best else None
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
    finally:
        if started_ray:
            stop_ray()


def expected_trials(s) -> int:
    """Grid points x samples: what Tune's BasicVariantGenerator creates."""
    n = s.samples
    for values in s.grid.values():
        n *= len(values)
    return n


def sweep_state(out_dir: Path, cfg: Config) -> dict:
    """<output_dir>/sweep.json: the sweep's fingerprint and parent run; another sweep in the same output_dir is refused."""
    key = fingerprint("sweep", json.dumps(masked(cfg.model_dump()), sort_keys=True, default=str))
    path = out_dir / "sweep.json"
    state = json.loads(path.read_text()) if path.exists() else {}
    if state and state.get("key") != key:
        raise SetupError(f"{out_dir} holds another sweep (other config or space); set output_dir to a new directory, "
                         f"or delete {path} and {out_dir / 'tune'} to start this one over")
    state["key"] = key
    write_json_atomic(path, state)
    return state


def shared_stages(cfg: Config, values: dict, inp: Inputs, use_gpu: bool) -> tuple[dict, dict]:
    """prepare + reference for one distinct setting; (what the trials need, the seconds each took)."""
    from dpo_ray.model import load_tokenizer

    from .run import resolve

    log.info("sweep: prepare + reference for %s", ", ".join(f"{k}={v}" for k, v in values.items()) or "all trials")
    out_dir = inp.out_dir
    policy = resolve(cfg.model.policy, inp.uri, inp.cache)
    ref_path = resolve(cfg.model.reference, inp.uri, inp.cache) if cfg.model.reference else policy
    tok_path = resolve(cfg.model.tokenizer, inp.uri, inp.cache) if cfg.model.tokenizer else policy
    t0 = time.time()
    prepared = prepare.run(cfg, tok_path, rejects_copy=out_dir / "rejects" / f"{group_key(cfg)}.jsonl")
    t1 = time.time()
    ref = reference.run(cfg, prepared, ref_path, tok_path, use_gpu)
    seconds = {"prepare_seconds": round(t1 - t0, 2), "reference_seconds": round(time.time() - t1, 2), "reference_hit": ref.hit,
               "reference_key": ref.key}
    # what a run without the cache spends scoring: measured when this pass scored, else by the pass that filled the cache
    record = open_location(cfg.cache_dir) / "reference" / f"{ref.key}.seconds.json"
    if not ref.hit:
        record.write_text(json.dumps({"reference_seconds": seconds["reference_seconds"]}) + "\n")
    seconds["reference_seconds_measured"] = json.loads(record.read_text())["reference_seconds"] if record.is_file() else None
    # the reference scored against its own cache (eval/reference/...: chance accuracy, zero margin), once for all trials
    baseline = evaluate.evaluate_model(cfg, ref, None, tok_path, use_gpu) if any(evaluate.has_split(p, "eval") for p in ref.parts) else None
    group = {"prepared": prepared, "reference": ref, "reference_path": ref_path, "tokenizer_path": tok_path, "baseline": baseline,
             "tokenizer": load_tokenizer(tok_path, cfg.model.trust_remote_code, cfg.model.hf_token)}
    return group, seconds


def parent_run(cfg: Config, inp: Inputs, state: dict, out_dir: Path):
    """The sweep's MLflow run (reused when the sweep continues): the space, the metric, the base config as params."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from dpo_ray.config import flatten
    from dpo_ray.tracking import RunLogger

    client = MlflowClient(inp.uri)
    if state.get("parent_run_id"):
        client.update_run(state["parent_run_id"], status="RUNNING")
        return RunLogger(inp.uri, state["parent_run_id"])
    exp_id = ensure_experiment(inp.uri, cfg.mlflow.experiment)
    s = cfg.sweep
    run_id = client.create_run(exp_id, run_name=cfg.mlflow.run_name or f"sweep-{cfg.name}-{out_dir.name}",
                               tags={"dpo_ray.sweep": "true", "mlflow.source.name": "dpo-ray sweep"}).info.run_id
    state["parent_run_id"] = run_id
    write_json_atomic(out_dir / "sweep.json", state)
    tracker = RunLogger(inp.uri, run_id)
    params = {**{f"base.{k}": v for k, v in flatten(masked(cfg.model_dump(exclude={"sweep"}))).items()},
              **{f"sweep.{k}": v for k, v in flatten(s.model_dump()).items() if k not in ("grid", "sample")},
              **{f"space.{k}": json.dumps(v) for k, v in s.grid.items()}, **{f"space.{k}": v for k, v in s.sample.items()}}
    tracker.call("params", tracker.client.log_batch, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.call("space.json", tracker.client.log_dict, {"grid": s.grid, "sample": s.sample, "samples": s.samples}, "space.json")
    return tracker


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


def trial_rows(results, s) -> list[dict]:
    """One row per trial: id, overrides, status (FINISHED, STOPPED early, ERROR ...), metric, steps, error."""
    statuses = {t.trial_id: t.status for t in results._experiment_analysis.trials}  # PENDING/RUNNING after an interrupt
    rows = []
    for r in results:
        m = r.metrics or {}
        tid = m.get("trial_id") or Path(r.path).name
        tid = next((t for t in statuses if t in str(r.path)), tid)
        status = statuses.get(tid, "TERMINATED")
        row = {"trial_id": tid, "overrides": r.config, "step": m.get("step"), "mlflow_run_id": m.get("mlflow_run_id"),
               s.metric: m.get(s.metric), "error": None}
        if r.error is not None:
            row["status"], row["error"] = "ERROR", first_line(r.error)
        elif status == "TERMINATED":
            row["status"] = "FINISHED" if m.get("eval_done") else "STOPPED"  # stopped by the scheduler before its end
        else:
            row["status"] = status
        rows.append(row)
    return sorted(rows, key=lambda r: r["trial_id"])


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


def export_best(cfg: Config, inp: Inputs, groups: dict, best: dict, out_dir: Path, parent, use_gpu: bool) -> dict:
    """<output_dir>/best/{model,summary.json,config.yaml}; with registry.name the champion/challenger gate on the best
    trial's own run (its model logged there first)."""
    from dpo_ray.config import to_yaml
    from dpo_ray.tracking import RunLogger

    trial_dir = out_dir / "trials" / best["trial_id"]
    tsum = json.loads((trial_dir / "summary.json").read_text())
    bcfg = with_overrides({**cfg.model_dump(), "output_dir": str(trial_dir)}, best["overrides"])
    best_dir = out_dir / "best"
    best_dir.mkdir(exist_ok=True)
    model_name = Path(tsum["model_dir"]).name
    replace_dir(best_dir / model_name, lambda tmp: shutil.copytree(tsum["model_dir"], tmp, dirs_exist_ok=True))
    (best_dir / "config.yaml").write_text(to_yaml(Config.model_validate(masked(bcfg.model_dump()))))
    write_json_atomic(best_dir / "summary.json", tsum)
    out = {**best, "model_dir": str(best_dir / model_name)}
    log.info("sweep: best trial %s (%s = %.4f): %s -> %s", best["trial_id"], cfg.sweep.metric, best[cfg.sweep.metric],
             best["overrides"], out["model_dir"])
    if cfg.registry.name:
        tracker = RunLogger(inp.uri, tsum["mlflow_run_id"])
        g = groups[group_key(bcfg)]
        binp = Inputs(trial_dir, inp.uri, inp.cache, inp.policy_path, g["reference_path"], g["tokenizer_path"], g["tokenizer"])
        logged = log_model(bcfg, tracker, best_dir / model_name, trial_dir)
        ev = {f"eval/{k}": v for k, v in tsum["eval"].items()}
        out["registry"] = register_model(bcfg, binp, g["reference"], tracker, ev, use_gpu, logged)
        tracker.flush()
    return out


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
             "step": t["step"], "error": t["error"] or "", "mlflow_run_id": t["mlflow_run_id"] or ""} for t in summary["trials"]]
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
