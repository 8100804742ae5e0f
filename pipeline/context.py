"""The run context: what the pre-flight resolved once, that every stage needs besides the config.

`preflight` does the checks that cost nothing before any Ray or model work (data files readable, MLflow reachable,
cache_dir writable, the judge importable), resolves the models to local directories and loads the tokenizer;
`Context.on_cluster` then adds what the Ray cluster decides (GPUs or not, CPUs per train worker, the memory plan).
Every stage is `stage(cfg, ctx, upstream) -> artifact`; a sweep's trial or group gets its own copy (`for_config`).
"""
from __future__ import annotations

import dataclasses
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from dpo_ray.config import Config
from dpo_ray.model import load_tokenizer, resolve_model
from dpo_ray.tracking import check_reachable, resolve_tracking_uri

from . import generate, prepare, register
from .artifacts import resolve_data_files
from .lease import model_claim
from .runtime import SetupError, check_memory, plan_resources
from .storage import StorageError, model_root, open_location, redact


@dataclass
class Context:
    """Resolved once per run (per sweep group: `for_config`); read by every stage."""

    out_dir: Path
    uri: str | None  # the MLflow tracking URI
    cache: Path  # local model root (cache_dir, or output_dir when cache_dir is a URI)
    policy_path: str
    reference_path: str
    tokenizer_path: str
    tokenizer: object
    rejects_file: Path  # where prepare copies the rejected rows for the user
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    memory_plan: dict | None = None  # per GPU (per worker on CPUs), in GB; None when nothing trains

    @classmethod
    def for_models(cls, cfg: Config, policy_path: str, reference_path: str | None = None, tokenizer_path: str | None = None,
                   uri: str | None = None, use_gpu: bool = False, cpus_per_worker: float = 1.0, rejects_file: Path | None = None) -> "Context":
        """A context over local model directories (no pre-flight, no cluster plan): for library use, benchmarks and tests."""
        out = Path(cfg.output_dir).resolve()
        tok = tokenizer_path or policy_path
        return cls(out, uri, model_root(cfg.cache_dir, cfg.output_dir), policy_path, reference_path or policy_path, tok,
                   load_tokenizer(tok, cfg.model.trust_remote_code, cfg.model.hf_token), Path(rejects_file or out / "rejects.jsonl"),
                   use_gpu, cpus_per_worker)

    def for_config(self, cfg: Config, rejects_file: Path | None = None) -> "Context":
        """This context for another config of the same run (a sweep's group or trial): its models resolved (cached),
        its output_dir; the cluster plan kept."""
        policy, ref, tok = resolve_models(cfg, self.uri, self.cache)
        out = Path(cfg.output_dir).resolve()
        same = tok == self.tokenizer_path
        return dataclasses.replace(self, out_dir=out, policy_path=policy, reference_path=ref, tokenizer_path=tok,
                                   tokenizer=self.tokenizer if same else load_tokenizer(tok, cfg.model.trust_remote_code, cfg.model.hf_token),
                                   rejects_file=rejects_file or out / "rejects.jsonl")

    def on_cluster(self, cfg: Config, trains: bool) -> "Context":
        """GPUs or not and CPUs per train worker on the cluster as it is now; with `trains`, the memory plan checked
        (one line naming what fits when parameters and optimizer state cannot)."""
        self.use_gpu, self.cpus_per_worker = plan_resources(cfg)
        self.memory_plan = check_memory(cfg, self.policy_path, self.use_gpu) if trains else None
        return self


def check_output_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise SetupError(f"output_dir {path} is not writable ({e.strerror}); set output_dir to a writable directory") from None


def check_cache_dir(spec: str) -> None:
    """Open cache_dir and write and delete a probe object: a wrong bucket, endpoint or credentials fail here, at once."""
    try:
        cache = open_location(spec)
    except StorageError as e:
        raise SetupError(str(e)) from None
    probe = cache / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        probe.write_text("")
        probe.remove()
    except OSError as e:
        fix = ("set cache_dir to a writable directory" if cache.is_local else
               "check the bucket, the endpoint and the credentials (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        raise SetupError(f"cache_dir {redact(spec)} is not writable ({str(e).splitlines()[0][:200]}); {fix}") from None


def resolve(name: str, uri: str | None, cache: Path) -> str:
    """A model name -> a local directory: a registry model downloaded, a demo model built (a run building the same
    one is waited for), a hub id or path as transformers finds it."""
    if name.startswith("models:/"):
        return register.download(uri, name, cache)[0]
    return resolve_model(name, cache, claim=model_claim)


def resolve_models(cfg: Config, uri: str | None, cache: Path) -> tuple[str, str, str]:
    """(policy, reference, tokenizer) as local directories; the reference and the tokenizer default to the policy."""
    policy = resolve(cfg.model.policy, uri, cache)
    reference = resolve(cfg.model.reference, uri, cache) if cfg.model.reference else policy
    tokenizer = resolve(cfg.model.tokenizer, uri, cache) if cfg.model.tokenizer else policy
    return policy, reference, tokenizer


def check_judge(cfg: Config) -> None:
    """eval.judge, checked before any model work: a function importable here, a model judge a local directory."""
    j = cfg.eval.judge
    if j is None or not cfg.eval.generate.prompts:
        return
    for key in ("reward_model", "pairwise_model"):
        path = getattr(j, key)
        if path and not (Path(path).expanduser() / "config.json").is_file():
            raise SetupError(f"eval.judge.{key} {path}: not a local Hugging Face model directory (no config.json)")
    generate.check_judge(cfg)


def preflight(cfg: Config, stages: tuple[str, ...]) -> Context:
    """The checks that cost nothing, before any Ray or model work: data files readable (data.columns found), MLflow
    reachable, cache_dir writable; then the models resolved to local directories and the tokenizer loaded."""
    prepare.check_files(cfg, resolve_data_files(cfg.data.train + (cfg.data.eval or [])))
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    if "train" in stages or "evaluate" in stages or cfg.model.policy.startswith("models:/"):
        check_reachable(uri)
    check_cache_dir(cfg.cache_dir)
    cache = model_root(cfg.cache_dir, cfg.output_dir)  # models stay local: cache_dir, or output_dir when it is a URI
    policy_path, reference_path, tokenizer_path = resolve_models(cfg, uri, cache)
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.hf_token)
    if "evaluate" in stages:
        check_judge(cfg)
    out = Path(cfg.output_dir).resolve()
    return Context(out, uri, cache, policy_path, reference_path, tokenizer_path, tokenizer, out / "rejects.jsonl")
