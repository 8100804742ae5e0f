"""Stage 5, register: the model becomes a new version of `registry.name` (alias challenger); it takes the
`champion` alias only if it beats the current champion by `registry.min_improvement` on the same eval set.

Both are scored against the same reference log-probs (this run's cache), so the comparison is fair; when
the run started from the champion (model.policy: models:/NAME@champion) the champion reads chance by
construction and the challenger must prefer chosen replies on more pairs than that. Registered versions
are plain Hugging Face directories: `mlflow.artifacts.download_artifacts("models:/NAME@champion")` then
`AutoModelForCausalLM.from_pretrained(path)`.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from .storage import model_root

log = logging.getLogger("dpo_ray")


def registry_dir(cache: Path, name: str, version: str) -> Path:
    return Path(cache) / "models" / "registry" / f"{name}-v{version}"


def download(uri: str, name_or_uri: str, cache: Path) -> tuple[str, str]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (local HF directory, version), cached by version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from dpo_ray.model import ModelError

    spec = name_or_uri[len("models:/"):]
    client = MlflowClient(uri)
    try:
        if "@" in spec:
            name, alias = spec.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = spec.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ModelError(f"{name_or_uri}: not in the MLflow registry at {uri} ({str(e).splitlines()[0][:160]}); "
                         f"for the first run set model.policy to a base model, its result becomes the champion") from None
    out = registry_dir(cache, name, mv.version)
    if not (out / "config.json").exists():
        # the version's own source URI with an explicit tracking URI: "models:/" URIs would use the global registry URI
        source = client.get_model_version_download_uri(name, mv.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-") as tmp:
            got = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri)  # <tmp>/model
            if not (out / "config.json").exists():
                os.replace(got, out)
    return str(out), mv.version


def run(cfg, tracker, uri: str, challenger_eval: dict, score_champion) -> dict:
    """Register this run's logged `model` artifact; compare with the champion; move the aliases. Returns the decision."""
    from mlflow.exceptions import MlflowException

    client, name, metric = tracker.client, cfg.registry.name, cfg.registry.metric
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DPO policies trained by dpo-ray")
    source = client.get_run(tracker.run_id).info.artifact_uri.rstrip("/") + "/model"
    mv = client.create_model_version(name, source=source, run_id=tracker.run_id,
                                     tags={"eval_metric": metric, f"eval/{metric}": str(challenger_eval[f"eval/{metric}"])})
    client.set_registered_model_alias(name, "challenger", mv.version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    challenger_score = challenger_eval[f"eval/{metric}"]
    decision = {"name": name, "challenger_version": mv.version, "metric": metric, "challenger_score": challenger_score,
                "champion_version": champion.version if champion else None, "champion_score": None}
    if champion is None:
        promote = True
        reason = "no champion yet"
    else:
        champ_dir, _ = download(uri, f"models:/{name}/{champion.version}", model_root(cfg.cache_dir, cfg.output_dir))
        decision["champion_score"] = score_champion(champ_dir)[metric]
        promote = challenger_score >= decision["champion_score"] + cfg.registry.min_improvement
        reason = f"{metric} {challenger_score:.4f} vs champion v{champion.version} {decision['champion_score']:.4f} (min improvement {cfg.registry.min_improvement})"
    if promote:
        client.set_registered_model_alias(name, "champion", mv.version)
    decision["decision"] = "promoted" if promote else "kept_champion"
    log.info("register: %s v%s %s: %s", name, mv.version, "is the new champion" if promote else "stays challenger", reason)
    tracker.call("registry tags", lambda run_id: [client.set_tag(run_id, f"registry.{k}", str(v)) for k, v in decision.items()])
    metrics = {"registry/challenger_score": challenger_score}
    if decision["champion_score"] is not None:
        metrics["registry/champion_score"] = decision["champion_score"]
    tracker.log_metrics(metrics, step=0)
    return decision
