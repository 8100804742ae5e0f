"""Preference sets of any size: rows read by index from the cached Parquet, token-budget micro-batches, cache markers
that vouch for their files, and a worker's peak memory against the data size (a real Ray Train run in a subprocess)."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dpo_ray.packing import pair_tokens, shared_prefix, token_budget_groups
from dpo_ray.rows import CacheReadError, RowIndex, RowReader, as_lists, step_positions
from dpo_ray.train_loop import micro_batches, micro_loss
from pipeline.artifacts import DONE, complete_dir, completed
from pipeline.storage import local

ROOT = Path(__file__).resolve().parent.parent


def random_pairs(n: int, seed: int, vocab: int = 500, start: int = 0) -> pa.Table:
    """n pairs of skewed lengths (2 to 120 reply tokens) with a shared prompt, reference log-probs and pair_tokens."""
    rng = np.random.default_rng(seed)
    rows = {k: [] for k in ("row_id", "chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")}
    for i in range(n):
        prompt = rng.integers(3, vocab, rng.integers(3, 40)).tolist()
        c = rng.integers(3, vocab, int(rng.choice([2, 5, 20, 120]))).tolist()
        r = rng.integers(3, vocab, int(rng.choice([2, 5, 20, 120]))).tolist()
        r[0] = c[0] + 1 if c[0] + 1 < vocab else 3  # the replies differ from their first token
        rows["row_id"].append(f"f.jsonl:{start + i + 1}")
        rows["chosen_input_ids"].append(prompt + c)
        rows["rejected_input_ids"].append(prompt + r)
        rows["chosen_loss_mask"].append([0] * len(prompt) + [1] * len(c))
        rows["rejected_loss_mask"].append([0] * len(prompt) + [1] * len(r))
    t = pa.table({**rows, "ref_chosen_logps": pa.array(-rng.uniform(5, 300, n), pa.float32()),
                  "ref_rejected_logps": pa.array(-rng.uniform(5, 300, n), pa.float32())})
    return t.append_column("pair_tokens", pa.array(pair_tokens(t), pa.int32()))


def test_pair_tokens_is_the_packed_length():
    t = random_pairs(30, 0)
    for row, n in zip(t.to_pylist(), t["pair_tokens"].to_pylist()):
        c, r = np.array(row["chosen_input_ids"]), np.array(row["rejected_input_ids"])
        assert n == len(c) + len(r) - shared_prefix(c, r) and shared_prefix(c, r) == row["chosen_loss_mask"].index(1)
    assert pair_tokens(t.slice(7, 5)) == t["pair_tokens"].to_pylist()[7:12]  # a sliced column: offsets respected


@pytest.mark.parametrize("budget", [1, 50, 200, 1000])
def test_token_budget_groups(budget):
    tokens = np.random.default_rng(budget).integers(1, 400, 200).tolist()
    groups = token_budget_groups(tokens, budget)
    assert sorted(i for g in groups for i in g) == list(range(200))  # every pair once
    for g in groups:  # none over the budget unless one pair alone is
        assert sum(tokens[i] for i in g) <= budget or len(g) == 1
    assert groups == token_budget_groups(tokens, budget)  # deterministic
    if budget == 1000:  # filled: all groups but the last are within the size of the smallest pair of the budget
        assert len(groups) <= -(-sum(tokens) // budget) + 1


def test_step_gradient_does_not_depend_on_the_grouping(demo_model):
    """One worker's step of 8 pairs: micro-batches of 2 pairs (the fixed split), by a token budget, and all 8 at once
    give the same gradient, and the same loss as an independent float64 computation from the forward's log-probs."""
    from types import SimpleNamespace

    from dpo_ray.forward import PolicyLogps
    from dpo_ray.losses import LossSpec
    from dpo_ray.model import load_model

    torch.manual_seed(0)
    table = random_pairs(8, 1, vocab=400)
    tokens = table["pair_tokens"].to_pylist()
    policy = PolicyLogps(load_model(demo_model))
    t = SimpleNamespace(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5, nll_weight=0.2)
    nll_tokens = sum(sum(m[1:]) for m in table["chosen_loss_mask"].to_pylist())

    def step_grad(groups):
        policy.zero_grad()
        total = 0.0
        for idx in groups:
            loss, *_ = micro_loss(policy, policy.collate(as_lists(table, idx), 0), LossSpec.from_config(t), table.num_rows,
                                  nll_tokens / table.num_rows)
            loss.backward()
            total += loss.item()
        return total, torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).clone()

    fixed = micro_batches(tokens, 2, None)
    budget = micro_batches(tokens, 2, 300)
    assert fixed == [[0, 1], [2, 3], [4, 5], [6, 7]] and sorted(len(g) for g in budget) != [2, 2, 2, 2]
    assert all(sum(tokens[i] for i in g) <= 300 or len(g) == 1 for g in budget)
    loss_fixed, g_fixed = step_grad(fixed)
    loss_budget, g_budget = step_grad(budget)
    loss_whole, g_whole = step_grad([list(range(8))])
    torch.testing.assert_close(g_budget, g_fixed, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g_whole, g_fixed, rtol=1e-4, atol=1e-6)
    # the loss, in float64 from each sequence's log-probs: mean DPO sigmoid loss + nll_weight x NLL per chosen token
    with torch.no_grad():
        logps, _ = policy(policy.collate(as_lists(table), 0))
    lp = logps.double()
    pc, pr = lp[:8], lp[8:]
    rc, rr = (torch.tensor(table[k].to_pylist(), dtype=torch.float64) for k in ("ref_chosen_logps", "ref_rejected_logps"))
    want = -torch.nn.functional.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean() + 0.2 * (-pc.sum() / nll_tokens)
    for got in (loss_fixed, loss_budget, loss_whole):
        assert got == pytest.approx(want.item(), rel=1e-5)


def test_reference_scorer_by_token_budget_gives_each_row_its_own_logps(demo_model):
    """A block scored in forwards of at most 150 packed tokens, sorted by length, equals the block scored in one
    forward, row by row (fp32: only batch-shape rounding differs)."""
    from dpo_ray.scoring import LogpsScorer

    table = random_pairs(12, 4, vocab=400).drop_columns(["ref_chosen_logps", "ref_rejected_logps"])
    whole = LogpsScorer(demo_model, demo_model, "ref_")(table)
    budget = LogpsScorer(demo_model, demo_model, "ref_", max_tokens=150)
    assert len(token_budget_groups(table["pair_tokens"].to_pylist(), 150)) > 3
    split = budget(table)
    assert split["row_id"].equals(table["row_id"])
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        assert split[k].to_numpy() == pytest.approx(whole[k].to_numpy(), rel=1e-5, abs=1e-4)


def test_reference_scorer_checks_the_flagged_rows_in_other_forwards(demo_model):
    """Rows flagged `check` (the eval split's) are scored a second time, in the same forwards, into check_* columns
    (logps, shared sums, WPO weights): equal to the ref_* ones; NaN on the other rows."""
    from dpo_ray.scoring import LogpsScorer

    table = random_pairs(12, 4, vocab=400).drop_columns(["ref_chosen_logps", "ref_rejected_logps"])
    flags = [i % 3 != 0 for i in range(12)]
    scored = LogpsScorer(demo_model, demo_model, "ref_", max_tokens=150)(table.append_column("check", pa.array(flags)))
    for side in ("chosen", "rejected"):
        for kind in ("logps", "shared_logps"):
            got, want = scored[f"check_{side}_{kind}"].to_numpy(), scored[f"ref_{side}_{kind}"].to_numpy()
            assert np.isnan(got[~np.array(flags)]).all()
            assert got[flags] == pytest.approx(want[flags], rel=1e-5, abs=1e-4)
        weights = scored[f"check_{side}_wpo_logweight"].to_numpy()
        assert np.isfinite(weights[flags]).all() and np.isnan(weights[~np.array(flags)]).all()


def test_elastic_steps_hold_the_same_pairs_at_any_number_of_workers():
    """train.num_workers [min, max]: accumulation takes up what fewer workers cannot hold, so a step's pairs (over all
    ranks and micro-batches) are the same set at every world size; a pairs_per_step that does not split is refused."""
    from pydantic import ValidationError

    from dpo_ray.config import TrainConfig

    t = TrainConfig(num_workers=[1, 2], batch_size_per_worker=2, grad_accum_steps=1)
    assert (t.min_workers, t.max_workers, t.step_pairs, t.accum_for(1), t.accum_for(2)) == (1, 2, 4, 2, 1)
    n, spe, seed = 41, 41 // 4, 3
    for step in (0, 5, spe + 2):
        sets = {w: sorted(np.concatenate([step_positions(n, seed, step, spe, r, w, 2, t.accum_for(w)) for r in range(w)]).tolist())
                for w in (1, 2)}
        assert sets[1] == sets[2] and len(sets[1]) == 4
    with pytest.raises(ValidationError, match="use a multiple of 12"):
        TrainConfig(num_workers=[2, 3], batch_size_per_worker=2)
    with pytest.raises(ValidationError, match=r"1 <= min <= max"):
        TrainConfig(num_workers=[3, 2])
    assert TrainConfig(num_workers=3, batch_size_per_worker=2).step_pairs == 6  # a plain number as before


def test_step_positions_cover_each_epoch_once_per_rank_and_step():
    n, bs, accum, world, seed = 103, 3, 2, 4, 7
    spe = n // (bs * accum * world)
    for epoch in range(2):
        seen = np.concatenate([step_positions(n, seed, epoch * spe + s, spe, r, world, bs, accum) for s in range(spe) for r in range(world)])
        assert len(seen) == len(set(seen.tolist())) == spe * bs * accum * world  # no pair twice in an epoch
    # the order before this module: a torch permutation of (seed, epoch), the slices of ((pos*accum+micro)*world+rank)*bs
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + 1)).tolist()
    pos, rank = 2, 3
    want = [order[((pos * accum + m) * world + rank) * bs + j] for m in range(accum) for j in range(bs)]
    assert step_positions(n, seed, spe + pos, spe, rank, world, bs, accum).tolist() == want


def write_files(d: Path, tables: list[pa.Table], row_group: int = 4) -> list:
    d.mkdir(parents=True, exist_ok=True)
    for i, t in enumerate(tables):
        pq.write_table(t, d / f"p{i}.parquet", row_group_size=row_group)
    return [(local(d).fs, str(d / f"p{i}.parquet")) for i in range(len(tables))]


def test_rows_by_index_equal_the_whole_table_in_row_id_order(tmp_path):
    full = random_pairs(60, 2)
    shuffled = full.take(pa.array(np.random.default_rng(0).permutation(60)))  # files in no particular row order
    dropped = ["f.jsonl:5", "f.jsonl:33"]
    files = write_files(tmp_path, [shuffled.slice(0, 25), shuffled.slice(25, 10), shuffled.slice(35)])
    index = RowIndex(files, dropped)
    want = full.filter(pa.compute.invert(pa.compute.is_in(full["row_id"], pa.array(dropped)))).sort_by("row_id")
    assert len(index) == 58 and index.tokens.tolist() == want["pair_tokens"].to_pylist()
    assert index.nbytes() < 58 * 12 + 3 * 8 * 10  # 12 bytes a pair, and the row-group starts
    reader = RowReader(index)
    positions = np.random.default_rng(1).permutation(58)[:17]
    got = reader.read(positions)
    assert got.to_pylist() == want.take(pa.array(positions)).to_pylist()  # the same rows, values and order
    assert as_lists(got, [2, 0])["row_id"] == [got["row_id"][2].as_py(), got["row_id"][0].as_py()]
    # a file damaged after the driver checked it: one line naming it, no Arrow traceback
    (tmp_path / "p2.parquet").write_bytes((tmp_path / "p2.parquet").read_bytes()[:300])
    reader = RowReader(index)
    with pytest.raises(CacheReadError, match=rf"^train: cannot read (row group \d+ of )?the cached file {tmp_path}/p2.parquet \("):
        reader.read(np.arange(58))


def test_marker_vouches_for_its_files(tmp_path, caplog):
    final = local(tmp_path / "split")
    with complete_dir(final) as d:
        pq.write_table(random_pairs(10, 3), f"{d.path}/a.parquet")
        (d / "b.txt").write_text("x")
    first, manifest = (tmp_path / "split" / DONE).read_text().split("\n", 1)
    files = json.loads(manifest)["files"]
    assert first == "ok" and files["a.parquet"]["rows"] == 10 and files["b.txt"] == {"size": 1}
    assert completed(final).path == final.path
    data = tmp_path / "split" / "a.parquet"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # cut in half
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        assert completed(final) is None
    assert f"cache: {data} is damaged (" in caplog.text and "recomputed" in caplog.text
    with complete_dir(final) as d:  # the next writer replaces the damaged directory
        pq.write_table(random_pairs(10, 3), f"{d.path}/a.parquet")
    assert completed(final) is not None
    data.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        assert completed(final) is None
    assert f"cache: {data} is missing" in caplog.text


def test_worker_memory_does_not_grow_with_the_data(tmp_path):
    """The same 3 training steps on N and 10 x N generated pairs (~29 MB and ~290 MB of Arrow), with Ray's object store
    limited to 100 MB: both finish, and the worker's peak RSS differs by less than 10% (the whole-table read of before
    grew by ~2.6 GB here)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "scale_memory.py"), "--pairs", "7500", "--scales", "1", "10",
           "--object-store-mb", "100", "--work", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    small, large = json.loads(proc.stdout.strip().splitlines()[-1])["summary"]
    assert small["steps"] == large["steps"] == 3 and large["pairs"] == 10 * small["pairs"] == 75000
    assert large["arrow_mb"] > 250  # well above the 100 MB object store
    for key in ("host_memory_peak_mb", "vmhwm_mb"):
        assert abs(large[key] - small[key]) < 0.1 * small[key], (key, small, large)


def test_first_copies_keeps_the_first_of_each_pair_in_order():
    """prepare's duplicate finder (a sort over the fixed-width index) against pandas' duplicated(keep='first') over the
    rows in (file, line) order: the same rows kept, whatever order the index arrives in."""
    import pandas as pd

    from pipeline.prepare import first_copies

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 500):
        words = rng.integers(0, 2**63, size=(max(n // 3, 1), 2), dtype=np.uint64)
        words[0, 1] = words[-1, 1]  # pairs that share one of their two words are still different pairs
        hashes = words[rng.integers(0, len(words), n)]
        part, line = rng.integers(0, 3, n), rng.permutation(n).astype(np.int64)
        got = first_copies(hashes, part, line)
        df = pd.DataFrame({"h": [f"{a}-{b}" for a, b in hashes], "part": part, "line": line}).sort_values(["part", "line"])
        want = np.zeros(n, bool)
        want[df.index[~df.duplicated("h", keep="first")]] = True
        assert (got == want).all() and got.sum() == len(set(map(tuple, hashes.tolist())))
