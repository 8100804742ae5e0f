"""A train worker's pairs, read by index from the cached reference Parquet files: no table in memory, whatever its size.

- `RowIndex`: every usable row's place (file, row in the file) and packed length, ordered by row_id, so the order never
  depends on how the cache was split into files; 12 bytes a pair. Built from two small columns (row_id, pair_tokens).
  Cross-file duplicates (`drop_ids`) are left out, as the old whole-table read dropped them.
- `step_positions`: which index positions a worker trains on at a step: a seeded permutation per epoch (a function of
  (seed, epoch)), consecutive slices of batch_size_per_worker per micro-batch and rank, as before this module existed.
- `RowReader.read`: those rows as a small Arrow table, reading the row groups that hold them (the reference stage
  writes row groups of 64 rows), through the files' own filesystem (local or an object store).
- `prefetched`: a background thread reads the next steps' rows while the current one trains; memory is bounded by
  the steps read ahead, not by the dataset.
"""
from __future__ import annotations

import functools
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

COLUMNS = ["row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask", "ref_chosen_logps",
           "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps", "pair_tokens"]
OPEN_FILES = 4  # Parquet footers kept open per worker (a footer lists every row group of its file)


class CacheReadError(ValueError):
    """A cached file could not be read: named in one line (the driver checked it; it changed since)."""


def _open(fs, path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(fs.open_input_file(path))
    except (OSError, pa.ArrowException) as e:
        raise CacheReadError(f"train: cannot read the cached file {path} ({str(e).splitlines()[0][:200]}); "
                             f"run again to recompute that part of the reference cache") from None


class RowIndex:
    """file (int32), row (int32) and tokens (int32) per pair, in row_id order; plus each file's row-group starts."""

    def __init__(self, files: list, drop_ids=()):
        self.files = list(files)  # (pyarrow filesystem, path)
        ids, where, tokens, self.group_starts = [], [], [], []
        for i, (fs, path) in enumerate(self.files):
            f = _open(fs, path)
            sizes = [f.metadata.row_group(g).num_rows for g in range(f.num_row_groups)]
            self.group_starts.append(np.cumsum([0] + sizes, dtype=np.int64))
            t = f.read(columns=["row_id", "pair_tokens"])
            ids.append(t["row_id"])
            tokens.append(t["pair_tokens"].to_numpy().astype(np.int32))
            where.append(np.stack([np.full(t.num_rows, i, np.int32), np.arange(t.num_rows, dtype=np.int32)], 1))
        row_ids = pa.chunked_array([c for col in ids for c in col.chunks], type=pa.string())
        keep = pc.invert(pc.is_in(row_ids, value_set=pa.array(list(drop_ids), type=pa.string()))) if drop_ids else None
        order = pc.sort_indices(row_ids).to_numpy()
        if keep is not None:
            order = order[keep.to_numpy(zero_copy_only=False)[order]]
        where = np.concatenate(where) if where else np.zeros((0, 2), np.int32)
        self.file, self.row = where[order, 0].copy(), where[order, 1].copy()
        self.tokens = np.concatenate(tokens)[order] if tokens else np.zeros(0, np.int32)

    def __len__(self) -> int:
        return len(self.tokens)

    def nbytes(self) -> int:
        return self.file.nbytes + self.row.nbytes + self.tokens.nbytes + sum(g.nbytes for g in self.group_starts)


@functools.lru_cache(maxsize=2)
def epoch_order(n_pairs: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's permutation of the index positions: a function of (seed, epoch) only."""
    return torch.randperm(n_pairs, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).numpy()


def step_positions(n_pairs: int, seed: int, step: int, steps_per_epoch: int, rank: int, world: int, bs: int, accum: int) -> np.ndarray:
    """This rank's bs x accum index positions of a step: for each micro-batch slot, the rank's slice of bs pairs."""
    epoch, pos = divmod(step, steps_per_epoch)
    order = epoch_order(n_pairs, seed, epoch)
    firsts = [((pos * accum + micro) * world + rank) * bs for micro in range(accum)]
    return np.concatenate([order[f : f + bs] for f in firsts])


class RowReader:
    def __init__(self, index: RowIndex):
        self.index = index
        self.open: OrderedDict[int, pq.ParquetFile] = OrderedDict()

    def _file(self, i: int) -> pq.ParquetFile:
        if i not in self.open:
            self.open[i] = _open(*self.index.files[i])
            if len(self.open) > OPEN_FILES:
                self.open.popitem(last=False)
        self.open.move_to_end(i)
        return self.open[i]

    def read(self, positions) -> pa.Table:
        """The rows at these index positions, in this order: each row group holding one of them read once."""
        ix = self.index
        files, rows = ix.file[positions], ix.row[positions]
        groups = {}
        for k, (f, r) in enumerate(zip(files.tolist(), rows.tolist())):
            g = int(np.searchsorted(ix.group_starts[f], r, side="right") - 1)
            groups.setdefault((f, g), []).append((k, r - int(ix.group_starts[f][g])))
        parts, where = [], []
        for (f, g), items in sorted(groups.items()):
            try:
                table = self._file(f).read_row_group(g, columns=COLUMNS)
            except (OSError, pa.ArrowException) as e:
                raise CacheReadError(f"train: cannot read row group {g} of the cached file {ix.files[f][1]} "
                                     f"({str(e).splitlines()[0][:200]}); run again to recompute that part of the reference cache") from None
            parts.append(table.take(pa.array([r for _, r in items], type=pa.int64())))
            where += [k for k, _ in items]
        table = pa.concat_tables(parts)
        return table.take(pa.array(np.argsort(where, kind="stable"), type=pa.int64()))


def prefetched(read, steps, ahead: int):
    """read(step) for each step in order, `ahead` steps read in a background thread while the caller works."""
    steps = iter(steps)
    with ThreadPoolExecutor(1, thread_name_prefix="dpo-ray-rows") as pool:
        pending = deque(pool.submit(read, s) for _, s in zip(range(ahead + 1), steps))
        while pending:
            result = pending.popleft().result()
            nxt = next(steps, None)
            if nxt is not None:
                pending.append(pool.submit(read, nxt))
            yield result


def as_lists(table: pa.Table, idx=None) -> dict[str, list]:
    """Rows (all, or those at idx) as the dict of lists that PolicyLogps.collate takes."""
    if idx is not None:
        table = table.take(pa.array(idx, type=pa.int64()))
    return {k: table.column(k).to_pylist() for k in COLUMNS if k != "pair_tokens" and k in table.column_names}
