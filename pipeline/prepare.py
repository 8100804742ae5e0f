"""Stage 1, prepare: JSON Lines / JSON arrays / Parquet -> validated, tokenized Parquet (train/, eval/) + rejects, with Ray Data.

Output: one <cache_dir>/prepared/<key>/ per input file, key = the file's content + tokenizer + length
settings, so adding a file to a data directory tokenizes only that file. Every input line ends in
train/, eval/, rejects.jsonl, or the duplicate / blank-line counts. Nothing holds the rows in one process: they are
tokenized by Ray Data tasks and streamed to Parquet; the driver reads back a 32-byte index entry per valid row (to
find duplicates in line order) and the rejects.
"""
from __future__ import annotations

import functools
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet  # noqa: F401  (pa.parquet)

from dpo_ray.data import LAYOUTS, Reject, decode_line, pair_hash, to_pair, tokenize_pairs, validate
from dpo_ray.model import fingerprint_tokenizer, load_tokenizer

from . import console, sources
from .artifacts import DataError, complete_dir, completed, fingerprint, hash_file, resolve_data_files
from .lease import cache_claim
from .storage import Location, open_location

log = logging.getLogger("dpo_ray")
VERSION = 5  # bump when the row format or masking changes: part of the key. 5: prompt_json on eval rows
ROW_COLUMNS = ["row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask", "prompt_json"]
# prompt_json: the eval rows' prompt (the messages before the reply, or the plain-text prompt) as JSON, for the evaluate
# stage's generations and judge; "" on train rows
RAW_CHARS = 500
LINES_PER_BLOCK = 500


@dataclass
class Part:
    """One input file, prepared: <cache_dir>/prepared/<key>/ (train/, eval/, rejects.jsonl, stats.json, and meta.parquet:
    the fixed-width index of its kept rows, for finding a later file's copies of its pairs).

    `path` is the directory holding the data: the key directory, or on object stores the attempt its marker names."""

    file: Path
    path: Location
    key: str
    hit: bool
    digest: str  # the file's content hash


@dataclass
class Prepared:
    """All input files: one cached part each, so a new file is the only one tokenized."""

    parts: list[Part]
    key: str
    stats: dict
    drop_ids: list[str]  # rows that duplicate a pair of an earlier file: dropped when the parts are read

    @property
    def hit(self) -> bool:
        return all(p.hit for p in self.parts)


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, trust_remote_code: bool):
    return load_tokenizer(name, trust_remote_code)


def _split_of(h: str, eval_fraction: float) -> str:
    return "eval" if zlib.crc32(h.encode()) % 1_000_000 < eval_fraction * 1_000_000 else "train"


def tokenize_batch(batch: dict, *, tokenizer: str, trust_remote_code: bool, max_length: int, prompt_budget: int,
                   eval_fraction: float, fixed_split: str | None, columns: dict | None = None, chat_template: bool = True) -> pa.Table:
    """Ray Data map_batches fn: raw records -> one output row per record, status 'ok', 'blank', 'file_error' or a reject code."""
    tok = _tokenizer(tokenizer, trust_remote_code)
    cols: dict[str, list] = {k: [] for k in ["row_id", "source", "line_no", "status", "detail", "raw", "pair_hash", "split", "layout",
                                            "truncated", "prompt_not_prefix", "prompt_tokens", *ROW_COLUMNS[1:]]}
    recs, pairs, waiting = [], [], []  # waiting: the recs whose pair is in `pairs`, tokenized below in one call
    for path, line_no, raw in zip(batch["path"], batch["line_no"], batch["raw"]):
        path, line_no, raw = str(path), int(line_no), bytes(raw)
        rec = {"row_id": f"{Path(path).name}:{line_no}", "source": path, "line_no": line_no, "status": "ok", "detail": "",
               "raw": raw, "pair_hash": "", "split": "", "layout": "", "truncated": False, "prompt_not_prefix": False, "prompt_tokens": 0}
        try:
            if line_no == sources.FILE_ERROR:
                raise Reject("file_error", raw.decode("utf-8", "replace"))
            if not raw.strip():
                raise Reject("blank", "blank line")
            pair = to_pair(decode_line(raw), columns, chat_template)
            rec["layout"] = pair.layout
            validate(pair)
            rec["pair_hash"] = pair_hash(pair)
            rec["split"] = fixed_split or _split_of(rec["pair_hash"], eval_fraction)
            if rec["split"] == "eval":
                rec["prompt_json"] = json.dumps(pair.text[0] if pair.text is not None else pair.chosen[:-1], ensure_ascii=False)
            pairs.append(pair)
            waiting.append(rec)
        except Reject as r:
            rec.update(status=r.reason, detail=r.detail)
        recs.append(rec)
    for rec, row in zip(waiting, tokenize_pairs(tok, pairs, max_length, prompt_budget)):
        if isinstance(row, Reject):
            rec.update(status=row.reason, detail=row.detail, pair_hash="", split="")
        else:
            rec.update(row)
    for rec in recs:
        raw = rec["raw"]
        rec["raw"] = "" if rec["status"] == "ok" else raw[: RAW_CHARS * 4].decode("utf-8", "replace")[:RAW_CHARS]
        for k in ROW_COLUMNS[1:-1]:
            rec.setdefault(k, [])
        rec.setdefault("prompt_json", "")
        for k in cols:
            cols[k].append(rec[k])
    types = {"chosen_input_ids": pa.list_(pa.int32()), "rejected_input_ids": pa.list_(pa.int32()),
             "chosen_loss_mask": pa.list_(pa.int8()), "rejected_loss_mask": pa.list_(pa.int8()),
             "line_no": pa.int64(), "prompt_tokens": pa.int32()}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


def _select_rows(table: pa.Table, split: str, drop_lines: pa.Array) -> pa.Table:
    """The valid rows of a split, less later copies of a pair, with the contract columns and their Arrow types."""
    keep = pc.and_(pc.and_(pc.equal(table["status"], "ok"), pc.equal(table["split"], split)),
                   pc.invert(pc.is_in(table["line_no"], value_set=drop_lines)))
    return table.filter(keep).select(ROW_COLUMNS)


def check_files(cfg, files: list[Path]) -> dict[Path, str]:
    """Each file's kind ('jsonl', 'array', 'parquet'), and data.columns checked against its columns: before any Ray work."""
    kinds = {f: sources.sniff(f) for f in files}
    mapping = cfg.data.columns_map
    for f, kind in kinds.items() if mapping else ():
        have = sources.columns(f, kind)
        missing = [f"{key}: {col}" for key, col in mapping.items() if have is not None and col not in have]
        if missing:
            raise DataError(f"data.columns: {f.name} has no column {', '.join(missing)}; its columns are {', '.join(have)}")
    return kinds


@console.stage("prepare", lambda p: f"{p.stats['rows_used']} pairs ({p.stats['train_rows']} train / {p.stats['eval_rows']} eval), "
                             f"{p.stats['rows_rejected']} rejected, {p.stats['duplicates']} duplicates")
def prepare_pairs(cfg, ctx) -> Prepared:
    """Stage 1: every data file validated, templated (ctx.tokenizer_path), masked and written to the cache (a file
    prepared before is reused); the rejected rows copied to ctx.rejects_file."""
    tokenizer_path, rejects_copy = ctx.tokenizer_path, ctx.rejects_file
    files = resolve_data_files(cfg.data.train)
    eval_files = resolve_data_files(cfg.data.eval) if cfg.data.eval else []
    kinds = check_files(cfg, files + eval_files)
    tok_key = fingerprint_tokenizer(load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.hf_token))
    cache = open_location(cfg.cache_dir)
    parts = []
    for f in files + eval_files:
        is_eval = f in eval_files
        digest = hash_file(f)
        # the name too: rows are named file:N, so a copy under another name must not reuse this file's rows
        key = fingerprint("prepare", VERSION, digest, f.name, tok_key, cfg.data.max_length, cfg.data.prompt_budget,
                          "eval" if is_eval else ("train" if eval_files else cfg.data.eval_fraction),
                          cfg.data.columns_map, cfg.data.apply_chat_template)
        out = cache / "prepared" / key
        with cache_claim(out, f"the prepared data of {f.name}") as claim:  # another run preparing it: wait, then reuse
            data = claim.done
            if data:
                log.info("prepare: %s unchanged, reusing %s", f.name, out)
            else:
                _prepare_file(cfg, f, kinds[f], is_eval, bool(eval_files), tokenizer_path, out)
        parts.append(Part(f, data or completed(out), key, data is not None, digest))

    # across files: the first copy of a pair is kept (files in order, then lines): only the later copies come back
    drops = _cross_file_copies(parts)
    drop_ids = sorted(f"{parts[i].file.name}:{line}" for i, line in zip(drops["part"], drops["line_no"]))
    stats = _stats([json.loads((p.path / "stats.json").read_text()) for p in parts], drops, files, eval_files)
    rejects_copy.parent.mkdir(parents=True, exist_ok=True)
    with open(rejects_copy, "wb") as out:
        for p in parts:
            out.write((p.path / "rejects.jsonl").read_bytes())
    prepared = Prepared(parts, fingerprint("prepared", [p.key for p in parts]), stats, drop_ids)
    log.info("prepare: %d file(s) (%d reused), %d rows read, %d used (%d train / %d eval), %d rejected, %d duplicates, %d truncated",
             len(parts), sum(p.hit for p in parts), stats["rows_read"], stats["rows_used"], stats["train_rows"], stats["eval_rows"],
             stats["rows_rejected"], stats["duplicates"], stats["truncated"])
    if stats["prompt_not_prefix"]:
        log.warning("prepare: for %d pairs the rendered prompt is not a token prefix of the rendered conversation "
                    "(the chat template re-tokenizes across the turn boundary); masks follow the reply text", stats["prompt_not_prefix"])
    _check_bad_fraction(cfg, stats, rejects_copy)
    return prepared


def _prepare_file(cfg, file: Path, kind: str, is_eval: bool, has_eval_files: bool, tokenizer_path: str, out: Location) -> None:
    import ray

    log.info("prepare: tokenizing %s (%s) with Ray Data -> %s", file, "JSON array" if kind == "array" else
             "Parquet" if kind == "parquet" else "JSON Lines", out)
    # one file is one block: split it so that the tokenizing tasks run on every CPU
    records = sources.read(file, kind).repartition(target_num_rows_per_block=LINES_PER_BLOCK)
    processed = records.map_batches(
        tokenize_batch, batch_format="numpy", batch_size=256,
        fn_kwargs=dict(tokenizer=tokenizer_path, trust_remote_code=cfg.model.trust_remote_code, max_length=cfg.data.max_length,
                       prompt_budget=cfg.data.prompt_budget, eval_fraction=cfg.data.eval_fraction,
                       fixed_split="eval" if is_eval else "train" if has_eval_files else None,
                       columns=cfg.data.columns_map, chat_template=cfg.data.apply_chat_template),
    )
    with complete_dir(out) as tmp:
        rows = tmp / "_tokenized"  # every row, tokenized once and streamed to Parquet (nothing materialized); removed below
        processed.write_parquet(rows.path, filesystem=tmp.fs)
        index, rejects, stats = _scan(rows)  # one streamed pass over the per-row metadata (no token ids)
        (tmp / "rejects.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in sorted(rejects, key=lambda r: r["line"])))
        first = first_copies(index["hash"], index["line_no"])  # duplicates within the file: kept once, the first line
        drop_lines = pa.array(index["line_no"][~first], type=pa.int64())
        for split in ("train", "eval"):
            ray.data.read_parquet(rows.path, filesystem=tmp.fs).map_batches(_select_rows, batch_format="pyarrow", fn_kwargs={
                "split": split, "drop_lines": drop_lines}).write_parquet((tmp / split).path, filesystem=tmp.fs)
        kept = {k: v[first] for k, v in index.items()}
        stats.update(duplicates=int((~first).sum()), **_kept_stats(kept))
        # no dictionary encoding: it would build a hash table of the (unique) hashes, +50 MB at 200k rows (measured)
        pa.parquet.write_table(_index_table(kept), (tmp / "meta.parquet").path, filesystem=tmp.fs, use_dictionary=False)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        rows.remove()


# ------------------------------------------------------------------ duplicates and counts without gathering the rows
# The driver keeps a fixed-width index of each valid row (its 128-bit pair hash, line, split, layout code, flags:
# 32 bytes, 32 MB for 1M pairs), never the rows or their strings; rejects come back alone (their reason and 500 chars).
LAYOUT_CODES = {name: i for i, name in enumerate(LAYOUTS)}
SCAN_BATCH = 16384  # rows per batch of the scan
SCAN_COLUMNS = ["status", "line_no", "source", "detail", "raw", "pair_hash", "split", "layout", "truncated", "prompt_not_prefix", "prompt_tokens"]


def _hash_words(hashes: pa.Array) -> np.ndarray:
    """32-hex-digit pair hashes -> (n, 2) uint64."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes.to_pylist()), dtype=">u8").reshape(-1, 2).astype(np.uint64)


def first_copies(hash_words: np.ndarray, *order: np.ndarray) -> np.ndarray:
    """Boolean mask: the row is the first copy of its pair, first by the `order` keys (most significant first)."""
    n = len(hash_words)
    if n == 0:
        return np.ones(0, bool)
    idx = np.lexsort((*reversed(order), hash_words[:, 1], hash_words[:, 0]))  # by hash, then in order
    h = hash_words[idx]
    first = np.ones(n, bool)
    first[idx[1:]] = (h[1:] != h[:-1]).any(axis=1)
    return first


def _batches(directory: Location, columns: list[str]):
    """The record batches of a directory of Parquet files, one file and SCAN_BATCH rows at a time. (pyarrow.dataset
    reads ahead and keeps per-file state: measured on a 200k-row part in 401 files, +41 MB over this, growing with the
    number of files.)"""
    import pyarrow.parquet as pq

    for f in sorted((c for c in directory.children() if c.name.endswith(".parquet")), key=lambda c: c.path):
        with directory.fs.open_input_file(f.path) as fh, pq.ParquetFile(fh) as pf:
            yield from pf.iter_batches(batch_size=SCAN_BATCH, columns=columns, use_threads=False)


def _scan(rows: Location) -> tuple[dict, list[dict], dict]:
    """One pass over a part's tokenized rows, a batch at a time: the index of its valid rows, its rejects, its counts."""
    parts: dict[str, list] = {k: [] for k in _empty_index() if k != "part"}
    status, ok_layouts, rejects = Counter(), Counter(), []
    for batch in _batches(rows, SCAN_COLUMNS):
        t = pa.Table.from_batches([batch])
        status.update(dict(zip(*(v.to_pylist() for v in pc.value_counts(t["status"]).flatten()))))
        bad = t.filter(pc.invert(pc.is_in(t["status"], value_set=pa.array(["ok", "blank"]))))
        for r in bad.select(["source", "line_no", "status", "detail", "raw"]).to_pylist():
            if r["status"] == "file_error":
                raise DataError(f"data: {r['detail']}")
            rejects.append({"source": r["source"], "line": r["line_no"], "reason": r["status"], "detail": r["detail"], "raw": r["raw"]})
        ok = t.filter(pc.equal(t["status"], "ok"))
        layouts = ok["layout"].to_pylist()
        ok_layouts.update(layouts)
        parts["hash"].append(_hash_words(ok["pair_hash"]))
        parts["line_no"].append(ok["line_no"].to_numpy())
        parts["eval"].append(pc.equal(ok["split"], "eval").to_numpy(zero_copy_only=False))
        parts["layout"].append(np.array([LAYOUT_CODES[x] for x in layouts], dtype=np.int8))
        for k in ("truncated", "prompt_not_prefix"):
            parts[k].append(ok[k].to_numpy(zero_copy_only=False))
        parts["prompt_tokens"].append(ok["prompt_tokens"].to_numpy())
    index = {k: np.concatenate(v) if v else _empty_index()[k] for k, v in parts.items()}
    reasons = {k: v for k, v in status.items() if k not in ("ok", "blank")}
    stats = {"rows_read": sum(status.values()) - status["blank"], "blank_lines": status["blank"], "rows_rejected": sum(reasons.values()),
             "rejects_by_reason": reasons, "ok_layouts": dict(ok_layouts)}
    return index, rejects, stats


def _kept_stats(kept: dict) -> dict:
    """The sums over valid, kept rows that the run's statistics add up (and subtract for cross-file copies)."""
    return {"rows_used": int(len(kept["line_no"])), "eval_rows": int(kept["eval"].sum()), "train_rows": int((~kept["eval"]).sum()),
            "truncated": int(kept["truncated"].sum()), "prompt_not_prefix": int(kept["prompt_not_prefix"].sum()),
            "prompt_tokens_sum": int(kept["prompt_tokens"].sum()),
            "layouts": {LAYOUTS[c]: int(n) for c, n in zip(*np.unique(kept["layout"], return_counts=True))}}


def _index_table(index: dict) -> pa.Table:
    return pa.table({"hash_hi": index["hash"][:, 0], "hash_lo": index["hash"][:, 1], **{k: v for k, v in index.items() if k != "hash"}})


def _read_index(path: Location) -> dict:
    t = pa.parquet.read_table(path.path, filesystem=path.fs)
    index = {k: t[k].to_numpy(zero_copy_only=False) for k in t.column_names if not k.startswith("hash_")}
    return {"hash": np.stack([t["hash_hi"].to_numpy(), t["hash_lo"].to_numpy()], axis=1), **index}


def _cross_file_copies(parts: list[Part]) -> dict:
    """The kept rows of later files whose pair an earlier file (or an earlier line) already has: their index entries."""
    if len(parts) < 2:
        return _empty_index()
    indexes = [_read_index(p.path / "meta.parquet") for p in parts]
    index = {k: np.concatenate([ix[k] for ix in indexes]) for k in indexes[0]}
    index["part"] = np.concatenate([np.full(len(ix["line_no"]), i) for i, ix in enumerate(indexes)])
    later = ~first_copies(index["hash"], index["part"], index["line_no"])
    return {k: v[later] for k, v in index.items()}


def _empty_index() -> dict:
    return {"hash": np.zeros((0, 2), np.uint64), "line_no": np.zeros(0, np.int64), "eval": np.zeros(0, bool), "layout": np.zeros(0, np.int8),
            "truncated": np.zeros(0, bool), "prompt_not_prefix": np.zeros(0, bool), "prompt_tokens": np.zeros(0, np.int32),
            "part": np.zeros(0, np.int64)}


def _stats(part_stats: list[dict], drops: dict, files, eval_files) -> dict:
    """The run's counts: each file's own (stats.json) added up, less the rows that repeat an earlier file's pair."""
    gone = _kept_stats(drops)
    total = lambda k: sum(s[k] for s in part_stats) - gone.get(k, 0)
    reasons = sum((Counter(s["rejects_by_reason"]) for s in part_stats), Counter())
    layouts = sum((Counter(s["layouts"]) for s in part_stats), Counter())
    layouts.subtract(gone["layouts"])
    dropped = Counter(drops["part"].tolist())
    rows_used = total("rows_used")
    return {
        "files": [str(f) for f in files], "eval_files": [str(f) for f in eval_files],
        "rows_read": total("rows_read"), "blank_lines": total("blank_lines"), "rows_used": rows_used,
        "rows_rejected": total("rows_rejected"), "rejects_by_reason": dict(reasons.most_common()),
        "duplicates": sum(s["duplicates"] for s in part_stats) + gone["rows_used"],
        "train_rows": total("train_rows"), "eval_rows": total("eval_rows"), "truncated": total("truncated"),
        "prompt_not_prefix": total("prompt_not_prefix"), "prompt_tokens_mean": total("prompt_tokens_sum") / rows_used if rows_used else 0.0,
        "layouts": dict((+layouts).most_common()),
        "per_file": [{"file": str(f), "rows_read": s["rows_read"], "rows_used": s["rows_used"] - dropped[i], "rows_rejected": s["rows_rejected"],
                      "duplicates": s["duplicates"] + dropped[i], "layouts": dict(Counter(s["ok_layouts"]).most_common())}
                     for i, (f, s) in enumerate(zip(files + eval_files, part_stats))],
    }


def _check_bad_fraction(cfg, s: dict, rejects_file: Path) -> None:
    if s["rows_used"] == 0:
        raise DataError(f"prepare: 0 of {s['rows_read']} rows kept; reasons in {rejects_file}")
    bad = s["rows_rejected"] / max(s["rows_read"], 1)
    if bad > cfg.data.max_bad_fraction:
        top = ", ".join(f"{k} ({v})" for k, v in list(s["rejects_by_reason"].items())[:3])
        raise DataError(f"prepare: {s['rows_rejected']} of {s['rows_read']} rows rejected ({bad:.1%} > data.max_bad_fraction="
                        f"{cfg.data.max_bad_fraction}); top reasons: {top}; every rejected line is in {rejects_file}")
    if s["rows_rejected"]:
        log.warning("prepare: set aside %d of %d rows (%s); see %s", s["rows_rejected"], s["rows_read"],
                    ", ".join(f"{k} {v}" for k, v in s["rejects_by_reason"].items()), rejects_file)
