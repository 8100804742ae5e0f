"""The MLflow side of a run, in one place: open a run (or a sweep's parent and its trials' children) with its inputs
and params, the training curves, the model, the summary and the end state. Every call goes through the run's
RunLogger (dpo_ray/tracking.py): retried, and counted when lost rather than failing the run."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from dpo_ray.config import Config, flatten, masked, to_yaml
from dpo_ray.tracking import RunLogger, dataset_input, ensure_experiment

from . import register
from .artifacts import write_json_atomic
from .context import Context


def masked_yaml(cfg: Config) -> str:
    """The config as YAML with its secrets masked: what is saved beside a model and logged."""
    return to_yaml(Config.model_validate(masked(cfg.model_dump())))


def git_commit() -> str | None:
    """The code's commit; a Ray job's working dir has no .git, so DPO_RAY_GIT_COMMIT (set via --runtime-env-json) wins."""
    if os.environ.get("DPO_RAY_GIT_COMMIT"):
        return os.environ["DPO_RAY_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_name(cfg: Config, prepared_key: str) -> str:
    model = Path(cfg.model.policy.rstrip("/")).name.replace("demo:", "")
    t = cfg.train
    return cfg.mlflow.run_name or f"{model}-data{prepared_key[:8]}-{t.loss.name}-b{t.beta:g}-lr{t.lr:g}-e{t.epochs}"


def plot_curves(tracker, path: Path) -> None:
    """train/loss and train/rewards/accuracies per step as a PNG artifact, for comparing runs at a glance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tracker.flush()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, name in zip(axes, ("train/loss", "train/rewards/accuracies")):
        history = tracker.call(f"{name} history", tracker.client.get_metric_history, name) or []
        points = sorted({m.step: m.value for m in history}.items())
        ax.plot([p[0] for p in points], [p[1] for p in points])
        ax.set_title(name)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    tracker.call("curves.png", tracker.client.log_artifact, str(path))


def dataset_inputs(prepared) -> list:
    """Each input file as an MLflow dataset input: name, content hash, path, its counts and the layouts found."""
    per_file = {s["file"]: s for s in prepared.stats["per_file"]}
    eval_files = set(prepared.stats["eval_files"])
    out = []
    for part in prepared.parts:
        counts = per_file[str(part.file)]
        profile = {"num_rows": counts["rows_read"], **{k: v for k, v in counts.items() if k != "file"}}
        out.append(dataset_input(part.file.name, part.digest, str(part.file), "eval" if str(part.file) in eval_files else "training", profile))
    return out


def open_run(cfg: Config, ctx: Context, prepared, ref, stages: tuple[str, ...], name: str | None = None, tags: dict | None = None):
    """Creates the MLflow run of one training (a child of a sweep's run when tags carry mlflow.parentRunId) and logs what
    it starts from: dataset inputs, the config as params and config.yaml, the data stats and rejects. Returns its RunLogger."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    safe_cfg = masked(cfg.model_dump())  # what is logged and saved: secrets masked
    exp_id = ensure_experiment(ctx.uri, cfg.mlflow.experiment)
    tags = {"dataset_fingerprint": prepared.key, "reference_cache_key": ref.key, "dpo_ray.stages": ",".join(stages),
            "mlflow.source.name": "dpo-ray", **({"git_commit": c} if (c := git_commit()) else {}), **(tags or {})}
    run_id = MlflowClient(ctx.uri).create_run(exp_id, run_name=name or run_name(cfg, prepared.key), tags=tags).info.run_id
    tracker = RunLogger(ctx.uri, run_id)
    tracker.call("dataset inputs", tracker.client.log_inputs, datasets=dataset_inputs(prepared))
    tracker.call("params", tracker.client.log_batch, params=[Param(k, str(v)[:6000]) for k, v in flatten(safe_cfg).items()])
    tracker.call("config.yaml", tracker.client.log_text, masked_yaml(cfg), "config.yaml")
    tracker.call("data_stats.json", tracker.client.log_dict, prepared.stats, "data_stats.json")
    rejects = ctx.out_dir / "rejects.jsonl"
    if rejects.exists():
        tracker.call("rejects.jsonl", tracker.client.log_artifact, str(rejects))
    tracker.log_metrics({f"data/{k}": prepared.stats[k] for k in ("rows_read", "rows_used", "rows_rejected", "duplicates", "truncated")}, step=0)
    return tracker


def nested_run(cfg: Config, ctx: Context, prepared, ref, parent_run_id: str, key_tag: str, key: str, stages: tuple[str, ...],
               name: str, tags: dict):
    """A child MLflow run under `parent_run_id`, found again by its `key_tag` = `key` (a restarted trial or a continued
    round continues its own run, set RUNNING again), else opened with `name` and `tags`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs([exp_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}' and tags.`{key_tag}` = '{key}'")
    if found:
        client.update_run(found[0].info.run_id, status="RUNNING")
        return RunLogger(ctx.uri, found[0].info.run_id)
    return open_run(cfg, ctx, prepared, ref, stages, name=name, tags={"mlflow.parentRunId": parent_run_id, key_tag: key, **tags})


def child_run(cfg: Config, ctx: Context, prepared, ref, parent_run_id: str, trial_id: str, overrides: dict):
    """The trial's MLflow run under the sweep's; a restarted trial finds and continues its own."""
    name = f"{trial_id} " + " ".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items())
    return nested_run(cfg, ctx, prepared, ref, parent_run_id, "dpo_ray.trial_id", trial_id, ("train", "evaluate"), name,
                      {"dpo_ray.sweep_overrides": json.dumps(overrides)})


def parent_run(cfg: Config, ctx: Context, state: dict, out_dir: Path):
    """The sweep's MLflow run (reused when the sweep continues): the space, the metric, the base config as params."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.uri)
    if state.get("parent_run_id"):
        client.update_run(state["parent_run_id"], status="RUNNING")
        return RunLogger(ctx.uri, state["parent_run_id"])
    exp_id = ensure_experiment(ctx.uri, cfg.mlflow.experiment)
    s = cfg.sweep
    run_id = client.create_run(exp_id, run_name=cfg.mlflow.run_name or f"sweep-{cfg.name}-{out_dir.name}",
                               tags={"dpo_ray.sweep": "true", "mlflow.source.name": "dpo-ray sweep"}).info.run_id
    state["parent_run_id"] = run_id
    write_json_atomic(out_dir / "sweep.json", state)
    tracker = RunLogger(ctx.uri, run_id)
    params = {**{f"base.{k}": v for k, v in flatten(masked(cfg.model_dump(exclude={"sweep"}))).items()},
              **{f"sweep.{k}": v for k, v in flatten(s.model_dump()).items() if k not in ("grid", "sample")},
              **{f"space.{k}": json.dumps(v) for k, v in s.grid.items()}, **{f"space.{k}": v for k, v in s.sample.items()}}
    tracker.call("params", tracker.client.log_batch, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.call("space.json", tracker.client.log_dict, {"grid": s.grid, "sample": s.sample, "samples": s.samples}, "space.json")
    return tracker


def log_evaluation(tracker, evaluation, step: int, judge_kind: str | None = None) -> None:
    """The evaluation's metrics at `step` and its tables (eval_pairs.json, eval_generations.json) in the run; the
    generations also as the run's MLflow GenAI evaluation (pipeline/mlflow_genai.py; `judge_kind`: eval.judge's kind,
    the assessments' source), for the Evaluation runs page."""
    if evaluation.pairs is not None:
        tracker.call("eval_pairs.json", tracker.client.log_table, data=evaluation.pairs, artifact_file="eval_pairs.json")
    if evaluation.generations is not None:
        tracker.call("eval_generations.json", tracker.client.log_table, data=evaluation.generations, artifact_file="eval_generations.json")
        from .mlflow_genai import log_generations

        log_generations(tracker, evaluation.generations, judge_kind)
    tracker.log_metrics(evaluation.metrics, step=step)


def log_model(cfg: Config, tracker, model_dir: Path, out_dir: Path) -> bool:
    """The exported model as an MLflow transformers model (the run's Logged models, its eval metrics linked: logged
    after them) and with a merged LoRA the adapter as artifacts; an unmerged adapter as artifacts `model`. False
    when MLflow lost them."""
    tracker.flush()  # the eval metrics, to link them to the model
    if (model_dir / "config.json").exists():
        tracker.call("model", register.log_mlflow_model, tracker.client, model_dir, cfg.model.trust_remote_code)
    else:
        tracker.call("model artifacts", tracker.client.log_artifacts, str(model_dir), "model")
    if cfg.train.lora and cfg.train.lora.merge and (out_dir / "adapter").exists():
        tracker.call("adapter artifacts", tracker.client.log_artifacts, str(out_dir / "adapter"), "adapter")
    return not tracker.down


def finish_run(cfg: Config, tracker, summary: dict, out_dir: Path, monitor=None) -> None:
    """summary.json and config.yaml written to out_dir and logged; the run marked FINISHED."""
    tracker.flush()
    summary["mlflow_values_lost"] = tracker.lost
    if monitor is not None:
        monitor.finish()
    write_json_atomic(out_dir / "summary.json", summary)
    (out_dir / "config.yaml").write_text(masked_yaml(cfg))
    tracker.call("summary.json", tracker.client.log_artifact, str(out_dir / "summary.json"))
    tracker.call("run status", tracker.client.set_terminated, "FINISHED")


def fail_run(tracker) -> None:
    if tracker is not None:
        tracker.retries = 1
        tracker.call("run status", tracker.client.set_terminated, "FAILED")


def iterate_parent_run(cfg: Config, ctx: Context, state: dict, out_dir: Path, prompts: dict | None = None):
    """`dpo-ray iterate`'s MLflow run (reused when the iteration continues): the config as params, its prompts' counts;
    its id kept in <output_dir>/iterate.json. The rounds are its children (`round_run`)."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(ctx.uri)
    if state.get("parent_run_id"):
        client.update_run(state["parent_run_id"], status="RUNNING")
        return RunLogger(ctx.uri, state["parent_run_id"])
    exp_id = ensure_experiment(ctx.uri, cfg.mlflow.experiment)
    tags = {"dpo_ray.iterate": "true", "mlflow.source.name": "dpo-ray iterate", **({"git_commit": c} if (c := git_commit()) else {})}
    run_id = client.create_run(exp_id, run_name=cfg.mlflow.run_name or f"iterate-{cfg.name}-{out_dir.name}", tags=tags).info.run_id
    state["parent_run_id"] = run_id
    write_json_atomic(out_dir / "iterate.json", state)
    tracker = RunLogger(ctx.uri, run_id)
    params = flatten(masked(cfg.model_dump(exclude={"sweep"})))
    tracker.call("params", tracker.client.log_batch, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    tracker.call("config.yaml", tracker.client.log_text, masked_yaml(cfg), "config.yaml")
    if prompts:
        tracker.call("prompts.json", tracker.client.log_dict, prompts, "prompts.json")
    return tracker


def round_run(cfg: Config, ctx: Context, prepared, ref, parent_run_id: str, round_no: int):
    """A round's MLflow run under the iterate run (a round continued after an interruption finds its own again)."""
    return nested_run(cfg, ctx, prepared, ref, parent_run_id, "dpo_ray.round", str(round_no), ("train",), f"round-{round_no}", {})

