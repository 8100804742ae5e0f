"""The driver: prepare -> reference -> train -> evaluate, skipping what is cached; one MLflow run per call.

Checks that cost nothing come first (output dir, models, MLflow, Ray, resources), so a user mistake
is reported before any expensive work.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from dpo_ray import memory
from dpo_ray.config import Config, LoraConfig, flatten, masked, to_yaml
from dpo_ray.forward import use_bf16
from dpo_ray.checkpoint import ADAPTER
from dpo_ray.model import load_tokenizer, merge_adapter, resolve_model
from dpo_ray.tracking import check_reachable, dataset_input, ensure_experiment, resolve_tracking_uri, system_metrics

from . import evaluate, generate, placement, prepare, reference, register, train
from .placement import ResourceError
from .artifacts import atomic_dir, exclusive, resolve_data_files, write_json_atomic
from .lease import model_claim, naming_run
from .storage import StorageError, model_root, open_location, redact

log = logging.getLogger("dpo_ray")
STAGES = ("prepare", "reference", "train", "evaluate", "register")  # register runs only when registry.name is set
DATA_HEADROOM_CPUS = 0.5  # left free for Ray Data read tasks: with none free, a dataset waits forever


class SetupError(RuntimeError):
    """The environment the user pointed at cannot be used: an unwritable output_dir, a Ray address nobody answers."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("dpo_ray").setLevel(logging.INFO)


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


def start_ray(address: str | None, dashboard: bool = False):
    """Join the cluster at `address` (or $RAY_ADDRESS), else start a local runtime of this run's own; with
    `dashboard`, the local runtime serves Ray's dashboard on 127.0.0.1 (Ray's state API: Ray Train's cleaner of a
    stopped run's placement group needs it, see pipeline/sweep.py). Returns whether a runtime was started."""
    import ray

    global _api_server_set

    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)
    if ray.is_initialized():
        return False
    if address:
        try:
            ray.init(address=address)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            auth = ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                    "; a cluster with token auth (Ray's default) also needs RAY_AUTH_MODE=token and its ~/.ray/auth_token")
            raise SetupError(f"Ray cluster at {address} does not answer ({str(e).splitlines()[0][:160]}); "
                             f"check `ray status --address {address}` or unset RAY_ADDRESS to run locally{auth}") from None
    else:
        # "local": a private runtime for this run, even where `ray start` runs a cluster on this machine
        # (plain ray.init() would attach to that one, with its CPUs and its auth token).
        log.info("starting a local Ray runtime (to use a running cluster: --address or RAY_ADDRESS)")
        extra = {}
        if dashboard:
            # Ray's state API finds "the" local Ray by auto-detection, which fails ("Found multiple active Ray
            # instances") where another Ray runs on this machine, in the driver and in Ray Train's PlacementGroupCleaner
            # alike. This runtime's dashboard on a port chosen here, named in the environment that its processes inherit
            # (they are started from this one), is the one they all ask.
            port = free_port()
            extra = {"dashboard_host": "127.0.0.1", "dashboard_port": port}
            os.environ[API_SERVER_ENV] = _api_server_set = f"http://127.0.0.1:{port}"
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=dashboard, log_to_driver=True, **extra)
        placement.FIXED["local"] = True  # nothing to wait for: this runtime never gains a node
    return True


API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"
_api_server_set: str | None = None  # the value start_ray put in the environment, taken out again by stop_ray


def stop_ray() -> None:
    """ray.shutdown() of a runtime start_ray started, and the state API's address it set, unset."""
    import ray

    global _api_server_set
    ray.shutdown()
    placement.FIXED["local"] = False
    if _api_server_set is not None and os.environ.get(API_SERVER_ENV) == _api_server_set:
        del os.environ[API_SERVER_ENV]
    _api_server_set = None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """A TCP connect first: ray.init on an address nobody answers retries for minutes."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise SetupError(f"Ray cluster at {address} does not answer ({e}); start it with `ray start --head` "
                              f"or fix RAY_ADDRESS / --address (unset it to run a local Ray runtime)") from None


def plan_resources(cfg: Config) -> tuple[bool, float]:
    """(use_gpu, cpus_per_worker) for training on the cluster as it is now (asked again when the train stage starts:
    a node may have gone since the run began); waits up to cluster.wait_for_resources_s for the minimum of workers,
    then a ResourceError naming what does not fit. The other stages size their pools themselves (pipeline/placement.py)."""
    t = cfg.train
    n = t.min_workers  # elastic runs start with min and grow into what the cluster gains
    plan: dict = {}

    def ok(nodes: placement.Nodes) -> bool:
        cpus, gpus = nodes.total("CPU"), nodes.total("GPU")
        use_gpu = t.use_gpu if t.use_gpu is not None else gpus >= 1
        cpw = t.cpus_per_worker or min(1.0, (cpus - DATA_HEADROOM_CPUS) / t.max_workers)
        plan.update(use_gpu=use_gpu, cpw=cpw)
        return cpw > 0 and n * cpw + DATA_HEADROOM_CPUS <= cpus + 1e-9 and (not use_gpu or gpus >= n)

    nodes = placement.Nodes.now()
    if not ok(nodes) and (t.use_gpu and nodes.total("GPU") < n):
        raise ResourceError(f"train.use_gpu needs {n} GPU(s), the Ray cluster has {nodes.total('GPU'):g}; lower train.num_workers or set train.use_gpu=false")
    if not ok(nodes):
        placement.wait_for("train", f"{n} worker(s) of {plan['cpw']:g} CPU{' and 1 GPU' if plan['use_gpu'] else ''} plus "
                           f"{DATA_HEADROOM_CPUS} CPU for data (lower train.num_workers or train.cpus_per_worker)",
                           cfg.cluster.wait_for_resources_s, ok)
    return plan["use_gpu"], plan["cpw"]


def gpu_memory_bytes(cfg: Config, use_gpu: bool) -> float | None:
    """train.gpu_memory_gb when stated, else the memory of a GPU of the cluster (asked from a one-GPU task)."""
    if cfg.train.gpu_memory_gb:
        return cfg.train.gpu_memory_gb * memory.GB
    if not use_gpu:
        return None
    import ray

    @ray.remote(num_gpus=1, num_cpus=0)
    def total() -> int:
        import torch

        return torch.cuda.get_device_properties(0).total_memory

    return float(ray.get(total.remote()))


def check_memory(cfg: Config, policy_path: str, use_gpu: bool) -> dict:
    """Logs the memory plan per GPU (per worker on CPU) and stops, before any model is loaded, when parameters and
    optimizer state alone cannot fit the GPU; the message names the options that would."""
    t = cfg.train
    bf16 = use_bf16(t.bf16, "cuda" if use_gpu else "cpu")
    size = memory.model_size(policy_path, cfg.model.trust_remote_code, cfg.model.hf_token, t.lora)
    p = memory.plan(size, t.strategy, t.min_workers, t.cpu_offload, bf16, t.gradient_checkpointing, t.batch_size_per_worker, cfg.data.max_length)
    gpu = gpu_memory_bytes(cfg, use_gpu)
    where = "per GPU" if gpu else "per worker (host memory)"
    log.info("train: memory plan %s for %s params (%s trainable), %s x %d worker(s)%s%s: %s", where, f"{size.params:,}", f"{size.trainable:,}",
             t.strategy, t.min_workers, " + cpu offload" if t.cpu_offload else "", f", LoRA r={t.lora.r}" if t.lora else "", memory.describe(p))
    if gpu and not memory.fits(p, gpu):
        lora_size = memory.model_size(policy_path, cfg.model.trust_remote_code, cfg.model.hf_token, LoraConfig()) if t.lora is None else None
        options = memory.alternatives(size, lora_size, gpu, bf16)
        raise ResourceError(f"train: parameters and optimizer state need {(p['parameters'] + p['optimizer']) / memory.GB:.1f} GB per GPU "
                            f"({t.strategy}, {t.min_workers} worker(s)), a GPU has {gpu / memory.GB:.1f} GB; "
                            + ("options that fit: " + "; ".join(options) if options else "no strategy fits this GPU"))
    if gpu and p["total"] > gpu:
        log.warning("train: the plan's estimate (%.1f GB) is over the GPU's %.1f GB: lower train.batch_size_per_worker or data.max_length, "
                    "or set train.gradient_checkpointing=true", p["total"] / memory.GB, gpu / memory.GB)
    return {"per_gpu" if gpu else "per_worker": {k: round(v / memory.GB, 6) for k, v in p.items()}, "params": size.params, "trainable": size.trainable}


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


def replace_dir(out: Path, fill) -> Path:
    """fill(tmp) writes a directory aside; it then replaces `out` (the old one kept until the new one is in place)."""
    new = out.parent / (out.name + ".new")
    with atomic_dir(new) as tmp:
        fill(tmp)
    (new / "_COMPLETE").unlink()
    old = out.parent / (out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_model(checkpoint, tokenizer, out_dir: Path, cfg: Config, policy_path: str) -> Path:
    """The final checkpoint -> <output_dir>/model (HF files + tokenizer) and, with LoRA, <output_dir>/adapter (loads
    with PeftModel.from_pretrained on the base). The merged LoRA model is built here, in this one process: the base
    from disk plus the adapter, merged (one full copy of the weights). Returns the directory to evaluate and log."""
    lora = cfg.train.lora
    with checkpoint.as_directory() as d:
        d = Path(d)
        if lora is None:
            copy = lambda tmp: [shutil.copy2(f, tmp / f.name) for f in d.iterdir()  # noqa: E731
                                if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors" and not f.name.startswith("rng")]
            return replace_dir(out_dir / "model", lambda tmp: (copy(tmp), tokenizer.save_pretrained(tmp)))
        adapter = replace_dir(out_dir / "adapter", lambda tmp: (shutil.copytree(d / ADAPTER, tmp, dirs_exist_ok=True), tokenizer.save_pretrained(tmp)))
    if not lora.merge:
        return adapter

    def merged(tmp: Path) -> None:
        model = merge_adapter(policy_path, adapter, cfg.model.trust_remote_code, cfg.model.hf_token)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    log.info("export: merging the LoRA adapter into %s -> %s", policy_path, out_dir / "model")
    return replace_dir(out_dir / "model", merged)


COMMANDS = {  # CLI command -> stages it runs; prepare and reference are cache look-ups when already done
    "prepare": ("prepare",),
    "reference": ("prepare", "reference"),
    "train": ("prepare", "reference", "train"),
    "evaluate": ("prepare", "reference", "evaluate"),
    "run": STAGES,
    "retrain": STAGES,  # run, but a no-op when neither the data nor the starting model changed since the last one
}


def resolve(name: str, uri: str, cache: Path) -> str:
    if name.startswith("models:/"):
        return register.download(uri, name, cache)[0]
    return resolve_model(name, cache, claim=model_claim)  # a run building the same demo model: waited for


@dataclass
class Inputs:
    """What the pre-flight checks resolved: the output dir, the tracking URI, the local model directories."""

    out_dir: Path
    uri: str
    cache: Path  # local model root (cache_dir, or output_dir when cache_dir is a URI)
    policy_path: str
    reference_path: str
    tokenizer_path: str
    tokenizer: object


def preflight(cfg: Config, stages: tuple[str, ...]) -> Inputs:
    """The checks that cost nothing, before any Ray or model work: data files readable (data.columns found), MLflow
    reachable, cache_dir writable; then the models resolved to local directories and the tokenizer loaded."""
    prepare.check_files(cfg, resolve_data_files(cfg.data.train + (cfg.data.eval or [])))
    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    if "train" in stages or "evaluate" in stages or cfg.model.policy.startswith("models:/"):
        check_reachable(uri)
    check_cache_dir(cfg.cache_dir)
    cache = model_root(cfg.cache_dir, cfg.output_dir)  # models stay local: cache_dir, or output_dir when it is a URI
    policy_path = resolve(cfg.model.policy, uri, cache)
    reference_path = resolve(cfg.model.reference, uri, cache) if cfg.model.reference else policy_path
    tokenizer_path = resolve(cfg.model.tokenizer, uri, cache) if cfg.model.tokenizer else policy_path
    tokenizer = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.hf_token)
    if "evaluate" in stages:
        check_judge(cfg)
    return Inputs(Path(cfg.output_dir).resolve(), uri, cache, policy_path, reference_path, tokenizer_path, tokenizer)


def check_judge(cfg: Config) -> None:
    """eval.judge, checked before any model work: the function importable here, the reward model a local directory."""
    j = cfg.eval.judge
    if j is None or not cfg.eval.generate.prompts:
        return
    if j.reward_model and not (Path(j.reward_model).expanduser() / "config.json").is_file():
        raise SetupError(f"eval.judge.reward_model {j.reward_model}: not a local Hugging Face model directory (no config.json)")
    generate.check_judge(cfg)


def data_summary(prepared, out_dir: Path) -> dict:
    return {**{k: prepared.stats[k] for k in ("rows_read", "rows_used", "rows_rejected", "duplicates", "blank_lines",
                                               "train_rows", "eval_rows", "truncated", "rejects_by_reason", "layouts", "per_file")},
            "rejects_file": str(out_dir / "rejects.jsonl"), "key": prepared.key, "hit": prepared.hit,
            "files": [{"file": str(p.file), "prepared": str(p.path), "hit": p.hit} for p in prepared.parts]}


def open_run(cfg: Config, inp: Inputs, prepared, ref, stages: tuple[str, ...], name: str | None = None, tags: dict | None = None):
    """Creates the MLflow run of one training (a child of a sweep's run when tags carry mlflow.parentRunId) and logs what
    it starts from: dataset inputs, the config as params and config.yaml, the data stats and rejects. Returns its RunLogger."""
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from dpo_ray.tracking import RunLogger

    safe_cfg = masked(cfg.model_dump())  # what is logged and saved: secrets masked
    exp_id = ensure_experiment(inp.uri, cfg.mlflow.experiment)
    tags = {"dataset_fingerprint": prepared.key, "reference_cache_key": ref.key, "dpo_ray.stages": ",".join(stages),
            "mlflow.source.name": "dpo-ray", **({"git_commit": c} if (c := git_commit()) else {}), **(tags or {})}
    run_id = MlflowClient(inp.uri).create_run(exp_id, run_name=name or run_name(cfg, prepared.key), tags=tags).info.run_id
    tracker = RunLogger(inp.uri, run_id)
    tracker.call("dataset inputs", tracker.client.log_inputs, datasets=dataset_inputs(prepared))
    tracker.call("params", tracker.client.log_batch, params=[Param(k, str(v)[:6000]) for k, v in flatten(safe_cfg).items()])
    tracker.call("config.yaml", tracker.client.log_text, to_yaml(Config.model_validate(safe_cfg)), "config.yaml")
    tracker.call("data_stats.json", tracker.client.log_dict, prepared.stats, "data_stats.json")
    rejects = inp.out_dir / "rejects.jsonl"
    if rejects.exists():
        tracker.call("rejects.jsonl", tracker.client.log_artifact, str(rejects))
    tracker.log_metrics({f"data/{k}": prepared.stats[k] for k in ("rows_read", "rows_used", "rows_rejected", "duplicates", "truncated")}, step=0)
    return tracker


def train_and_export(cfg: Config, inp: Inputs, ref, use_gpu: bool, cpus_per_worker: float, tracker, name: str | None = None,
                     callbacks: list | None = None) -> tuple[Path, dict]:
    """Stage 3 and the export to <output_dir>/model (and adapter): (the directory to evaluate, the train summary)."""
    result = train.run(cfg, ref, inp.policy_path, inp.tokenizer.pad_token_id, use_gpu, cpus_per_worker, inp.uri, tracker.run_id,
                       name=name, callbacks=callbacks)
    model_dir = export_model(result.checkpoint, inp.tokenizer, inp.out_dir, cfg, inp.policy_path)
    m = result.metrics or {}
    return model_dir, {"steps": m.get("step"), "loss_first": m.get("loss_first"), "loss_last": m.get("loss_last"),
                       "tokens_per_second": m.get("tokens_per_second"), "checkpoint": result.checkpoint.path,
                       **({"mfu": m["mfu"]} if m.get("mfu") is not None else {}),  # on GPUs with a known datasheet peak
                       # the largest worker's peaks (MB): host RSS, and allocated GPU memory on GPUs
                       "host_memory_peak_mb": m.get("host_memory_peak_mb"), "gpu_peak_memory_mb": m.get("gpu_peak_memory_mb"),
                       # train.compile: seconds compiling (the first step) and graphs compiled again after it
                       **({"compile_seconds": m["compile_seconds"], "recompiles": m.get("recompiles")} if m.get("compile_seconds") is not None else {})}


def evaluate_and_log(cfg: Config, inp: Inputs, ref, model_dir: Path, use_gpu: bool, tracker, step: int,
                     baseline: dict | None = None) -> tuple[dict, dict]:
    """Stage 4 and its logging (metrics at `step`, the eval_pairs table): (eval/... metrics, their summary entries)."""
    if not model_dir.exists():
        raise SetupError(f"evaluate: no trained model at {model_dir}; run `dpo-ray train` first")
    ev, pairs = evaluate.run(cfg, ref, model_dir, inp.reference_path, inp.tokenizer_path, use_gpu, baseline)
    if pairs is not None:
        tracker.call("eval_pairs.json", tracker.client.log_table, data=pairs, artifact_file="eval_pairs.json")
    if ev:  # the replies of the model and the reference to held-out prompts, and the judge's win rate (eval.generate)
        gen, generations = generate.run(cfg, ref, model_dir, inp.reference_path, inp.tokenizer_path, use_gpu)
        ev = {**ev, **gen}
        if generations is not None:
            tracker.call("eval_generations.json", tracker.client.log_table, data=generations, artifact_file="eval_generations.json")
    tracker.log_metrics(ev, step=step)
    return ev, {"eval": {k[len("eval/"):]: v for k, v in ev.items() if not k.startswith("eval/reference/")},
                "eval_reference": {k[len("eval/reference/"):]: v for k, v in ev.items() if k.startswith("eval/reference/")}}


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


def register_model(cfg: Config, inp: Inputs, ref, tracker, ev: dict, use_gpu: bool, logged: bool) -> dict:
    """Stage 5: the champion/challenger gate for the run's logged model."""
    if not logged:
        return {"decision": "not_registered", "reason": "the model artifact could not be logged"}
    def score(model_dir: str) -> dict:  # the champion, on the same eval set and reference
        m = evaluate.evaluate_model(cfg, ref, model_dir, inp.tokenizer_path, use_gpu)
        if cfg.registry.metric == "win_rate":  # its replies judged against the reference's (cached) ones
            m["win_rate"] = generate.run(cfg, ref, model_dir, inp.reference_path, inp.tokenizer_path, use_gpu)[0]["eval/win_rate"]
        return m

    return register.run(cfg, tracker, inp.uri, ev, score)


def finish_run(cfg: Config, tracker, summary: dict, out_dir: Path, monitor=None) -> None:
    """summary.json and config.yaml written to out_dir and logged; the run marked FINISHED."""
    tracker.flush()
    summary["mlflow_values_lost"] = tracker.lost
    if monitor is not None:
        monitor.finish()
    write_json_atomic(out_dir / "summary.json", summary)
    (out_dir / "config.yaml").write_text(to_yaml(Config.model_validate(masked(cfg.model_dump()))))
    tracker.call("summary.json", tracker.client.log_artifact, str(out_dir / "summary.json"))
    tracker.call("run status", tracker.client.set_terminated, "FINISHED")


def fail_run(tracker) -> None:
    if tracker is not None:
        tracker.retries = 1
        tracker.call("run status", tracker.client.set_terminated, "FAILED")


def run(cfg: Config, stages: tuple[str, ...] = STAGES, address: str | None = None, retrain: bool = False) -> dict:
    """Runs `stages` in order; returns the summary (also written to <output_dir>/summary.json).

    Holds <output_dir>/.dpo-ray.lock throughout: a second run on the same output directory exits at once.
    """
    out_dir = Path(cfg.output_dir).resolve()
    check_output_dir(out_dir)
    with exclusive(out_dir), naming_run(str(out_dir)):  # how this run's cache leases name it to waiting runs
        return _run(cfg, stages, address, retrain)


def _run(cfg: Config, stages: tuple[str, ...], address: str | None, retrain: bool) -> dict:
    t_start = time.time()
    inp = preflight(cfg, stages)
    out_dir, uri = inp.out_dir, inp.uri
    started_ray = start_ray(address)
    tracker = monitor = None
    try:
        use_gpu, cpus_per_worker = plan_resources(cfg)
        plan = check_memory(cfg, inp.policy_path, use_gpu) if "train" in stages else None
        prepared = prepare.run(cfg, inp.tokenizer_path, rejects_copy=out_dir / "rejects.jsonl")
        summary = {"output_dir": str(out_dir), "tracking_uri": uri, "reference_model_dir": inp.reference_path,
                   "data": data_summary(prepared, out_dir), **({"memory_plan_gb": plan} if plan else {})}
        # retrain is a no-op when the data and config are as last time and the starting model is the one it
        # started from or the champion it produced (else a promotion would trigger endless retraining)
        retrain_key = {"data": prepared.key, "config": json.dumps(masked(cfg.model_dump()), sort_keys=True)}
        last_file = out_dir / "last_retrain.json"
        last = json.loads(last_file.read_text()) if retrain and last_file.exists() else {}
        if last.get("key") == retrain_key and inp.policy_path in last.get("policies", []):
            log.info("retrain: no new data and the same starting model as the last retrain; nothing to do")
            return {**last["summary"], "skipped": True}
        if "reference" not in stages:
            return summary
        ref = reference.run(cfg, prepared, inp.reference_path, inp.tokenizer_path, use_gpu)
        summary["reference_cache"] = ref.summary()
        if stages[-1] == "reference":
            return summary

        tracker = open_run(cfg, inp, prepared, ref, stages)
        monitor = system_metrics(uri, tracker.run_id, "driver", enabled=cfg.mlflow.system_metrics)
        summary["mlflow_run_id"] = tracker.run_id
        model_dir = out_dir / ("adapter" if cfg.train.lora and not cfg.train.lora.merge else "model")
        if "train" in stages:
            use_gpu, cpus_per_worker = plan_resources(cfg)  # the cluster as it is when training starts
            model_dir, summary["train"] = train_and_export(cfg, inp, ref, use_gpu, cpus_per_worker, tracker)
        summary["model_dir"] = str(model_dir)
        if "evaluate" in stages:
            ev, evs = evaluate_and_log(cfg, inp, ref, model_dir, use_gpu, tracker, step=summary.get("train", {}).get("steps") or 0)
            summary.update(evs)
            logged = log_model(cfg, tracker, model_dir, out_dir)
            if "register" in stages and cfg.registry.name:
                summary["registry"] = register_model(cfg, inp, ref, tracker, ev, use_gpu, logged)
        if "train" in stages:
            plot_curves(tracker, out_dir / "curves.png")
        summary["wall_seconds"] = round(time.time() - t_start, 1)
        finish_run(cfg, tracker, summary, out_dir, monitor)
        if retrain:
            policies = [inp.policy_path]
            if summary.get("registry", {}).get("decision") == "promoted":
                policies.append(str(register.registry_dir(inp.cache, cfg.registry.name, summary["registry"]["challenger_version"])))
            write_json_atomic(last_file, {"key": retrain_key, "policies": policies, "summary": summary})
        log.info("done in %.0f s: model %s | summary %s | MLflow run %s at %s", summary["wall_seconds"], model_dir, out_dir / "summary.json",
                 tracker.run_id, uri)
        return summary
    except BaseException:
        fail_run(tracker)
        raise
    finally:
        if monitor is not None:
            monitor.finish()
        if started_ray:
            stop_ray()
