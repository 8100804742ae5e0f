"""`dpo-ray doctor [CONFIG]`: is this environment ready for a run? One pass/fail line per thing a run needs.

The checks are the run's own (pipeline/run.py checks before any work; dpo_ray/tracking.py for MLflow), called here
without starting Ray or loading a model; the GPU line compares the config's memory plan (dpo_ray/memory.py, from the
model's config.json on the meta device) with the local GPU's memory, or with train.gpu_memory_gb when it is set.
"""
from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from pathlib import Path

from dpo_ray import memory
from dpo_ray.errors import UserError

PASS, FAIL, SKIP = "pass", "FAIL", "skip"


def version() -> str:
    def v(name: str, *others: str) -> str:  # mlflow: or mlflow-skinny, the same package under another name
        for n in (name, *others):
            try:
                return metadata.version(n) + ("" if n == name else f" ({n})")
            except metadata.PackageNotFoundError:
                pass
        return "not installed"

    return f"dpo-ray {v('dpo-ray')} (python {platform.python_version()}, torch {v('torch')}, ray {v('ray')}, mlflow {v('mlflow', 'mlflow-skinny')})"


def _python():
    ok = sys.version_info >= (3, 10)
    return (PASS if ok else FAIL), f"{platform.python_version()} at {sys.executable}" + ("" if ok else "; dpo-ray needs Python >= 3.10")


def _torch():
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU-only build"
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        device = f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    else:
        device = f"no GPU; CPU with {os.cpu_count()} cores" + (" (GPUs unused: the CUDA build sees none)" if torch.version.cuda else "")
    return PASS, f"torch {torch.__version__}, {build}, {device}"


def _ray(address: str | None):
    from .runtime import check_ray_address

    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        return PASS, f"ray {metadata.version('ray')}; no RAY_ADDRESS: each run starts a local Ray runtime"
    check_ray_address(address)
    return PASS, f"the Ray cluster at {address} answers" + ("" if os.environ.get("RAY_AUTH_MODE") == "token" else
                                                         " (a cluster with token auth also needs RAY_AUTH_MODE=token)")


def _output_dir(cfg):
    from .context import check_output_dir

    path = Path(cfg.output_dir).resolve()
    check_output_dir(path)
    return PASS, f"output_dir {path} is writable"


def _cache_dir(cfg):
    from .context import check_cache_dir
    from .storage import redact

    check_cache_dir(cfg.cache_dir)
    return PASS, f"cache_dir {redact(cfg.cache_dir)} is writable"


def _mlflow(cfg):
    from dpo_ray.tracking import check_reachable, resolve_tracking_uri

    uri = resolve_tracking_uri(cfg.mlflow.tracking_uri)
    check_reachable(uri)
    return PASS, f"MLflow store {uri} is reachable"


def _gpu_memory(cfg):
    import torch

    gpu = cfg.train.gpu_memory_gb * memory.GB if cfg.train.gpu_memory_gb else (
        torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None)
    if gpu is None:
        return SKIP, "GPU memory: no GPU here and no train.gpu_memory_gb in the config; the run checks its plan on the cluster's GPUs"
    if cfg.model.policy.startswith("models:/"):
        return SKIP, f"GPU memory: {cfg.model.policy} is downloaded from the registry by the run; its plan is checked then"
    from dpo_ray.forward import use_bf16
    from dpo_ray.model import resolve_model

    from .storage import model_root

    t = cfg.train
    path = resolve_model(cfg.model.policy, model_root(cfg.cache_dir, cfg.output_dir))
    size = memory.model_size(path, cfg.model.trust_remote_code, cfg.model.hf_token, t.lora)
    p = memory.plan(size, t.strategy, t.min_workers, t.cpu_offload, use_bf16(t.bf16, "cuda"), t.gradient_checkpointing,
                    t.batch_size_per_worker, cfg.data.max_length)
    what = f"plan {memory.human(p['total'])} per GPU ({t.strategy}, {t.min_workers} worker(s)), the GPU has {memory.human(gpu)}"
    if not memory.fits(p, gpu):
        return FAIL, f"GPU memory: {what}: parameters and optimizer state alone do not fit; `dpo-ray run` names the options that do"
    if p["total"] > gpu:
        return FAIL, f"GPU memory: {what}: lower train.batch_size_per_worker or data.max_length, or set train.gradient_checkpointing=true"
    return PASS, f"GPU memory: {what}"


def checks(cfg, address: str | None) -> list[tuple[str, str, str]]:
    """(name, pass|FAIL|skip, detail) for each check; a check's user error is its FAIL detail."""
    out = []
    for name, fn in (("python", _python), ("torch", _torch), ("ray", lambda: _ray(address)), ("output_dir", lambda: _output_dir(cfg)),
                     ("cache_dir", lambda: _cache_dir(cfg)), ("mlflow", lambda: _mlflow(cfg)), ("gpu memory", lambda: _gpu_memory(cfg))):
        try:
            status, detail = fn()
        except (UserError, OSError, ImportError) as e:
            status, detail = FAIL, str(e).splitlines()[0] if str(e) else type(e).__name__
        out.append((name, status, detail))
    return out


def main(cfg, address: str | None) -> int:
    results = checks(cfg, address)
    for name, status, detail in results:
        print(f"{status:4}  {name:10}  {detail}")
    failed = [n for n, s, _ in results if s == FAIL]
    print(f"doctor: {len(failed)} check(s) failed: {', '.join(failed)}" if failed else "doctor: ready to run")
    return 1 if failed else 0
