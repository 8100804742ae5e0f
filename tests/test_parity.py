"""Step-1 parity on CPU: the reference stage's scorer and the training forward compute the same numbers.

The policy trains in bf16 autocast over fp32 weights; the reference scorer (dpo_ray.scoring.LogpsScorer) now computes
the same way, so at step 1 (policy == reference) the DPO loss reads ln 2 and the margins 0, up to batch-shape rounding.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.parity import step1  # noqa: E402
from benchmarks.common import tokenized_pairs  # noqa: E402


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no native bf16 (emulated: slow)")
def test_reference_scorer_reads_the_policy_at_step_1(demo_model, tmp_path):
    from dpo_ray.demo import DEMO_DATA

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:24]))
    rows = tokenized_pairs(data, Path(demo_model), 128, 64)
    r = step1(rows, demo_model, demo_model, "cpu", bf16=True, ref_batch=8, train_batch=4)
    new, old = r["policy_numerics"], r["old_bf16_weights"]
    assert abs(new["loss_minus_ln2"]) < 2e-3 and new["mean_abs_margin"] < 1e-2, r
    assert new["max_abs_logp_diff"] < old["max_abs_logp_diff"], r  # bf16 weights: a second numerics, further off
    assert old["max_abs_logp_diff"] > 0  # the check can tell two numerics apart
