"""The stage sequence every driver composes, so that none of them re-implements a step.

    shared part   prepare -> reference -> the reference's own eval baseline   (run: once; sweep: once per group)
    trained part  train + export -> evaluate -> log the model -> curves       (run: once; sweep: once per trial)
    registration  the champion/challenger gate on the logged model            (run; sweep: its best trial)

`run` calls each once (`retrain` is `run` with its skip, checked between prepare and reference); `sweep` calls the
shared part per group on the driver and the trained part per trial inside Ray Tune. Each stage is
`stage(cfg, ctx, upstream) -> artifact` (pipeline/context.py holds ctx); MLflow calls are in pipeline/mlflow_run.py.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from dpo_ray.config import Config

from . import evaluate, gate, generate, register
from .context import Context
from .evaluate import Evaluation
from .mlflow_run import log_evaluation, log_model, plot_curves
from .prepare import Prepared, prepare_pairs
from .reference import Reference, score_reference
from .runtime import plan_resources
from .train import train_policy

log = logging.getLogger("dpo_ray")


@dataclass
class Shared:
    """What the shared part made, read by every training after it: the prepared data, the cached reference (None
    when the stages stop before it, or the retrain skip held), the reference's own eval metrics (None without an
    eval split or evaluate stage), the seconds each stage took."""

    prepared: Prepared
    ref: Reference | None = None
    baseline: dict | None = None
    seconds: dict = field(default_factory=dict)
    skipped: bool = False  # the driver's `skip(prepared)` held: nothing after prepare ran


def shared_part(cfg: Config, ctx: Context, stages: tuple[str, ...], skip=None) -> Shared:
    """prepare, then (with "reference" in stages, unless `skip(prepared)`) the reference pass, then (with "evaluate")
    the reference scored against its own cache on the eval split: chance accuracy, zero margin, once for all trainings."""
    t0 = time.time()
    prepared = prepare_pairs(cfg, ctx)
    shared = Shared(prepared, seconds={"prepare_seconds": round(time.time() - t0, 2)})
    if skip is not None and skip(prepared):
        shared.skipped = True
        return shared
    if "reference" not in stages:
        return shared
    t1 = time.time()
    shared.ref = score_reference(cfg, ctx, prepared)
    shared.seconds.update(reference_seconds=round(time.time() - t1, 2), reference_hit=shared.ref.hit, reference_key=shared.ref.key)
    if "evaluate" in stages and any(evaluate.has_split(p, "eval") for p in shared.ref.parts):
        shared.baseline = evaluate.evaluate_model(cfg, shared.ref, None, ctx.tokenizer_path, ctx.use_gpu)
    return shared


def trained_part(cfg: Config, ctx: Context, shared: Shared, tracker, stages: tuple[str, ...] = ("train", "evaluate"),
                 name: str | None = None, callbacks: list | None = None, log_the_model: bool = True) -> tuple[dict, Evaluation | None, bool]:
    """Train and export (with "train"), evaluate and log the model (with "evaluate"), the curves; returns (the
    summary's train/model_dir/eval entries, the evaluation, whether MLflow holds the model). `name` and `callbacks`:
    a sweep trial's Ray Train run name and Tune's report callback; `log_the_model` false: a sweep trial whose model
    is not kept (its best is logged when registered: a 7B's weights are not copied to MLflow once per trial)."""
    lora = cfg.train.lora
    summary: dict = {}
    model_dir = ctx.out_dir / ("adapter" if lora and not lora.merge else "model")
    if "train" in stages:
        ctx.use_gpu, ctx.cpus_per_worker = plan_resources(cfg)  # the cluster as it is when training starts
        trained = train_policy(cfg, ctx, shared.ref, tracker.run_id, name=name, callbacks=callbacks)
        model_dir, summary["train"] = trained.model_dir, trained.summary
    summary["model_dir"] = str(model_dir)
    evaluation, logged = None, False
    if "evaluate" in stages:
        evaluation = evaluate.evaluate_policy(cfg, ctx, shared.ref, model_dir, shared.baseline)
        log_evaluation(tracker, evaluation, step=summary.get("train", {}).get("steps") or 0,
                       judge_kind=cfg.eval.judge.kind if cfg.eval.judge else None)
        summary.update(evaluation.summary())
        logged = log_model(cfg, tracker, model_dir, ctx.out_dir) if log_the_model else False
    if "train" in stages:
        plot_curves(tracker, ctx.out_dir / "curves.png")
    return summary, evaluation, logged


def registration(cfg: Config, ctx: Context, shared: Shared, tracker, evaluation: Evaluation, logged: bool, model_dir=None) -> dict:
    """Stage 5: the champion/challenger gate for the run's logged model (pipeline/gate.py): the champion is scored on the
    same eval pairs and reference, and with registry.metric win_rate its replies are generated (the reference's are
    cached) and the judge compares them with the challenger's, prompt by prompt. `model_dir`: the challenger's, to
    score it when `evaluation` lacks what the gate compares (a sweep's best trial, evaluated in its worker)."""
    if not logged:
        return {"decision": "not_registered", "reason": "the model artifact could not be logged"}
    r, metric = cfg.registry, cfg.registry.metric
    challenger = evaluation

    def compare(champion_dir: str, version) -> gate.Comparison:
        nonlocal challenger
        confident = r.min_confidence > 0
        if metric == "win_rate":
            if confident and challenger.replies is None:  # the head-to-head needs the challenger's whole replies
                challenger = Evaluation(challenger.metrics, replies=generate.generate_and_judge(cfg, ctx, shared.ref, model_dir)[1])
            gen, champ = generate.generate_and_judge(cfg, ctx, shared.ref, champion_dir)  # the champion over the same reference
            if not confident:
                return gate.point_rule(metric, challenger.metrics["eval/win_rate"], gen["eval/win_rate"], r.min_improvement, version)
            table = challenger.replies[["row_id", "prompt_json", "policy"]].rename(columns={"policy": "challenger"})
            table["champion"] = champ.set_index("row_id").loc[table.row_id, "policy"].to_numpy()
            wins = generate.head_to_head(cfg, table, ctx.use_gpu, x="challenger", y="champion").win
            return gate.win_rate_rule(wins, challenger.metrics["eval/win_rate"], gen["eval/win_rate"], r.min_confidence, r.min_improvement, version)
        m, _, champ_pairs = evaluate.evaluate_model(cfg, shared.ref, champion_dir, ctx.tokenizer_path, ctx.use_gpu, per_pair=True)
        if not confident:
            return gate.point_rule(metric, challenger.metrics[f"eval/{metric}"], m[metric], r.min_improvement, version)
        if challenger.per_pair is None:
            challenger = Evaluation(challenger.metrics, per_pair=evaluate.evaluate_model(cfg, shared.ref, str(model_dir), ctx.tokenizer_path,
                                                                                          ctx.use_gpu, per_pair=True)[2])
        return gate.pairs_rule(metric, challenger.per_pair, champ_pairs, r.min_confidence, r.min_improvement, version)

    return register.register_model(cfg, ctx, tracker, evaluation.metrics, compare)
