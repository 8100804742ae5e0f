"""The typed config tree: load YAML, apply `--set dotted.key=value`, validate, dump to a dict.

Unknown keys and bad values are `ConfigError`s that name the key and the file; the CLI prints
them as one line and exits 2.
"""
from __future__ import annotations

import math

import difflib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import UserError
from .loss_names import F_DIVERGENCES, LOSS_TYPES


class ConfigError(UserError, ValueError):
    """A user mistake in a config file or a --set override."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    policy: str = Field("demo:tiny-llama", description=(
        "the model to train: a local Hugging Face directory, a hub id, models:/NAME@ALIAS or models:/NAME/VERSION from the "
        "MLflow registry, or demo:tiny-llama (random weights, built offline) / demo:tiny-llama-sft (its SFT'd copy)"))
    reference: str | None = Field(None, description="the reference model, in the same forms as policy; None: the policy's starting weights")
    tokenizer: str | None = Field(None, description="the tokenizer, in the same forms as policy; None: the policy's")
    trust_remote_code: bool = Field(False, description="run code shipped with a model: only for models you trust")
    hf_token: str | None = Field(None, description="for private hub models; prefer the HF_TOKEN environment variable; masked in logs")


class ColumnsConfig(_Strict):
    """The user's column names for the standard keys: data.columns: {prompt: question, chosen: response_j, rejected: response_k}."""

    prompt: str | None = Field(None, description=(
        "the column holding the prompt (a string or messages); None: chosen and rejected hold the whole conversations or texts, "
        "whose common start is the prompt"))
    chosen: str = Field(description="the column holding the preferred reply")
    rejected: str = Field(description="the column holding the other reply")
    system: str | None = Field(None, description="a system prompt column: a system message before the prompt")


class DataConfig(_Strict):
    train: list[str] = Field(default_factory=lambda: ["demo:pairs"], description=(
        "the training data: .jsonl, .json, .parquet (and .jsonl.gz / .json.gz) files, directories of them, or globs; "
        "one path may be given as a string; demo:pairs is the bundled demo data"))
    columns: ColumnsConfig | None = Field(None, description=(
        "other column names mapped onto prompt / chosen / rejected (/ system), e.g. {prompt: question, chosen: response_j, "
        "rejected: response_k}; None: the layouts are detected row by row"))
    apply_chat_template: bool = Field(True, description=(
        "false: prompt, chosen and rejected strings are tokenized as they are (base models, text that already holds its turns)"))
    eval: list[str] | None = Field(None, description="held-out files, in the same forms as train; None: eval_fraction of train")
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description=(
        "without data.eval: this fraction of the train pairs is held out, picked by content hash (stable as data grows)"))
    max_length: int = Field(512, ge=8, description="tokens per sequence (prompt + reply + EOS); longer pairs are cut")
    max_prompt_length: int | None = Field(None, description=(
        "the prompt is cut from the left to this many tokens, then the reply from the right; None: max_length // 2. "
        "max_length keeps as much prompt as fits: pairs whose prompt leaves no room for a reply are rejected"))
    max_bad_fraction: float = Field(0.01, ge=0.0, le=1.0, description=(
        "more rejected rows than this fraction stops the run after prepare, before any model work"))

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
    batch_size: int = Field(16, ge=1, description="pairs per block handed to a scoring actor (and per forward without a token budget)")
    max_tokens_per_batch: int | None = Field(None, ge=1, description=(
        "packed tokens per scoring forward: a block is sorted by length and split into forwards of at most this many "
        "tokens (a longer pair alone); None: one forward per block"))
    num_actors: int = Field(1, ge=1, description="the most scoring actors: one model copy each; one GPU each when there are GPUs")
    min_actors: int = Field(1, ge=1, description=(
        "the actor pool autoscales between min_actors and num_actors (ActorPoolStrategy) as the cluster allows"))
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs per actor; below 1 leaves CPU for Ray Data's read tasks on small machines")
    gpus_per_actor: int = Field(1, ge=1, description=(
        "more than 1: a reference model too big for one GPU is split over the actor's GPUs (transformers "
        "device_map=\"auto\"); the log says how it was placed"))
    actor_resources: dict[str, float] = Field(default_factory=dict, description=(
        "more Ray resources each scoring actor needs besides its CPUs and GPUs (a custom resource of the nodes it may use)"))
    max_failures: int = Field(2, ge=0, description=(
        "passes started again when the cluster loses a node, an actor or a block mid-pass (what was written is "
        "discarded; the cache ends as an uninterrupted pass would write it)"))


LossType = Literal[LOSS_TYPES]  # the names of dpo_ray/loss_names.py's table, in its order (torch-free)
FDivergenceType = Literal[F_DIVERGENCES]


class LoraConfig(_Strict):
    """LoRA adapters (peft) on the policy; off unless train.lora is set (`--set train.lora.r=8` is enough).
    The cached reference log-probs are the base model's: the adapters start at zero, so no switching is needed."""

    r: int = Field(16, ge=1, description="the adapters' rank")
    alpha: float = Field(32, gt=0, description="the adapters' update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapters' input")
    target_modules: str | list[str] = Field("all-linear", description=(
        "peft's names: all-linear (every Linear layer but the LM head) or a list of module names"))
    merge: bool = Field(True, description=(
        "also export the merged model (<output_dir>/model, plain transformers); false keeps only <output_dir>/adapter"))


class TrainConfig(_Strict):
    num_workers: int | tuple[int, int] = Field(1, description=(
        "Ray Train workers (one GPU each on GPUs); [min, max]: elastic, the run starts once min workers can be placed, "
        "uses up to max, shrinks to the workers left when a node is lost (from the last checkpoint) and grows back when "
        "nodes return; the pairs of an optimizer step stay train.pairs_per_step whatever the number"))
    pairs_per_step: int | None = Field(None, ge=1, description=(
        "pairs of an optimizer step; None: batch_size_per_worker x num_workers (its max) x grad_accum_steps. With fewer "
        "workers, gradient accumulation takes up the rest, so the updates do not depend on the cluster's size"))
    use_gpu: bool | None = Field(None, description="None: use GPUs when the cluster has them")
    worker_resources: dict[str, float] = Field(default_factory=dict, description=(
        "more Ray resources each train worker needs besides its CPUs and GPU, e.g. a custom resource that only the "
        "training nodes have ({trainer: 1} with `ray start --resources='{\"trainer\": 1}'`)"))
    resize_interval_s: float = Field(60.0, gt=0, description=(
        "elastic runs: how often a healthy run asks whether more workers could be placed (it then grows, from the "
        "last checkpoint)"))
    cpus_per_worker: float | None = Field(None, description=(
        "CPUs per train worker; None: at most 1, fitted into the CPUs Ray has, leaving 0.5 CPU for data"))
    torch_threads: int | None = Field(None, description="torch threads per worker; None: the machine's cores divided among local workers")
    loss_type: LossType | list[LossType] = Field("sigmoid", description=(
        "the preference loss, or a list of losses summed with loss_weights (MPO); every TRL 1.16 DPOTrainer loss_type "
        "plus simpo and orpo (reference-free) and cDPO (sigmoid with label_smoothing > 0); see docs/losses.md"))
    loss_weights: list[float] | None = Field(None, description="one weight per loss in loss_type; None: 1.0 each")
    beta: float = Field(0.1, gt=0, description="the KL strength beta (for ipo its tau, for orpo its lambda)")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description=(
        "epsilon of cDPO (sigmoid), robust, exo_pair (needs > 0), aot, aot_unpaired and simpo"))
    simpo_gamma: float = Field(0.5, description="SimPO target margin (gamma / beta), only for loss_type simpo")
    discopop_tau: float = Field(0.05, gt=0, description="DiscoPOP temperature, only for loss_type discopop")
    f_divergence_type: FDivergenceType = Field("reverse_kl", description=(
        "f-DPO divergence between policy and reference: reverse_kl is DPO; the others only with sigmoid, sigmoid_norm, hinge, "
        "ipo, exo_pair, robust, discopop, sft"))
    f_alpha_divergence_coef: float = Field(0.5, description="alpha of f_divergence_type alpha_divergence")
    use_weighting: bool = Field(False, description=(
        "WPO: each pair's loss times the chosen and rejected replies' length-normalised probability weights (no gradient)"))
    ld_alpha: float | None = Field(None, ge=0.0, le=1.0, description=(
        "LD-DPO: log-probs counted in full up to the shorter reply's length, the longer reply's tail times ld_alpha "
        "(policy and reference alike; the cached reference keeps the split sums); None: off"))
    nll_weight: float = Field(0.0, ge=0.0, description=(
        "RPO shorthand: adds an sft term (the chosen replies' NLL per token) with this weight; 0 = off"))
    lr: float = Field(5e-6, gt=0, description="AdamW's peak learning rate (the fused kernel on CPU and CUDA)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW's weight decay")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="the fraction of the steps with a linear warmup, then a cosine decay")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    epochs: int = Field(1, ge=1, description="passes over the training pairs")
    max_steps: int | None = Field(None, ge=1, description="a cap on optimizer steps (after the epochs are counted); None: no cap")
    batch_size_per_worker: int = Field(8, ge=1, description=(
        "pairs per micro-batch per worker; x num_workers x grad_accum_steps = the pairs of an optimizer step"))
    grad_accum_steps: int = Field(1, ge=1, description="micro-batches accumulated per optimizer step")
    max_tokens_per_micro_batch: int | None = Field(None, ge=1, description=(
        "packed tokens (prompt once per pair) per micro-batch: a worker's pairs of a step (batch_size_per_worker x "
        "grad_accum_steps) are regrouped, longest first, into micro-batches filled up to this budget (a longer pair alone); "
        "the loss is averaged over the step's pairs, so the update does not depend on the grouping. None: micro-batches "
        "of batch_size_per_worker pairs"))
    prefetch_steps: int = Field(2, ge=0, description=(
        "steps of rows each worker reads ahead of training, in a background thread (its memory bound)"))
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping norm; 0 disables clipping")
    bf16: bool | Literal["auto"] = Field("auto", description=(
        "bf16 autocast with fp32 master weights; auto: on CUDA and on CPUs with native bf16 (AVX2-only CPUs emulate it, "
        "slower than fp32); the reference and eval scorers compute the same way, so step 1 reads loss ln 2"))
    gradient_checkpointing: bool = Field(False, description=(
        "recompute each decoder layer's activations in backward: far less activation memory, the layers' forward runs twice"))
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description=(
        "ddp: a full copy of the model per worker; fsdp: FSDP2, parameters, gradients and optimizer state sharded over the "
        "workers (each decoder layer, then the root); see docs/big-models.md"))
    cpu_offload: bool = Field(False, description=(
        "fsdp only: parameters and optimizer state live in host memory (slower, fits bigger models)"))
    lora: LoraConfig | None = Field(None, description=(
        "LoRA adapters (peft) instead of a full fine-tune; setting any of its keys turns it on (--set train.lora.r=8)"))
    gpu_memory_gb: float | None = Field(None, gt=0, description=(
        "the GPU memory the memory plan is checked against; None: the GPU's own (asked from the cluster), no check on "
        "CPU-only runs; stated, it is checked on CPU runs too"))
    attention: Literal["sdpa", "flex", "varlen"] = Field("sdpa", description=(
        "packed-pair attention, also for reference and eval scoring: sdpa (one SDPA call per block of pairs, a dense mask), "
        "flex (FlexAttention, one block mask per batch; compiled on CUDA, eager and slow on CPU) or varlen (flash "
        "varlen_attn on CUDA, one call per layer, the prompt's keys/values copied for the rejected reply; per-sequence "
        "SDPA on CPU)"))
    compile: bool = Field(False, description=(
        "torch.compile each decoder layer (regional, as torchtitan does; the packed attention stays eager between the "
        "compiled parts), sequence length dynamic: compiled in the first step, not again; the compile time and any "
        "recompiles go to MLflow (train/compile_seconds, train/recompiles). No C/C++ compiler or an error compiling: "
        "one warning, the step runs eagerly"))
    checkpoint_every: int = Field(100, ge=1, description="optimizer steps between Ray Train checkpoints")
    log_every: int = Field(10, ge=1, description="optimizer steps between progress lines (loss, rewards, tokens/s, ETA)")
    max_failures: int = Field(0, ge=0, description="worker-group restarts from the last checkpoint when a worker dies")
    preemption_lead_s: float = Field(5.0, ge=0, description=(
        "after a node's drain notice (a preemption) the workers checkpoint at the next step and Ray Train restarts them "
        "this many seconds before the drain's deadline, so the restart comes before the node's end: a node that ends "
        "first (a SIGTERM'd node is not marked preempted by Ray) would count against max_failures"))
    placement_timeout_s: float | None = Field(600, gt=0, description=(
        "how long training waits for its workers to be placed (at the start, and after a lost node) before it stops "
        "with a message naming the missing resources; None: wait for ever"))
    max_nonfinite_steps: int = Field(3, ge=1, description="consecutive skipped (NaN/inf) steps before the run stops")
    storage_path: str | None = Field(None, description=(
        "Ray Train storage (checkpoints): a path or a pyarrow.fs URI (s3://...); None: <output_dir>/ray_train"))
    resume_from: str | None = Field(None, description=(
        "a checkpoint directory to start from (e.g. <storage>/dpo-.../checkpoint_...), possibly written with another "
        "number of workers; a rerun of the same config resumes its own last checkpoint without it"))
    optimizer_from: str | None = Field(None, description=(
        "a checkpoint directory whose optimizer state (only: AdamW's moments and step counts) this training starts with; the "
        "weights come from model.policy and the schedule starts at step 0 (iterate.keep_optimizer sets it to the previous "
        "round's last checkpoint); the same strategy and LoRA setting as the checkpoint's"))

    @model_validator(mode="after")
    def _loss_is_consistent(self) -> "TrainConfig":
        from .losses import LossSpec

        if isinstance(self.loss_type, list) and not self.loss_type:
            raise ValueError("train.loss_type: an empty list; name at least one loss")
        try:
            LossSpec.from_config(self)
        except ValueError as e:
            raise ValueError(f"train: {e}") from None
        return self

    @property
    def loss(self):
        """The loss as dpo_ray.losses.LossSpec."""
        from .losses import LossSpec

        return LossSpec.from_config(self)

    @property
    def min_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[0]

    @property
    def max_workers(self) -> int:
        return self.num_workers if isinstance(self.num_workers, int) else self.num_workers[1]

    @property
    def elastic(self) -> bool:
        return self.min_workers != self.max_workers

    @property
    def step_pairs(self) -> int:
        """The pairs of an optimizer step, the same at every number of workers."""
        return self.pairs_per_step or self.batch_size_per_worker * self.max_workers * self.grad_accum_steps

    def accum_for(self, world: int) -> int:
        """Micro-batches of batch_size_per_worker pairs per worker and step with `world` workers."""
        return self.step_pairs // (self.batch_size_per_worker * world)

    @model_validator(mode="after")
    def _workers_fit_the_step(self) -> "TrainConfig":
        lo, hi = self.min_workers, self.max_workers
        if lo < 1 or hi < lo:
            raise ValueError(f"train.num_workers: {list(self.num_workers) if self.elastic else self.num_workers} is not a "
                             "number >= 1 or [min, max] with 1 <= min <= max")
        bad = [w for w in range(lo, hi + 1) if self.step_pairs % (self.batch_size_per_worker * w)]
        if bad:
            raise ValueError(f"train.pairs_per_step: {self.step_pairs} pairs are not a whole number of micro-batches of "
                             f"batch_size_per_worker={self.batch_size_per_worker} on {bad[0]} worker(s); with num_workers "
                             f"{lo}..{hi} use a multiple of {math.lcm(*range(lo, hi + 1)) * self.batch_size_per_worker}")
        return self

    @model_validator(mode="after")
    def _offload_needs_fsdp(self) -> "TrainConfig":
        if self.cpu_offload and self.strategy != "fsdp":
            raise ValueError("train.cpu_offload needs train.strategy=fsdp (offloading is FSDP2's CPUOffloadPolicy)")
        return self


class GenerateConfig(_Strict):
    """Replies written by the trained policy and by the reference for held-out prompts (evaluate stage), side by side in
    MLflow's eval_generations.json; the reference's are cached like its log-probs."""

    prompts: int = Field(64, ge=0, description=(
        "held-out prompts to write replies for (the eval split's first, by row id); 0: off. The win rate's 95% interval is "
        "about +-0.12 wide at 64 prompts, +-0.06 at 256, +-0.03 at 1000 (1.96 * 0.5 / sqrt(n) near 0.5)"))
    max_new_tokens: int = Field(256, ge=1, description="the most tokens a reply may have (it stops earlier at EOS or the end of the turn)")
    do_sample: bool = Field(False, description="false: greedy; true: sampled with temperature, top_p and seed")
    temperature: float = Field(1.0, gt=0, description="sampling only: the softmax temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="sampling only: nucleus sampling's probability mass")
    seed: int = Field(0, description="sampling only: the same seed gives the same table")
    batch_size: int = Field(16, ge=1, description="prompts per batched generate call (left padded, with the KV cache)")


PAIRWISE_PROMPT = (
    "Which response answers the question better: more helpful, correct and clear?\n\n"
    "Question:\n{prompt}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
    "Answer with a single letter, A or B.")


class JudgeConfig(_Strict):
    """Judges the replies; eval/win_rate is the share of prompts where the policy's reply is judged better (ties 0.5),
    with a 95% interval and a sign test. Exactly one of reward_model and function (pointwise: a score per reply) and
    pairwise_model and pairwise_function (pairwise: which of two replies is better, asked in both orders)."""

    reward_model: str | None = Field(None, description=(
        "a local Hugging Face sequence-classification reward model (its own tokenizer and chat template) scoring (prompt, reply)"))
    function: str | None = Field(None, description=(
        "module:callable, (prompt: str, reply: str) -> float, imported in the workers: it runs code the config names, "
        "like trust_remote_code; prompt is the last user message"))
    pairwise_model: str | None = Field(None, description=(
        "a local Hugging Face chat model asked through its chat template and pairwise_prompt which of two replies is better; "
        "the verdict is P(label A) / (P(A) + P(B)) at the next token, no sampling, asked in both orders and averaged"))
    pairwise_function: str | None = Field(None, description=(
        "module:callable, (prompt: str, a: str, b: str) -> float in [0, 1], the probability that a is the better reply; "
        "called in both orders and averaged; it runs code the config names"))
    pairwise_prompt: str = Field(PAIRWISE_PROMPT, description=(
        "pairwise_model's user message, with {prompt}, {a} and {b}; it must ask for one of pairwise_labels"))
    pairwise_labels: tuple[str, str] = Field(("A", "B"), description=(
        "the two answers pairwise_model's next token is read for (each must be one token of its tokenizer, or start one)"))
    max_length: int = Field(4096, ge=16, description="reward_model / pairwise_model: the most tokens a judged text may have (cut from the left)")
    batch_size: int = Field(16, ge=1, description="replies (pairs of replies) per judge call")

    @property
    def pairwise(self) -> bool:
        return self.pairwise_model is not None or self.pairwise_function is not None

    @property
    def kind(self) -> str:
        """'function my_rules:score', 'reward model PATH', 'pairwise model PATH' or 'pairwise function m:f'."""
        for key in ("function", "reward_model", "pairwise_model", "pairwise_function"):
            if getattr(self, key) is not None:
                return f"{key.replace('_', ' ')} {getattr(self, key)}"
        return "no judge"

    @model_validator(mode="after")
    def _one_judge(self) -> "JudgeConfig":
        keys = ("reward_model", "function", "pairwise_model", "pairwise_function")
        if sum(getattr(self, k) is not None for k in keys) != 1:
            raise ValueError("eval.judge: set exactly one of reward_model (a local HF reward model), function (module:callable), "
                             "pairwise_model (a local HF chat model) and pairwise_function (module:callable)")
        for key in ("function", "pairwise_function"):
            spec = getattr(self, key)
            if spec is not None and (":" not in spec or not all(spec.split(":", 1))):
                raise ValueError(f"eval.judge.{key}: expected module:callable, e.g. my_rewards:score (got {spec!r})")
        missing = [f for f in ("{prompt}", "{a}", "{b}") if f not in self.pairwise_prompt]
        if self.pairwise_model is not None and missing:
            raise ValueError(f"eval.judge.pairwise_prompt: it must contain {', '.join(missing)} (the prompt and the two replies)")
        if len(set(self.pairwise_labels)) != 2 or not all(label.strip() for label in self.pairwise_labels):
            raise ValueError(f"eval.judge.pairwise_labels: two different non-blank labels (got {list(self.pairwise_labels)})")
        return self


class EvalConfig(_Strict):
    generate: GenerateConfig = Field(default_factory=GenerateConfig, description="the generations table (eval_generations.json)")
    judge: JudgeConfig | None = Field(None, description="a reward model or a function that scores the replies: eval/win_rate")


class MLflowConfig(_Strict):
    tracking_uri: str | None = Field(None, description=(
        "any MLflow tracking URI, e.g. http://127.0.0.1:5000; None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the "
        "working directory"))
    experiment: str = Field("dpo-ray", description="the MLflow experiment the runs go to")
    run_name: str | None = Field(None, description="None: the model, the data fingerprint, the loss, beta, lr and epochs")
    system_metrics: bool = Field(True, description=(
        "MLflow's CPU, memory and GPU sampling, from the driver and the rank-0 train worker"))


class RegistryConfig(_Strict):
    name: str | None = Field(None, description=(
        "the MLflow registered model each run's model becomes a version of (alias challenger); None: no registration"))
    metric: Literal["rewards/accuracies", "rewards/margins", "win_rate"] = Field("rewards/accuracies", description=(
        "the eval metric that decides between challenger and champion; win_rate needs eval.judge"))
    min_improvement: float = Field(0.0, description="the challenger takes the champion alias only if better by at least this")
    min_confidence: float = Field(0.95, ge=0, lt=1, description=(
        "the challenger is promoted only when the lower end of this two-sided interval clears the bar: win_rate, the challenger "
        "judged against the champion prompt by prompt, above 0.5 (+ min_improvement); accuracies and margins, the paired "
        "bootstrap of their difference over the held-out pairs, above min_improvement; 0: the point estimates alone"))


class SweepConfig(_Strict):
    """`dpo-ray sweep`: a Ray Tune search over config keys; prepare and reference run once per distinct data/reference
    setting, the trials share them. --grid / --sample on the command line add to grid / sample."""

    grid: dict[str, list] = Field(default_factory=dict, description="dotted key -> values, every combination is a trial "
                                  "(times samples), e.g. {train.beta: [0.05, 0.1]}")
    sample: dict[str, str] = Field(default_factory=dict, description="dotted key -> a distribution drawn once per trial: "
                                   "uniform(a,b), loguniform(a,b), randint(a,b) or choice([a,b,...])")
    samples: int = Field(1, ge=1, description="trials drawn from `sample` (Tune's num_samples; with a grid, each grid point this often)")
    metric: str = Field("eval/rewards/accuracies", description="the eval metric that picks the best trial, e.g. eval/rewards/margins")
    mode: Literal["max", "min"] = Field("max", description="whether the best trial has the largest or smallest metric")
    scheduler: Literal["none", "asha"] = Field("none", description="asha: Tune's ASHA stops weak trials early, judged on "
                                               "scheduler_metric every eval_every steps")
    scheduler_metric: str = Field("train/rewards/accuracies", description="what ASHA compares (the mean over the steps since "
                                  "the last report): train/rewards/accuracies or train/loss")
    scheduler_mode: Literal["max", "min"] = Field("max", description="max for accuracies, min for train/loss")
    eval_every: int = Field(10, ge=1, description="with a scheduler: optimizer steps between reports to it (each is a checkpoint)")
    reduction_factor: int = Field(2, ge=2, description="ASHA: keep the best 1/reduction_factor of the trials at each rung")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; None: as many as the cluster's CPUs/GPUs hold")
    keep_models: bool = Field(False, description="keep every trial's exported model and checkpoints; false: only the best's")


class IterateConfig(_Strict):
    """`dpo-ray iterate`: rounds of iterative (online) DPO. Each round the current policy samples replies to prompts,
    eval.judge scores them, pairs are built from the scores and the policy trains on them (prepare, the cached
    reference, Ray Train), then held-out prompts measure it against the initial model and the previous round."""

    prompts: list[str] = Field(default_factory=list, description=(
        "prompt files (.jsonl, .json, .parquet): a `prompt` column of messages or text, or rows in any layout prepare reads "
        "(their prompts alone); empty: the prompts of data.train. Duplicates are counted once; a share of data.eval_fraction "
        "is held out by content hash for the evaluation after each round"))
    rounds: int = Field(3, ge=1, description="rounds of sample -> judge -> pair -> train -> evaluate")
    samples_per_prompt: int = Field(4, ge=2, description="replies the policy samples per prompt each round")
    max_prompts: int | None = Field(None, ge=1, description=(
        "training prompts a round samples for; round r takes the next ones of a fixed shuffle (seed), wrapping around, so "
        "rounds see different prompts; None: all of them every round"))
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the round's replies")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling's probability mass")
    max_new_tokens: int = Field(128, ge=1, description="the most tokens a sampled reply may have (it stops earlier at EOS)")
    seed: int = Field(0, description="round r samples with seed * 1000 + r (and shuffles the prompts with it): the same seed, the same samples")
    pairing: Literal["best_worst", "all"] = Field("best_worst", description=(
        "best_worst: one pair per prompt, the judge's best reply against its worst; all: every ordered pair of replies whose "
        "scores differ by more than min_margin"))
    min_margin: float = Field(0.0, ge=0, description="a pair's scores must differ by more than this (prompts whose replies all tie are always dropped)")
    offline_fraction: float = Field(0.0, ge=0, lt=1, description=(
        "this share of a round's pairs are drawn from data.train's offline pairs (a new draw each round), the rest are the round's own"))
    reference: Literal["initial", "previous"] = Field("initial", description=(
        "the DPO reference of each round: initial (the starting model; its log-probs are cached by content) or previous "
        "(the round's starting policy)"))
    keep_optimizer: bool = Field(False, description=(
        "round r > 1 starts with the optimizer state of round r-1's last checkpoint (train.optimizer_from): AdamW's moments "
        "carry over; false: a fresh optimizer each round"))
    stop_below: float | None = Field(None, ge=0, le=1, description=(
        "stop after a round whose win rate against the previous round is below this; None: run every round"))
    select: Literal["last", "best"] = Field("last", description=(
        "the output model: the last round's, or the round with the highest win rate against the initial model"))
    min_pairs: int = Field(1, ge=1, description="a round with fewer pairs stops the run with a message (nothing trains on too little)")
    eval_prompts: int = Field(64, ge=0, description=(
        "held-out prompts answered and judged after each round (the first by content hash); 0: no evaluation, no win rates"))


class ClusterConfig(_Strict):
    wait_for_resources_s: float = Field(300, gt=0, description=(
        "how long a stage waits for the cluster to hold what it needs (its first actor, its workers' minimum) before it "
        "stops with one line naming what is missing: time for an autoscaler to add a node, or a lost one to return"))


class Config(_Strict):
    name: str = Field("dpo", description="the experiment's name, saved with the config and in the MLflow params")
    output_dir: str = Field("runs/dpo", description=(
        "a local or shared-mount path: the run lock, summary.json, rejects.jsonl, logs/, the exported model/"))
    cache_dir: str = Field("cache", description=(
        "prepared data and reference log-probs, keyed by fingerprint: a path or a pyarrow.fs URI (s3://..., gs://..., "
        "file://...); see docs/cluster.md"))
    seed: int = Field(0, description="seeds the data order (a function of seed and epoch) and the workers' torch RNG")
    model: ModelConfig = Field(default_factory=ModelConfig, description="the policy, reference and tokenizer")
    data: DataConfig = Field(default_factory=DataConfig, description="the preference pairs and how they are tokenized")
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig, description="the reference log-probs' scoring pool")
    train: TrainConfig = Field(default_factory=TrainConfig, description="the loss, the optimizer, the workers")
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig, description="where runs are tracked")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="the generations and the judge of the evaluate stage")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="the MLflow Model Registry gate")
    sweep: SweepConfig = Field(default_factory=SweepConfig, description="`dpo-ray sweep` only: the search space and its settings")
    iterate: IterateConfig = Field(default_factory=IterateConfig, description="`dpo-ray iterate` only: the rounds of iterative (online) DPO")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="how the stages fit the Ray cluster they find")

    @model_validator(mode="after")
    def _win_rate_needs_a_judge(self) -> "Config":
        if self.registry.metric == "win_rate" and (self.eval.judge is None or self.eval.generate.prompts == 0):
            raise ValueError("registry.metric=win_rate needs eval.judge (a reward model or a function) and eval.generate.prompts > 0")
        return self

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
    seen = set()
    for e in err.errors():
        # a union's members appear in the location as e.g. "literal['sigmoid',...]" / "list[...]": one message per key
        key = ".".join(str(p) for p in e["loc"] if not isinstance(p, int) and "[" not in str(p)) or "(top level)"
        if key in seen:
            continue
        seen.add(key)
        if e["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(key, known, n=1)
            lines.append(f"{source}: unknown key {key}" + (f" (did you mean {hint[0]}?)" if hint else ""))
        elif e["type"] == "value_error":  # a validator's own sentence: it names the keys; the section's dict would be noise
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{source}: {msg}" if key == "(top level)" or msg.startswith(key.split(".")[0]) else f"{source}: {key}: {msg}")
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
        set_key(raw, parts, value, f"--set {item!r}")
    return validated(raw, source + (" with --set " + " ".join(overrides) if overrides else ""))


def set_key(raw: dict, parts: list[str], value: Any, where: str) -> None:
    """raw[a][b][c] = value for parts [a, b, c], making the sections on the way."""
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def validated(raw: dict, where: str) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_explain(e, where)) from None


def with_overrides(cfg: Config | dict, overrides: dict[str, Any], where: str = "sweep") -> Config:
    """A config (or its model_dump) with {dotted.key: value} overrides, validated: a sweep's group or trial."""
    raw = json.loads(json.dumps(cfg.model_dump() if isinstance(cfg, Config) else cfg))
    for key, value in overrides.items():
        set_key(raw, key.split("."), value, f"{where}: {key}")
    return validated(raw, where)


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
