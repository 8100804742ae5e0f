"""Stage 1, prepare: JSON Lines / JSON arrays / Parquet -> validated, tokenized Parquet (train/, eval/) + rejects, with Ray Data.

Output: one <cache_dir>/prepared/<key>/ per input file, key = the file's content + tokenizer + length
settings, so adding a file to a data directory tokenizes only that file. Every input line ends in
train/, eval/, rejects.jsonl, or the duplicate / blank-line counts.
"""
from __future__ import annotations

import functools
import json
import logging
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet  # noqa: F401  (pa.parquet)

from dpo_ray.data import Reject, decode_line, pair_hash, to_pair, tokenize_pairs, validate
from dpo_ray.model import fingerprint_tokenizer, load_tokenizer

from . import sources
from .artifacts import DataError, complete_dir, completed, fingerprint, hash_file, resolve_data_files
from .storage import Location, open_location

log = logging.getLogger("dpo_ray")
VERSION = 3  # bump when the row format or masking changes: part of the key
ROW_COLUMNS = ["row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask"]
RAW_CHARS = 500
LINES_PER_BLOCK = 500


@dataclass
class Part:
    """One input file, prepared: <cache_dir>/prepared/<key>/ (train/, eval/, rejects.jsonl, meta.parquet).

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
        for k in ROW_COLUMNS[1:]:
            rec.setdefault(k, [])
        for k in cols:
            cols[k].append(rec[k])
    types = {"chosen_input_ids": pa.list_(pa.int32()), "rejected_input_ids": pa.list_(pa.int32()),
             "chosen_loss_mask": pa.list_(pa.int8()), "rejected_loss_mask": pa.list_(pa.int8()),
             "line_no": pa.int64(), "prompt_tokens": pa.int32()}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


def _select_rows(table: pa.Table, row_ids: pa.Array) -> pa.Table:
    """Keep the listed rows and the contract columns, with their Arrow types (a row-wise filter would widen them)."""
    return table.filter(pc.is_in(table["row_id"], value_set=row_ids)).select(ROW_COLUMNS)


META_COLUMNS = ["row_id", "source", "line_no", "status", "pair_hash", "split", "layout", "truncated", "prompt_not_prefix", "prompt_tokens"]


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


def run(cfg, tokenizer_path: str, rejects_copy: Path) -> Prepared:
    import pandas as pd
    import pyarrow.parquet as pq

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
        data = completed(out)
        if data:
            log.info("prepare: %s unchanged, reusing %s", f.name, out)
        else:
            _prepare_file(cfg, f, kinds[f], is_eval, bool(eval_files), tokenizer_path, out)
        parts.append(Part(f, data or completed(out), key, data is not None, digest))

    # across files: the first copy of a pair is kept (files in order, then lines); rejects in the same order
    metas = [p.path / "meta.parquet" for p in parts]
    meta = pd.concat([pq.read_table(m.path, filesystem=m.fs).to_pandas().assign(part=i) for i, m in enumerate(metas)], ignore_index=True)
    meta = meta.sort_values(["part", "line_no"], kind="stable")
    ok = meta[meta.status == "ok"]
    dup = ok[ok.duplicated("pair_hash", keep="first")]
    kept_in_parts = set(ok.row_id[~ok.duplicated(["part", "pair_hash"], keep="first")])
    drop_ids = sorted(set(dup.row_id) & kept_in_parts)
    stats = _stats(meta, ok, dup, set(ok.row_id) - set(dup.row_id), files, eval_files)
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
        # the per-row metadata only, no token ids (raw is empty for good rows): what duplicates, rejects and stats need
        meta = pa.parquet.read_table(rows.path, filesystem=tmp.fs, columns=META_COLUMNS + ["detail", "raw"]).to_pandas()
        if (meta.status == "file_error").any():
            raise DataError(f"data: {meta.detail[meta.status == 'file_error'].iloc[0]}")
        meta = meta.sort_values("line_no", kind="stable")
        ok = meta[meta.status == "ok"]
        keep_ids = set(ok.row_id[~ok.duplicated("pair_hash", keep="first")])  # duplicates within the file: kept once
        (tmp / "rejects.jsonl").write_text("".join(
            json.dumps({"source": r.source, "line": int(r.line_no), "reason": r.status, "detail": r.detail, "raw": r.raw}, ensure_ascii=False) + "\n"
            for r in meta[~meta.status.isin(["ok", "blank"])].itertuples()))
        for split in ("train", "eval"):
            ids = pa.array(sorted(meta.row_id[meta.row_id.isin(keep_ids) & (meta.split == split)]), type=pa.string())
            ray.data.read_parquet(rows.path, filesystem=tmp.fs).map_batches(_select_rows, batch_format="pyarrow", fn_kwargs={"row_ids": ids}
                                                                             ).write_parquet((tmp / split).path, filesystem=tmp.fs)
        pa.parquet.write_table(pa.Table.from_pandas(meta[META_COLUMNS], preserve_index=False), (tmp / "meta.parquet").path, filesystem=tmp.fs)
        rows.remove()


def _stats(meta, ok, dup, keep_ids, files, eval_files) -> dict:
    kept = ok[ok.row_id.isin(keep_ids)]
    reasons = Counter(meta.status[~meta.status.isin(["ok", "blank"])])
    return {
        "files": [str(f) for f in files], "eval_files": [str(f) for f in eval_files],
        "rows_read": int((meta.status != "blank").sum()),
        "blank_lines": int((meta.status == "blank").sum()),
        "rows_used": int(len(kept)),
        "rows_rejected": int(sum(reasons.values())),
        "rejects_by_reason": dict(reasons.most_common()),
        "duplicates": int(len(dup)),
        "train_rows": int((kept.split == "train").sum()),
        "eval_rows": int((kept.split == "eval").sum()),
        "truncated": int(kept.truncated.sum()),
        "prompt_not_prefix": int(kept.prompt_not_prefix.sum()),
        "prompt_tokens_mean": float(kept.prompt_tokens.mean()) if len(kept) else 0.0,
        "layouts": dict(Counter(kept.layout).most_common()),
        "per_file": [_file_stats(f, meta[meta.part == i], kept[kept.part == i], dup[dup.part == i])
                     for i, f in enumerate(files + eval_files)],
    }


def _file_stats(file, meta, kept, dup) -> dict:
    """One input file's counts: rows_read = rows_used + rows_rejected + duplicates; the layouts of its valid rows."""
    rejected = ~meta.status.isin(["ok", "blank"])
    return {"file": str(file), "rows_read": int((meta.status != "blank").sum()), "rows_used": int(len(kept)),
            "rows_rejected": int(rejected.sum()), "duplicates": int(len(dup)),
            "layouts": dict(Counter(meta.layout[meta.status == "ok"]).most_common())}


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
