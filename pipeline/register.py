"""Stage 5, register: the model becomes a new version of `registry.name` (alias challenger); it takes the
`champion` alias only if it beats the current champion by `registry.min_improvement` on the same eval set.

Both are scored against the same reference log-probs (this run's cache), so the comparison is fair; when
the run started from the champion (model.policy: models:/NAME@champion) the champion reads chance by
construction and the challenger must prefer chosen replies on more pairs than that.

The run's model is an MLflow model of the `transformers` flavor (a text-generation pipeline with its tokenizer,
served with MLflow's chat interface, llm/v1/chat): one of the run's Logged models, with its eval metrics, and the
source of the registered version (`models:/<model_id>`). It loads with `mlflow.transformers.load_model`,
`mlflow.pyfunc.load_model`, serves with `mlflow models serve`; `download` turns it (and versions registered before
it, a plain HF folder at run artifact `model`) into a plain Hugging Face directory.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from .lease import model_claim
from .storage import model_root

log = logging.getLogger("dpo_ray")


MODEL_NAME = "model"  # the logged model's name (and the run artifact folder of versions registered before it)
TASK = "llm/v1/chat"  # MLflow's chat interface on a transformers text-generation pipeline: messages in, the chat template applied
REQUIREMENTS = ("mlflow", "torch", "transformers", "tokenizers", "safetensors")  # pinned to this environment's versions


@contextmanager
def tracking_uri(uri: str):
    """MLflow's global tracking URI set to `uri` for the block, then put back as it was ($MLFLOW_TRACKING_URI too): for
    the fluent calls that read it (registering a `models:/<model_id>` source looks the logged model up through it)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    previous, env = utils._tracking_uri, os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


def pip_requirements() -> list[str]:
    """This environment's versions (MLflow's default list for transformers wants torchvision, and inferring one loads
    the model again in a subprocess). mlflow's own from mlflow.__version__: mlflow-skinny (the GPU machine's wheels)
    installs the same package under another distribution name, and version("mlflow") would raise there."""
    from importlib.metadata import version

    import mlflow

    return [f"{p}=={(mlflow.__version__ if p == 'mlflow' else version(p)).split('+')[0]}" for p in REQUIREMENTS]


def log_mlflow_model(run_id: str, client, model_dir: Path, trust_remote_code: bool = False) -> str:
    """`model_dir` (HF model + tokenizer) as an MLflow transformers model logged by run `run_id`: a LoggedModel of the
    run's experiment with the run's params, the run's eval/* metrics linked to it (at the eval step). Returns its id.

    The model is loaded once in this process (MLflow 3.17's path-only logging fails on transformers 5), in its
    saved dtype: host memory for one copy of the weights, as the LoRA merge already needs."""
    import mlflow.transformers
    from huggingface_hub import ModelCard
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric
    from mlflow.models import Model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.time()
    run = client.get_run(run_id)
    evals = [m for k in run.data.metrics if k.startswith("eval/") for m in client.get_metric_history(run_id, k)]
    step = max((m.step for m in evals), default=0)
    lm = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME, source_run_id=run_id, params=run.data.params,
                                    tags={"dpo_ray.model_dir": str(model_dir)})
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto", trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with tempfile.TemporaryDirectory(prefix="dpo-ray-mlflow-model-") as tmp:
            path = Path(tmp) / MODEL_NAME
            meta = Model(artifact_path=lm.artifact_location, model_uuid=lm.model_id, run_id=run_id, model_id=lm.model_id)
            card = ModelCard(f"---\nlibrary_name: transformers\ntags: [dpo, dpo-ray]\n---\n# A DPO policy trained by dpo-ray\n\n"
                             f"MLflow run {run_id}, exported from {model_dir}.\n")  # else MLflow asks the hub for a card
            mlflow.transformers.save_model({"model": model, "tokenizer": tokenizer}, str(path), task=TASK, mlflow_model=meta,
                                           pip_requirements=pip_requirements(), model_card=card)
            (path / "LICENSE.txt").unlink(missing_ok=True)  # MLflow's note pointing at huggingface.co/<local path>
            del model
            client.log_model_artifacts(lm.model_id, str(path))
        client.log_outputs(run_id, [LoggedModelOutput(lm.model_id, step)])
        client.log_batch(run_id, metrics=[Metric(m.key, m.value, m.timestamp, m.step, model_id=lm.model_id, run_id=run_id)
                                          for m in evals if m.step == step])
        client.finalize_logged_model(lm.model_id, LoggedModelStatus.READY)
    except BaseException:
        try:
            client.finalize_logged_model(lm.model_id, LoggedModelStatus.FAILED)
        except Exception:
            pass
        raise
    log.info("mlflow: logged %s as model %s (transformers flavor, %s) in %.1f s", model_dir, lm.model_id, TASK, time.time() - t0)
    return lm.model_id


def logged_model_id(client, run_id: str) -> str | None:
    """The run's last logged model named `model`; None for runs that logged a folder only (an unmerged LoRA adapter)."""
    outputs = client.get_run(run_id).outputs
    ids = [o.model_id for o in (outputs.model_outputs if outputs else [])]
    names = {i: client.get_logged_model(i).name for i in ids}
    return next((i for i in reversed(ids) if names[i] == MODEL_NAME), None)


def link_version(client, model_id: str, name: str, version) -> None:
    """The logged model's `mlflow.modelVersions` tag (its registered versions in the UI) names this version: a server
    writes it when the version is created, a sqlite store does not (and mlflow.register_model would add it twice)."""
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
    if not any(v["name"] == name and str(v["version"]) == str(version) for v in linked):
        client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked + [{"name": name, "version": int(version)}])})


def to_hf_dir(mlflow_model: Path) -> Path:
    """An MLflow transformers model directory (model/ + components/tokenizer/) made a plain HF directory in place: the
    tokenizer files (and MLmodel, saying where it came from) moved into model/, which is returned."""
    hf = mlflow_model / "model"
    for f in [*(mlflow_model / "components" / "tokenizer").iterdir(), mlflow_model / "MLmodel"]:
        os.replace(f, hf / f.name)
    return hf


def registry_dir(cache: Path, name: str, version: str) -> Path:
    return Path(cache) / "models" / "registry" / f"{name}-v{version}"


def download(uri: str, name_or_uri: str, cache: Path) -> tuple[str, str]:
    """models:/NAME@ALIAS or models:/NAME/VERSION -> (local HF directory, version), cached by version: the files of an
    MLflow transformers model (weights under model/, tokenizer under components/tokenizer/) put in one directory, or
    the plain HF folder of a version registered before that."""
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
    if (out / "config.json").exists():
        return str(out), mv.version
    with model_claim(out, f"the download of {name} version {mv.version}") as claim:  # another run downloading it: waited for
        if claim.done:
            return str(out), mv.version
        # the version's own source URI with an explicit tracking URI: "models:/" URIs would use the global registry URI
        source = client.get_model_version_download_uri(name, mv.version)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tmp-") as tmp:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=uri))
            try:  # an MLflow transformers model, or a plain HF folder (versions registered before models were MLflow models)
                os.replace(to_hf_dir(got) if (got / "MLmodel").exists() else got, out)
            except OSError as e:  # ENOTEMPTY/EEXIST: another run put its download in place first, a hit
                if not (out / "config.json").exists():
                    raise ModelError(f"{name_or_uri}: cannot put the download in place at {out} ({e.strerror or e}); "
                                     f"remove {out} and run again") from None
    return str(out), mv.version


def register_model(cfg, ctx, tracker, challenger_eval: dict, compare) -> dict:
    """Stage 5: register this run's logged model (an unmerged LoRA adapter: its `model` artifact folder); compare with
    the champion (`compare(champion_dir, version)` -> pipeline.gate.Comparison on the same eval set); move the aliases.
    Returns the decision."""
    uri = ctx.uri
    from mlflow.exceptions import MlflowException

    client, name, metric = tracker.client, cfg.registry.name, cfg.registry.metric
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="DPO policies trained by dpo-ray")
    tags = {"eval_metric": metric, f"eval/{metric}": str(challenger_eval[f"eval/{metric}"])}
    model_id = logged_model_id(client, tracker.run_id)
    if model_id:
        with tracking_uri(uri):  # a sqlite registry looks the logged model up through the global tracking URI
            mv = client.create_model_version(name, source=f"models:/{model_id}", run_id=tracker.run_id, tags=tags, model_id=model_id)
        link_version(client, model_id, name, mv.version)
    else:
        source = client.get_run(tracker.run_id).info.artifact_uri.rstrip("/") + "/" + MODEL_NAME
        mv = client.create_model_version(name, source=source, run_id=tracker.run_id, tags=tags)
    client.set_registered_model_alias(name, "challenger", mv.version)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    challenger_score = challenger_eval[f"eval/{metric}"]
    decision = {"name": name, "challenger_version": mv.version, "metric": metric, "challenger_score": challenger_score,
                "champion_version": champion.version if champion else None, "champion_score": None}
    if champion is None:
        promote, reason = True, "no champion yet"
    else:
        champ_dir, _ = download(uri, f"models:/{name}/{champion.version}", model_root(cfg.cache_dir, cfg.output_dir))
        c = compare(champ_dir, champion.version)
        decision.update(champion_score=c.champion, **{f"comparison_{k}": v for k, v in c.record().items()})
        promote, reason = c.promote, c.reason
    if promote:
        client.set_registered_model_alias(name, "champion", mv.version)
    decision["decision"], decision["reason"] = ("promoted" if promote else "kept_champion"), reason
    log.info("register: %s v%s %s: %s", name, mv.version, "is the new champion" if promote else "stays challenger", reason)
    tracker.call("registry tags", lambda run_id: [client.set_tag(run_id, f"registry.{k}", str(v)[:5000]) for k, v in decision.items()])
    metrics = {"registry/challenger_score": challenger_score}
    if decision["champion_score"] is not None:
        metrics["registry/champion_score"] = decision["champion_score"]
    for k in ("difference", "ci_low", "ci_high", "p"):
        if decision.get(f"comparison_{k}") is not None:
            metrics[f"registry/comparison_{k}"] = decision[f"comparison_{k}"]
    tracker.log_metrics(metrics, step=0)
    return decision
