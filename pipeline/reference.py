"""Stage 2, reference: reference-model log-probs for every prepared pair, computed once and cached.

Output: <cache_dir>/reference/<key>/{train,eval}/ Parquet per input file (on object stores, in the attempt each
split's _COMPLETE names; see pipeline/artifacts.py) = prepared rows + ref_chosen_logps,
ref_rejected_logps, ref_chosen_shared_logps, ref_rejected_shared_logps (LD-DPO's split: the sums over the first
min(|chosen|, |rejected|) reply tokens), pair_tokens (the pair's packed length: chosen + rejected tail after the shared prompt, what the
token budgets count). key = the file's prepared key (content, tokenizer, lengths) + reference weights + precision.
Row groups of ROW_GROUP rows: the train workers read their rows by index, one row group per row (dpo_ray/rows.py).
One pass per part: the splits it lacks are read as one Ray Dataset and scored by one actor pool (one model load per
actor, whatever the number of splits); the eval rows are scored a second time, the same way, into check_*
columns, the reference's own eval check (pipeline/evaluate.py reads it from the cache, no model loaded). Each scored
block is written by a Ray task straight into its split's directory, named by its rows, so a retried task rewrites
its own file.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dpo_ray.forward import use_bf16
from dpo_ray.model import fingerprint_model
from dpo_ray.packing import pair_tokens
from dpo_ray.parallel import scores_in_bf16_weights
from dpo_ray.scoring import LogpsScorer, scoring_precision

from . import console, placement
from .artifacts import DONE, complete_dir, completed, fingerprint, is_complete
from .lease import cache_claim
from .placement import TASK_CPUS, actor_resources, plan_pool
from .prepare import Prepared
from .storage import Location, open_location

log = logging.getLogger("dpo_ray")
VERSION = 4  # 4: one pass over the splits, the eval split's check_* columns; 2: pair_tokens column, row groups of ROW_GROUP rows, a manifest in each split's marker; 3: the LD-DPO
# shared-part sums ref_{chosen,rejected}_shared_logps (so every loss, any ld_alpha included, reads one pass)
ROW_GROUP = 64  # rows per Parquet row group: a train worker reading one row decodes its row group. Measured for 16 random
# pairs of ~400-token sequences (local disk): 64 rows 27 ms, 16 rows 50 ms (more groups, more metadata), 1024 rows 206 ms


@dataclass
class Reference:
    parts: list[Location]  # one <cache_dir>/reference/<key>/ per prepared part
    key: str
    hit: bool
    drop_ids: list[str]  # cross-file duplicates, dropped on read

    def summary(self) -> dict:
        return {"path": str(self.parts[0] if len(self.parts) == 1 else self.parts[0].parent), "key": self.key,
                "hit": self.hit, "parts": [str(p) for p in self.parts]}


def split_dir(path: Location, split: str) -> Location:
    """<path>/<split>, or the attempt its marker names (reference splits on object stores)."""
    return completed(path / split) or path / split


def split_files(parts: list[Location], split: str) -> list[tuple[object, str]]:
    """(filesystem, path) of every Parquet file of the split over all parts, in a fixed order (the train workers' input)."""
    files = []
    for p in parts:
        files += sorted((f.fs, f.path) for f in split_dir(p, split).children() if f.name.endswith(".parquet"))
    return files


def part_complete(out: Location, splits=("train", "eval")) -> bool:
    """A reference part is usable when its own marker exists and every split it has passes its marker's manifest."""
    return is_complete(out) and all(is_complete(out / s) for s in splits if (out / s).is_dir())


def has_split(path: Location, split: str) -> bool:
    return any(f.name.endswith(".parquet") for f in split_dir(path, split).children())


def _drop_rows(table: pa.Table, row_ids: pa.Array) -> pa.Table:
    return table.filter(pc.invert(pc.is_in(table["row_id"], value_set=row_ids)))


def read_split(parts: list[Location], split: str, drop_ids: list[str] = ()):
    """One Ray Dataset over the split of every part, without the cross-file duplicates; None if no part has it."""
    import ray

    paths = [split_dir(p, split).path for p in parts if has_split(p, split)]
    if not paths:
        return None
    ds = placement.read_parquet(paths, parts[0].fs)  # read tasks that fit beside the scoring pool it feeds
    if drop_ids:
        ds = ds.map_batches(_drop_rows, batch_format="pyarrow", fn_kwargs={"row_ids": pa.array(list(drop_ids), type=pa.string())},
                            num_cpus=TASK_CPUS)
    return ds


def scoring_bf16(cfg, use_gpu: bool) -> bool:
    """Whether scoring runs in bf16 autocast: exactly when training does (train.bf16 on the training device)."""
    return use_bf16(cfg.train.bf16, "cuda" if use_gpu else "cpu")


def scoring_precision_of(cfg, use_gpu: bool) -> dict:
    """The scorer's precision arguments: the policy's numerics (fsdp with bf16 computes with bf16 parameter copies, LoRA
    with bf16 keeps its frozen base in bf16: dpo_ray.parallel.scores_in_bf16_weights)."""
    bf16 = scoring_bf16(cfg, use_gpu)
    return {"bf16": bf16, "bf16_weights": scores_in_bf16_weights(cfg.train, bf16)}  # fsdp, or LoRA's bf16 base


def add_pair_tokens(table: pa.Table, dest: str | None = None, check: bool = False) -> pa.Table:
    """The pair_tokens column; with `dest`, also where the row is written (a key of write_split_files' dirs) and
    whether it gets the eval check."""
    table = table.append_column("pair_tokens", pa.array(pair_tokens(table), type=pa.int32()))
    if dest is None:
        return table
    n = table.num_rows
    return table.append_column("dest", pa.array([dest] * n, type=pa.string())).append_column("check", pa.array([check] * n))


CHECK_COLUMNS = [f"check_{side}_{kind}" for side in ("chosen", "rejected") for kind in ("logps", "shared_logps", "wpo_logweight")]


def write_split_files(table: pa.Table, dirs: dict) -> pa.Table:
    """A Ray task: writes a scored block's rows into their directories (dirs: {dest: (filesystem, path, checked)}), one
    file per dest named by a hash of its row ids (a retried task writes the same name), without the dest and check
    columns (and the check_* ones where unchecked). Returns one row per file written: dest, file, rows."""
    out = {"dest": [], "file": [], "rows": []}
    for dest, (fs, path, checked) in dirs.items():
        part = table.filter(pc.equal(table["dest"], dest))
        if not part.num_rows:
            continue
        drop = ["dest", "check"] + ([] if checked else CHECK_COLUMNS)
        part = part.drop_columns([c for c in drop if c in part.column_names])
        name = f"{fingerprint(part['row_id'].to_pylist())}.parquet"
        pq.write_table(part, f"{path.rstrip('/')}/{name}", filesystem=fs, row_group_size=ROW_GROUP)
        out["dest"].append(dest), out["file"].append(name), out["rows"].append(part.num_rows)
    return pa.table(out, schema=pa.schema([("dest", pa.string()), ("file", pa.string()), ("rows", pa.int64())]))


def score(ds, model_path: str, tokenizer_path: str, prefix: str, cfg, use_gpu: bool, wpo: bool = False):
    """Ray Data: add <prefix>chosen/rejected_logps on an actor pool (1 GPU per actor when used), in the policy's numerics.

    The pool autoscales between reference.min_actors and reference.num_actors: a cluster that gains GPUs scores faster.
    Each block of reference.batch_size pairs is scored in forwards of at most reference.max_tokens_per_batch packed
    tokens, sorted by length inside the block (LogpsScorer)."""
    import ray

    r = cfg.reference
    per_actor = actor_resources(r.cpus_per_actor, r.gpus_per_actor if use_gpu else 0, r.actor_resources)
    n = plan_pool("reference" if prefix == "ref_" else "evaluate", "scoring actor", per_actor, r.num_actors, cfg.cluster.wait_for_resources_s)
    return ds.map_batches(
        LogpsScorer,
        fn_constructor_kwargs=dict(model_path=model_path, tokenizer_path=tokenizer_path, prefix=prefix,
                                   trust_remote_code=cfg.model.trust_remote_code, token=cfg.model.hf_token,
                                   attention=cfg.train.attention, max_tokens=r.max_tokens_per_batch, wpo=wpo,
                                   **scoring_precision_of(cfg, use_gpu)),
        batch_format="pyarrow", batch_size=r.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=min(r.min_actors, n), max_size=n),  # what the cluster holds now
        num_cpus=r.cpus_per_actor, num_gpus=r.gpus_per_actor if use_gpu else 0,
        **({"resources": dict(r.actor_resources)} if r.actor_resources else {}),
    )


@console.stage("reference", lambda r: f"{len(r.parts)} file(s), cache {'hit' if r.hit else 'written'}: {r.parts[0] if len(r.parts) == 1 else r.parts[0].parent}")
def score_reference(cfg, ctx, prepared: Prepared) -> Reference:
    """Stage 2: the reference model's (ctx.reference_path) log-probs of every prepared pair, cached by content key.
    Per prepared part and split: written aside and renamed into place when whole; the part is marked complete
    last. A run killed midway leaves nothing that looks finished, and the next run reuses what is."""
    reference_path, tokenizer_path, use_gpu = ctx.reference_path, ctx.tokenizer_path, ctx.use_gpu
    model_key = fingerprint_model(reference_path)
    cache = open_location(cfg.cache_dir)
    parts, hits, todo, queued, waiting = [], [], [], set(), []
    with contextlib.ExitStack() as held:  # the leases of the splits this run scores, released once they are complete
        for part in prepared.parts:
            key = fingerprint("reference", VERSION, part.key, model_key, scoring_precision(**scoring_precision_of(cfg, use_gpu)))
            out = cache / "reference" / key
            parts.append(out)
            hits.append(part_complete(out) or str(out) in queued)  # the same content in two files: scored once
            if hits[-1]:
                log.info("reference: cache hit for %s (%s): the reference model is not run", part.file.name, out)
                continue
            (out / DONE).remove()  # a part with a damaged split is not complete until that split is recomputed
            out.mkdir()
            queued.add(str(out))
            for split in ("train", "eval"):
                if not has_split(part.path, split):
                    continue
                if is_complete(out / split):
                    log.info("reference: reusing the finished %s split of %s from an interrupted run", split, part.file.name)
                    continue
                claim = held.enter_context(cache_claim(out / split, split_what(part, split), wait=False))
                if claim.done is None:  # ours to score, or another live run is scoring it: waited for below
                    (todo if claim.lease else waiting).append((part, out, split))
        if todo:
            score_splits(cfg, todo, reference_path, tokenizer_path, use_gpu)
    scored = {str(out) for _, out, _ in todo} | wait_for_splits(cfg, waiting, reference_path, tokenizer_path, use_gpu)
    for part, out, hit in zip(prepared.parts, parts, hits):
        if hit:
            continue
        (out / "key.json").write_text(json.dumps({"prepared": part.key, "file": str(part.file), "reference_model": reference_path}) + "\n")
        (out / DONE).write_text("ok\n")
    # a hit: this run ran the reference model for none of it (what another run scored meanwhile included)
    return Reference(parts, fingerprint("reference", [p.name for p in parts]), not scored, prepared.drop_ids)


def split_what(part, split: str) -> str:
    return f"the reference {split} split of {part.file.name}"


def wait_for_splits(cfg, waiting: list[tuple], reference_path: str, tokenizer_path: str, use_gpu: bool) -> set[str]:
    """The splits other runs were scoring: waited for (pipeline/lease.py), in one order for every run, holding only
    leases earlier in it, so two runs never wait for each other; those whose run gave up or died are scored here, in
    one pass. Returns the reference dirs scored here."""
    with contextlib.ExitStack() as held:
        mine = [(part, out, split) for part, out, split in sorted(waiting, key=lambda t: str(t[1] / t[2]))
                if held.enter_context(cache_claim(out / split, split_what(part, split))).done is None]
        if mine:
            score_splits(cfg, mine, reference_path, tokenizer_path, use_gpu)
    return {str(out) for _, out, _ in mine}


def score_splits(cfg, todo: list[tuple], reference_path: str, tokenizer_path: str, use_gpu: bool) -> None:
    """Every (prepared part, its reference dir, split) of `todo`, scored in one Ray Data pass (one actor pool, one
    model load per actor) and written into <reference dir>/<split>, each complete (marker and manifest) once the
    pass has ended. Eval rows get the check_* columns. A pass that loses part of the cluster is started again, up to
    reference.max_failures times."""
    r = cfg.reference
    log.info("reference: scoring %s with %s on %d to %d actor(s), one pass", ", ".join(f"{p.file.name} ({s})" for p, _, s in todo),
             reference_path, min(r.min_actors, r.num_actors), r.num_actors)
    t0 = time.time()
    for attempt in range(r.max_failures + 1):
        try:
            files = score_pass(cfg, todo, reference_path, tokenizer_path, use_gpu)
            break
        except Exception as e:
            lost = lost_to_the_cluster(e)
            if lost is None or attempt == r.max_failures:
                raise
            log.warning("reference: the pass lost %s; its files are discarded and the pass starts again (%d of "
                        "reference.max_failures=%d)", lost, attempt + 1, r.max_failures)
    seconds = max(time.time() - t0, 1e-9)
    for i, (part, out, split) in enumerate(todo):
        pairs, tokens = split_rows(out / split)
        log.info("reference: %s %s split: %d pairs in %d file(s), %d packed tokens -> %s", part.file.name, split, pairs,
                 sum(f["dest"] == str(i) for f in files), tokens, out / split)
    pairs = sum(f["rows"] for f in files)
    log.info("reference: %d pairs scored in %.1f s: %.1f pairs/s", pairs, seconds, pairs / seconds)


def score_pass(cfg, todo: list[tuple], reference_path: str, tokenizer_path: str, use_gpu: bool) -> list[dict]:
    """One Ray Data pass over every (part, dir, split) of `todo`; the splits are complete when it returns, and
    nothing of them is left when it raises."""
    import ray

    with contextlib.ExitStack() as stack:
        dirs, datasets = {}, []
        for i, (part, out, split) in enumerate(todo):
            d = stack.enter_context(complete_dir(out / split))
            dirs[str(i)] = (d.fs, d.path, split == "eval")
            src = part.path / split
            datasets.append(placement.read_parquet(src.path, src.fs).map_batches(  # tasks that fit beside the pool
                add_pair_tokens, batch_format="pyarrow", fn_kwargs={"dest": str(i), "check": split == "eval"}, num_cpus=TASK_CPUS))
        ds = datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]
        return score(ds, reference_path, tokenizer_path, "ref_", cfg, use_gpu).map_batches(
            write_split_files, batch_format="pyarrow", batch_size=None, fn_kwargs={"dirs": dirs}, num_cpus=TASK_CPUS).take_all()


def lost_to_the_cluster(err: BaseException) -> str | None:
    """What the cluster lost (a node, an actor, a worker, a block) when that is why `err` was raised; None for any
    other error (a bad model, a full disk: a second pass would fail the same way)."""
    from ray import exceptions as rx

    kinds = (rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError, rx.WorkerCrashedError, rx.ActorUnavailableError,
             rx.LocalRayletDiedError)
    for e in causes(err):
        if isinstance(e, kinds) or (isinstance(e, rx.ActorDiedError) and "node" in str(e).lower()):
            return f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    return None


def causes(err: BaseException):
    """`err`, then what raised it (`__cause__`, else `__context__`), and so on: each once, a cycle ends the walk."""
    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def split_rows(split: Location) -> tuple[int, int]:
    """(pairs, packed tokens) of a written split, from its Parquet footers and the pair_tokens column: no rows gathered."""
    import pyarrow.parquet as pq

    pairs = tokens = 0
    for fs, path in split_files([split.parent], split.name):
        column = pq.read_table(path, filesystem=fs, columns=["pair_tokens"])["pair_tokens"]  # 4 bytes a pair
        pairs += len(column)
        tokens += int(pc.sum(column).as_py() or 0)
    return pairs, tokens
