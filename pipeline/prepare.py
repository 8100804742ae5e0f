"""Stage 1, prepare: JSONL -> validated, tokenized Parquet (train/, eval/) + rejects, with Ray Data.

Output: <cache_dir>/prepared/<key>/ where key = files' contents + tokenizer + length settings.
Every input line ends in train/, eval/, rejects.jsonl, or the duplicate / blank-line counts.
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

from dpo_ray.data import Reject, decode_line, pair_hash, to_conversations, tokenize_pair, validate_pair
from dpo_ray.model import fingerprint_tokenizer, load_tokenizer

from .artifacts import DataError, atomic_dir, fingerprint, hash_file, is_complete, resolve_data_files

log = logging.getLogger("dpo_ray")
VERSION = 2  # bump when the row format or masking changes: part of the key
ROW_COLUMNS = ["row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask"]
RAW_CHARS = 500


@dataclass
class Prepared:
    path: Path
    key: str
    stats: dict
    hit: bool

    @property
    def rejects_file(self) -> Path:
        return self.path / "rejects.jsonl"


def split_lines(row: dict) -> list[dict]:
    """One file's bytes -> one row per line, numbered from 1. A UTF-8 BOM and CRLF line ends are dropped."""
    data: bytes = row["bytes"]
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    return [{"path": row["path"], "line_no": i, "raw": line.removesuffix(b"\r")} for i, line in enumerate(lines, start=1)]


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str, trust_remote_code: bool):
    return load_tokenizer(name, trust_remote_code)


def _split_of(h: str, eval_fraction: float) -> str:
    return "eval" if zlib.crc32(h.encode()) % 1_000_000 < eval_fraction * 1_000_000 else "train"


def tokenize_batch(batch: dict, *, tokenizer: str, trust_remote_code: bool, max_length: int, prompt_budget: int,
                   eval_fraction: float, eval_paths: frozenset) -> pa.Table:
    """Ray Data map_batches fn: raw lines -> one output row per line, status 'ok', 'blank' or a reject code."""
    tok = _tokenizer(tokenizer, trust_remote_code)
    cols: dict[str, list] = {k: [] for k in ["row_id", "source", "line_no", "status", "detail", "raw", "pair_hash", "split",
                                            "truncated", "prompt_not_prefix", "prompt_tokens", *ROW_COLUMNS[1:]]}
    for path, line_no, raw in zip(batch["path"], batch["line_no"], batch["raw"]):
        path, line_no, raw = str(path), int(line_no), bytes(raw)
        rec = {"status": "ok", "detail": "", "raw": "", "pair_hash": "", "split": "", "truncated": False,
               "prompt_not_prefix": False, "prompt_tokens": 0}
        try:
            if not raw.strip():
                raise Reject("blank", "blank line")
            chosen, rejected = to_conversations(decode_line(raw))
            validate_pair(chosen, rejected)
            rec.update(tokenize_pair(tok, chosen, rejected, max_length, prompt_budget))
            rec["pair_hash"] = pair_hash(chosen, rejected)
            rec["split"] = "eval" if path in eval_paths else ("train" if eval_paths else _split_of(rec["pair_hash"], eval_fraction))
        except Reject as r:
            rec.update(status=r.reason, detail=r.detail, raw=raw[: RAW_CHARS * 4].decode("utf-8", "replace")[:RAW_CHARS])
        for k in ROW_COLUMNS[1:]:
            rec.setdefault(k, [])
        rec.update(row_id=f"{Path(path).name}:{line_no}", source=path, line_no=line_no)
        for k in cols:
            cols[k].append(rec[k])
    types = {"chosen_input_ids": pa.list_(pa.int32()), "rejected_input_ids": pa.list_(pa.int32()),
             "chosen_loss_mask": pa.list_(pa.int8()), "rejected_loss_mask": pa.list_(pa.int8()),
             "line_no": pa.int64(), "prompt_tokens": pa.int32()}
    return pa.table({k: pa.array(v, type=types.get(k)) for k, v in cols.items()})


def _select_rows(table: pa.Table, row_ids: pa.Array) -> pa.Table:
    """Keep the listed rows and the contract columns, with their Arrow types (a row-wise filter would widen them)."""
    return table.filter(pc.is_in(table["row_id"], value_set=row_ids)).select(ROW_COLUMNS)


def run(cfg, tokenizer_path: str, rejects_copy: Path | None = None) -> Prepared:
    import ray

    files = resolve_data_files(cfg.data.train)
    eval_files = resolve_data_files(cfg.data.eval) if cfg.data.eval else []
    tok = load_tokenizer(tokenizer_path, cfg.model.trust_remote_code, cfg.model.hf_token)
    key = fingerprint("prepare", VERSION, [hash_file(f) for f in files], [hash_file(f) for f in eval_files],
                      fingerprint_tokenizer(tok), cfg.data.max_length, cfg.data.prompt_budget,
                      None if eval_files else cfg.data.eval_fraction)
    out = Path(cfg.cache_dir).resolve() / "prepared" / key
    if is_complete(out):
        stats = json.loads((out / "stats.json").read_text())
        log.info("prepare: reusing %s (%d train / %d eval pairs)", out, stats["train_rows"], stats["eval_rows"])
        prepared = Prepared(out, key, stats, hit=True)
    else:
        prepared = _prepare(cfg, files, eval_files, tokenizer_path, key, out)
    if rejects_copy is not None:
        rejects_copy.parent.mkdir(parents=True, exist_ok=True)
        rejects_copy.write_bytes(prepared.rejects_file.read_bytes())
    _check_bad_fraction(cfg, prepared, rejects_copy or prepared.rejects_file)
    return prepared


def _prepare(cfg, files, eval_files, tokenizer_path, key, out) -> Prepared:
    import ray

    log.info("prepare: tokenizing %d file(s) with Ray Data -> %s", len(files) + len(eval_files), out)
    lines = ray.data.read_binary_files([str(f) for f in files + eval_files], include_paths=True).flat_map(split_lines)
    processed = lines.map_batches(
        tokenize_batch, batch_format="numpy", batch_size=256,
        fn_kwargs=dict(tokenizer=tokenizer_path, trust_remote_code=cfg.model.trust_remote_code, max_length=cfg.data.max_length,
                       prompt_budget=cfg.data.prompt_budget, eval_fraction=cfg.data.eval_fraction,
                       eval_paths=frozenset(str(f) for f in eval_files)),
    ).materialize()
    meta = processed.select_columns(["row_id", "source", "line_no", "status", "detail", "raw", "pair_hash", "split",
                                     "truncated", "prompt_not_prefix", "prompt_tokens"]).to_pandas()  # raw is empty for good rows
    meta = meta.sort_values(["source", "line_no"], kind="stable")
    ok = meta[meta.status == "ok"]
    dup = ok[ok.duplicated("pair_hash", keep="first")]  # exact duplicate pairs: kept once (the first seen)
    keep_ids = set(ok.row_id) - set(dup.row_id)
    with atomic_dir(out) as tmp:
        rejects = meta[~meta.status.isin(["ok", "blank"])]
        with open(tmp / "rejects.jsonl", "w", encoding="utf-8") as f:
            for r in rejects.itertuples():
                f.write(json.dumps({"source": r.source, "line": int(r.line_no), "reason": r.status, "detail": r.detail, "raw": r.raw}, ensure_ascii=False) + "\n")
        for split in ("train", "eval"):
            ids = pa.array(sorted(meta.row_id[meta.row_id.isin(keep_ids) & (meta.split == split)]), type=pa.string())
            processed.map_batches(_select_rows, batch_format="pyarrow", fn_kwargs={"row_ids": ids}).write_parquet(str(tmp / split))
        stats = _stats(meta, ok, dup, keep_ids, files, eval_files)
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    log.info("prepare: %d rows read, %d used (%d train / %d eval), %d rejected, %d duplicates, %d truncated",
             stats["rows_read"], stats["rows_used"], stats["train_rows"], stats["eval_rows"], stats["rows_rejected"],
             stats["duplicates"], stats["truncated"])
    if stats["prompt_not_prefix"]:
        log.warning("prepare: for %d pairs the rendered prompt is not a token prefix of the rendered conversation "
                    "(the chat template re-tokenizes across the turn boundary); masks follow the reply text", stats["prompt_not_prefix"])
    return Prepared(out, key, stats, hit=False)


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
    }


def _check_bad_fraction(cfg, prepared: Prepared, rejects_file: Path) -> None:
    s = prepared.stats
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
