"""The Ray runtime a run works on and what it plans there: join a cluster or start a local runtime (and stop it),
the CPUs per train worker and whether GPUs are used, the memory plan of a training config. Asked when a stage
starts, not once per run: a cluster may have lost or gained nodes since (pipeline/placement.py sizes the pools)."""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager

from dpo_ray import memory
from dpo_ray.config import Config, LoraConfig
from dpo_ray.errors import UserError
from dpo_ray.forward import use_bf16

from . import placement
from .placement import ResourceError

log = logging.getLogger("dpo_ray")
DATA_HEADROOM_CPUS = 0.5  # left free for Ray Data read tasks: with none free, a dataset waits forever


class SetupError(UserError, RuntimeError):
    """The environment the user pointed at cannot be used: an unwritable output_dir, a Ray address nobody answers."""


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("dpo_ray").setLevel(logging.INFO)


@contextmanager
def ray_runtime(address: str | None, dashboard: bool = False):
    """The Ray runtime for the block: the cluster at `address` (or $RAY_ADDRESS), else a local runtime of this run's
    own, stopped when the block ends (a runtime found already initialized is left as it was)."""
    started = start_ray(address, dashboard)
    try:
        yield started
    finally:
        if started:
            stop_ray()


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
