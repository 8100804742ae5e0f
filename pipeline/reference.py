"""Stage 2, reference: reference-model log-probs for every prepared pair, computed once and cached.

Output: <cache_dir>/reference/<key>/{train,eval}/ Parquet = prepared rows + ref_chosen_logps,
ref_rejected_logps. key = prepared data key + reference weights + tokenizer + precision.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from dpo_ray.model import fingerprint_model
from dpo_ray.scoring import LogpsScorer, scoring_dtype

from .artifacts import DONE, atomic_dir, fingerprint, is_complete
from .prepare import Prepared

log = logging.getLogger("dpo_ray")
VERSION = 1


@dataclass
class Reference:
    path: Path
    key: str
    hit: bool


def has_split(path: Path, split: str) -> bool:
    return (path / split).is_dir() and any((path / split).glob("*.parquet"))


def score(path: Path, model_path: str, tokenizer_path: str, prefix: str, cfg, use_gpu: bool):
    """Ray Data: read Parquet rows, add <prefix>chosen/rejected_logps on an actor pool (1 GPU per actor when used)."""
    import ray

    r = cfg.reference
    return ray.data.read_parquet(str(path)).map_batches(
        LogpsScorer,
        fn_constructor_kwargs=dict(model_path=model_path, tokenizer_path=tokenizer_path, prefix=prefix,
                                   trust_remote_code=cfg.model.trust_remote_code, token=cfg.model.hf_token),
        batch_format="pyarrow", batch_size=r.batch_size,
        compute=ray.data.ActorPoolStrategy(size=r.num_actors),
        num_cpus=r.cpus_per_actor, num_gpus=1 if use_gpu else 0,
    )


def cache_key(prepared: Prepared, reference_path: str, use_gpu: bool) -> str:
    return fingerprint("reference", VERSION, prepared.key, fingerprint_model(reference_path), str(scoring_dtype(use_gpu)))


def run(cfg, prepared: Prepared, reference_path: str, tokenizer_path: str, use_gpu: bool) -> Reference:
    """Each split is written aside and renamed into place when whole; the key directory is marked complete
    last. A run killed midway leaves no split that looks finished, and the next run reuses the ones that are."""
    key = cache_key(prepared, reference_path, use_gpu)
    out = Path(cfg.cache_dir).resolve() / "reference" / key
    if is_complete(out):
        log.info("reference: cache hit %s (key %s): the reference model is not run", out, key)
        return Reference(out, key, hit=True)
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "eval"):
        if not has_split(prepared.path, split):
            continue
        if is_complete(out / split):
            log.info("reference: reusing the finished %s split from an interrupted run", split)
            continue
        log.info("reference: scoring the %s split with %s on %d actor(s) -> %s", split, reference_path, cfg.reference.num_actors, out / split)
        with atomic_dir(out / split) as tmp:
            score(prepared.path / split, reference_path, tokenizer_path, "ref_", cfg, use_gpu).write_parquet(str(tmp))
    (out / "key.json").write_text(json.dumps({"prepared": prepared.key, "reference_model": reference_path}) + "\n")
    (out / DONE).write_text("ok\n")
    return Reference(out, key, hit=False)
