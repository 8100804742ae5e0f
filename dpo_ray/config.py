"""The typed config tree: load YAML, apply `--set dotted.key=value`, validate, dump to a dict.

Unknown keys and bad values are `ConfigError`s that name the key and the file; the CLI prints
them as one line and exits 2.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A user mistake in a config file or a --set override."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    policy: str = "demo:tiny-llama"  # local HF directory, hub id, demo:tiny-llama (built offline), or models:/NAME@ALIAS
    reference: str | None = None  # defaults to the policy
    tokenizer: str | None = None  # defaults to the policy
    trust_remote_code: bool = False  # runs code shipped with the model: only for models you trust
    hf_token: str | None = None  # for private hub models; prefer the HF_TOKEN environment variable. Masked in logs


class ColumnsConfig(_Strict):
    """The user's column names for the standard keys: data.columns: {prompt: question, chosen: response_j, rejected: response_k}."""

    prompt: str | None = None
    chosen: str
    rejected: str
    system: str | None = None  # a system prompt column: a system message before the prompt


class DataConfig(_Strict):
    train: list[str] = Field(default_factory=lambda: ["demo:pairs"])  # .jsonl/.json/.parquet(/.gz) files, dirs or globs
    columns: ColumnsConfig | None = None  # map other column names onto prompt/chosen/rejected(/system)
    apply_chat_template: bool = True  # false: prompt/chosen/rejected strings are tokenized as they are (base models)
    eval: list[str] | None = None  # a held-out file; else eval_fraction of train
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    max_length: int = Field(512, ge=8)  # tokens per sequence (prompt + reply + EOS)
    max_prompt_length: int | None = None  # prompt is cut from the left to this; default max_length // 2.
    # Set it to max_length to keep as much prompt as fits: pairs whose prompt leaves no room for a reply are rejected.
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0)  # more rejected rows than this stops the run

    @model_validator(mode="before")
    @classmethod
    def _one_path_is_a_list(cls, v: Any) -> Any:
        for key in ("train", "eval"):
            if isinstance(v, dict) and isinstance(v.get(key), str):
                v[key] = [v[key]]
        return v

    @model_validator(mode="after")
    def _prompt_fits(self) -> "DataConfig":
        if self.max_prompt_length is not None and self.max_prompt_length > self.max_length:
            raise ValueError(f"data.max_prompt_length ({self.max_prompt_length}) must be at most data.max_length ({self.max_length})")
        return self

    @property
    def columns_map(self) -> dict[str, str] | None:
        return {k: v for k, v in self.columns.model_dump().items() if v} if self.columns else None

    @property
    def prompt_budget(self) -> int:
        return self.max_prompt_length if self.max_prompt_length is not None else self.max_length // 2


class ReferenceConfig(_Strict):
    batch_size: int = Field(16, ge=1)  # pairs per block handed to an actor (and per forward without a token budget)
    max_tokens_per_batch: int | None = Field(None, ge=1)  # packed tokens per forward: a block is sorted by length and
    # split into forwards of at most this many tokens (a longer pair alone); None: one forward per block
    num_actors: int = Field(1, ge=1)  # the most actors: one model copy each; one GPU each when GPUs exist
    min_actors: int = Field(1, ge=1)  # the pool autoscales between min_actors and num_actors as the cluster allows
    cpus_per_actor: float = Field(0.5, gt=0)  # < 1 leaves CPU for Ray Data's read tasks on small machines
    gpus_per_actor: int = Field(1, ge=1)  # >1: a reference model too big for one GPU is split over the actor's GPUs
    # (transformers device_map="auto"); the log says how it was placed


LossType = Literal["sigmoid", "hinge", "ipo", "robust", "simpo"]


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the policy; off unless train.lora is set (`--set train.lora.r=8` is enough).
    The cached reference log-probs are the base model's: the adapters start at zero, so no switching is needed."""

    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)  # the update is scaled by alpha / r
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: str | list[str] = "all-linear"  # peft's names: all-linear (every Linear but the LM head) or module names
    merge: bool = True  # also export the merged model (<output_dir>/model); false keeps only <output_dir>/adapter


class TrainConfig(_Strict):
    num_workers: int = Field(1, ge=1)
    use_gpu: bool | None = None  # None: use GPUs when the cluster has them
    cpus_per_worker: float | None = None  # None: fits the workers in the CPUs Ray has, leaving room for data
    torch_threads: int | None = None  # None: the machine's cores divided among local workers
    loss_type: LossType = "sigmoid"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)  # cDPO / robust DPO epsilon
    simpo_gamma: float = 0.5  # SimPO target margin (gamma / beta), only for loss_type=simpo
    nll_weight: float = Field(0.0, ge=0.0)  # adds weight * NLL(chosen) per token (RPO), 0 = off
    lr: float = Field(5e-6, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, le=1)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # cosine decays to lr * min_lr_ratio
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # cap on optimizer steps (after epochs are counted)
    batch_size_per_worker: int = Field(8, ge=1)  # pairs per micro-batch per worker; x workers x grad_accum_steps = pairs per step
    grad_accum_steps: int = Field(1, ge=1)
    max_tokens_per_micro_batch: int | None = Field(None, ge=1)  # packed tokens (prompt once per pair) per micro-batch: a
    # worker's pairs of a step (batch_size_per_worker x grad_accum_steps) are split into micro-batches filled up to this
    # budget (a longer pair alone); the loss is averaged over the step's pairs. None: micro-batches of batch_size_per_worker
    prefetch_steps: int = Field(2, ge=0)  # steps of rows each worker reads ahead (a background thread); its memory bound
    max_grad_norm: float = Field(1.0, ge=0)  # 0 disables clipping
    bf16: bool | Literal["auto"] = "auto"  # bf16 autocast, fp32 master weights; auto: on CUDA and on CPUs with native bf16
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward: less memory, the forward runs twice
    strategy: Literal["ddp", "fsdp"] = "ddp"  # ddp: a full copy of the model per worker; fsdp: FSDP2, parameters,
    # gradients and optimizer state sharded over the workers (each decoder layer, then the root)
    cpu_offload: bool = False  # fsdp only: parameters and optimizer state live in host memory (slower, fits bigger models)
    lora: LoraConfig | None = None  # LoRA adapters instead of a full fine-tune; see LoraConfig
    gpu_memory_gb: float | None = Field(None, gt=0)  # the memory plan checks against this; None: the GPU's own (asked
    # from the cluster), no check on CPU-only runs
    attention: Literal["sdpa", "flex", "varlen"] = "sdpa"  # packed-pair attention, also for reference and eval scoring: sdpa (a dense
    # mask per block of pairs), flex (FlexAttention, one block mask per batch; compiled on CUDA, eager and slow on CPU) or varlen (flash varlen_attn on CUDA, the prompt's K/V copied per reply; per-sequence SDPA on CPU)
    checkpoint_every: int = Field(100, ge=1)  # optimizer steps between Ray Train checkpoints
    log_every: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=0)  # worker-group restarts from the last checkpoint
    max_nonfinite_steps: int = Field(3, ge=1)  # consecutive skipped (NaN/inf) steps before stopping
    storage_path: str | None = None  # Ray Train storage; default <output_dir>/ray_train
    resume_from: str | None = None  # a checkpoint directory to start from (e.g. <storage>/dpo-.../checkpoint_...), possibly
    # written with another number of workers; a rerun of the same config resumes its own last checkpoint without it

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> "TrainConfig":
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("train.cpu_offload needs train.strategy=fsdp (offloading is FSDP2's CPUOffloadPolicy)")
        return self


class MLflowConfig(_Strict):
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the cwd
    experiment: str = "dpo-ray"
    run_name: str | None = None  # None: model, data fingerprint and main hyperparameters
    system_metrics: bool = True  # MLflow's CPU/memory/GPU sampling, from the driver and the rank-0 train worker


class RegistryConfig(_Strict):
    name: str | None = None  # MLflow registered model; None: no registration
    metric: Literal["rewards/accuracies", "rewards/margins"] = "rewards/accuracies"  # eval metric that decides
    min_improvement: float = 0.0  # the challenger takes the champion alias only if better by at least this


class Config(_Strict):
    name: str = "dpo"
    output_dir: str = "runs/dpo"
    cache_dir: str = "cache"  # prepared data and reference log-probs, keyed by fingerprint: a path or a pyarrow.fs URI (s3://...)
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)

    @model_validator(mode="after")
    def _output_dir_is_a_path(self) -> "Config":
        if "://" in self.output_dir:
            raise ValueError("output_dir must be a local or shared-mount path (it holds the run lock, the logs and the exported "
                             "model); object-store URIs such as s3:// are accepted by cache_dir and train.storage_path")
        return self


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, prefix + name + ".")
    return keys


def _explain(err: ValidationError, source: str) -> str:
    lines = []
    known = _known_keys(Config)
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"] if not isinstance(p, int)) or "(top level)"
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(key, known, n=1)
            lines.append(f"{source}: unknown key {key}" + (f" (did you mean {hint[0]}?)" if hint else ""))
        else:
            lines.append(f"{source}: {key}: {e['msg']} (got {e.get('input')!r})")
    return "; ".join(lines)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value, e.g. --set train.lr=1e-4")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({e.problem})") from e
    return key.split("."), value


def load_config(path: str | Path | None, overrides: list[str] = ()) -> Config:
    """Read a YAML experiment, apply `dotted.key=value` overrides, validate."""
    source = str(path) if path else "(defaults)"
    raw: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {source} not found")
        try:
            raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: the top level must be a mapping of keys, got {type(raw).__name__}")
    for item in overrides:
        parts, value = _parse_override(item)
        node = raw
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        where = source + (" with --set " + " ".join(overrides) if overrides else "")
        raise ConfigError(_explain(e, where)) from None


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1}} -> {"train.lr": 1}: the MLflow params of a run."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


SECRET_WORDS = ("token", "password", "secret", "key")


URI_USERINFO = re.compile(r"^([a-z][a-z0-9+.\-]*://)[^/@\s]+@", re.I)  # s3://KEY:SECRET@bucket/...


def masked(d: dict) -> dict:
    """A copy with values of secret-looking keys (hf_token, api_key; not `tokenizer`) replaced, and credentials in
    URIs (scheme://user:password@...) hidden, for logging."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out[k] = masked(v)
        elif any(part in SECRET_WORDS for part in re.split(r"[_\-.]", k.lower())) and v not in (None, ""):
            out[k] = "***"
        elif isinstance(v, str) and URI_USERINFO.match(v):
            out[k] = URI_USERINFO.sub(r"\1***@", v)
        else:
            out[k] = v
    return out


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(), sort_keys=False)
