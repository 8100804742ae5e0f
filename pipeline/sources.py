"""Input files -> Ray Data rows of records: {path, line_no, raw} with `raw` one JSON object's bytes.

File types: JSON Lines (`.jsonl`, `.json`), one JSON array of objects (`.json`, or a `.jsonl` that starts with
`[`), Parquet (`.parquet`, e.g. a local copy of a hub dataset), and gzip of the JSON ones (`.jsonl.gz`, `.json.gz`).
`line_no` is the line for JSON Lines and the 1-based record index for arrays and Parquet, so every reject names
its place. `sniff` looks at a file's head on the driver, before any Ray work: a file that cannot be what it
claims is one `DataError` naming the file and what was found, not thousands of rejects.
"""
from __future__ import annotations

import gzip
import itertools
import json
import logging
from pathlib import Path

from .artifacts import DataError

log = logging.getLogger("dpo_ray")
HEAD_BYTES = 1 << 16
CHUNK_BYTES = 32 << 20  # JSON Lines bytes per read task
FILE_ERROR = 0  # line_no of a row that says the whole file is unreadable (set by a read task; raised on the driver)


def _head(path: Path, n: int = HEAD_BYTES) -> bytes:
    try:
        with (gzip.open if path.name.lower().endswith(".gz") else open)(path, "rb") as f:
            return f.read(n).removeprefix(b"\xef\xbb\xbf")
    except (gzip.BadGzipFile, EOFError, OSError) as e:
        raise DataError(f"data: {path} is not a readable gzip file ({e})") from None


def sniff(path: Path) -> str:
    """'parquet', 'array' (one JSON array) or 'jsonl'. Raises DataError for a file that is none of them."""
    if path.name.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        try:
            pq.ParquetFile(path)
        except Exception as e:
            with open(path, "rb") as f:
                start = f.read(16)
            raise DataError(f"data: {path} is not Parquet: {str(e).splitlines()[0][:120]} (it starts with {start!r})") from None
        return "parquet"
    head = _head(path)
    text = head.lstrip()
    if text.startswith(b"["):
        if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
            log.info("prepare: %s starts with '[': reading it as one JSON array of objects", path.name)
        return "array"
    lines = [line for line in head.split(b"\n")[:-1 if len(head) == HEAD_BYTES else None] if line.strip()][:5]
    if lines and not any(_is_object(line) for line in lines):
        what = head.split(b"\n")[0].decode("utf-8", "replace").strip()[:80]
        hint = " (one pretty-printed JSON document? give JSON Lines, or a JSON array of objects)" if what in ("{", "") else ""
        raise DataError(f"data: {path} is not JSON Lines: line 1 is {what!r}{hint}")
    return "jsonl"


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def columns(path: Path, kind: str) -> list[str] | None:
    """The column names of a file (Parquet schema; the keys of the first JSON record), None when unknown."""
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).schema_arrow.names
    head = _head(path, 1 << 20).lstrip()
    try:
        if kind == "array":
            obj, _ = json.JSONDecoder().raw_decode(head[1:].decode("utf-8", "replace").lstrip())
        else:
            obj = next(json.loads(line) for line in head.split(b"\n") if line.strip())
    except (json.JSONDecodeError, StopIteration, UnicodeDecodeError):
        return None
    return sorted(obj) if isinstance(obj, dict) else None


def split_records(row: dict, kind: str) -> list[dict]:
    """Ray Data flat_map: one file's bytes -> one row per record. JSON Lines keep their bytes per line (a UTF-8 BOM and
    CRLF line ends dropped); array elements are written back as JSON. A file that does not parse is one FILE_ERROR row."""
    data: bytes = row["bytes"]
    path = row["path"]
    if data.startswith(b"\x1f\x8b"):  # Ray's reader un-gzips .gz files itself; in case it did not
        data = gzip.decompress(data)
    data = data.removeprefix(b"\xef\xbb\xbf")
    if kind == "array":
        try:
            items = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return [{"path": path, "line_no": FILE_ERROR, "raw": f"{Path(path).name} is not valid JSON: {e}".encode()}]
        if not isinstance(items, list):
            return [{"path": path, "line_no": FILE_ERROR, "raw": f"{Path(path).name} is a JSON {type(items).__name__}, not an array of objects".encode()}]
        return [{"path": path, "line_no": i, "raw": json.dumps(item, ensure_ascii=False).encode()} for i, item in enumerate(items, start=1)]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    return [{"path": path, "line_no": i, "raw": line.removesuffix(b"\r")} for i, line in enumerate(lines, start=1)]


def parquet_records(row: dict) -> list[dict]:
    """Ray Data flat_map: one Parquet row group -> one row per record, numbered from the group's first row."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(row["path"]).read_row_group(int(row["row_group"]))
    first = int(row["first"])
    return [{"path": row["path"], "line_no": first + i, "raw": json.dumps(rec, ensure_ascii=False, default=str).encode()}
            for i, rec in enumerate(table.to_pylist())]


def count_newlines(path: str, start: int, end: int) -> int:
    """The number of b"\\n" in bytes [start, end) of a file, read 8 MiB at a time."""
    n = 0
    with open(path, "rb") as f:
        f.seek(start)
        while start < end:
            piece = f.read(min(8 << 20, end - start))
            if not piece:
                break
            n += piece.count(b"\n")
            start += len(piece)
    return n


def chunk_lines(row: dict) -> list[dict]:
    """Ray Data flat_map: the lines of a JSON Lines file that start in bytes [start, end), numbered from
    `newlines_before` (the newlines in [0, start)), so the numbers are the file's own; the same rows as split_records."""
    path, start, end, line_no = row["path"], int(row["start"]), int(row["end"]), int(row["newlines_before"]) + 1
    out = []
    with open(path, "rb") as f:
        pos = start
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":  # a line that began in the chunk before: that chunk reads it
                pos += len(f.readline())
                line_no += 1
        while pos < end:
            line = f.readline()
            if not line:
                break
            pos += len(line)
            if start == 0 and not out:
                line = line.removeprefix(b"\xef\xbb\xbf")
            out.append({"path": path, "line_no": line_no, "raw": line.removesuffix(b"\n").removesuffix(b"\r")})
            line_no += 1
    return out


def read(path: Path, kind: str):
    """A Ray Dataset of {path, line_no, raw} for one file (kind from `sniff`).

    Parquet is read a row group per task, an uncompressed JSON Lines file CHUNK_BYTES per task (a first pass of tasks
    counts each chunk's newlines, so every line keeps its number in the file); a gzip file or one JSON array is one
    task, as neither can be split without reading it from the start."""
    import ray

    if kind == "parquet":
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path).metadata
        groups, first = [], 1
        for g in range(meta.num_row_groups):
            groups.append({"path": str(path), "row_group": g, "first": first})
            first += meta.row_group(g).num_rows
        return ray.data.from_items(groups).flat_map(parquet_records)
    if kind == "jsonl" and not path.name.lower().endswith(".gz"):
        size = path.stat().st_size
        starts = list(range(0, size, CHUNK_BYTES)) or [0]
        counter = ray.remote(num_cpus=0.25)(count_newlines)
        counts = ray.get([counter.remote(str(path), s, min(s + CHUNK_BYTES, size)) for s in starts[:-1]])
        before = [0, *itertools.accumulate(counts)]
        chunks = [{"path": str(path), "start": s, "end": min(s + CHUNK_BYTES, size), "newlines_before": b} for s, b in zip(starts, before)]
        return ray.data.from_items(chunks).flat_map(chunk_lines)
    return ray.data.read_binary_files([str(path)], include_paths=True).flat_map(split_records, fn_kwargs={"kind": kind})
