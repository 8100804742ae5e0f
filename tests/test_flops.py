"""Honest MFU's numerator (dpo_ray/flops.py): a packed step's matmul FLOPs equal what torch's FlopCounterMode counts in
the real forward and backward (full fine-tune and LoRA's frozen base), and the attention pairs equal the dense masks'
allowed entries; the datasheet peaks by device name."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from dpo_ray import parallel
from dpo_ray.config import LoraConfig
from dpo_ray.flops import ModelFlops, batch_flops, datasheet_peak
from dpo_ray.forward import PolicyLogps
from dpo_ray.packing import pack_pairs, pad_pairs

from test_logps import _ragged_batch, _tiny_model

ATTENTION_OPS = ("_scaled_dot_product", "scaled_dot_product")


def counted(policy, batch) -> tuple[float, float]:
    """(matmul FLOPs, attention FLOPs) that FlopCounterMode sees in one forward + backward."""
    with FlopCounterMode(display=False) as fc:
        logps, _ = policy(batch)
        logps.sum().backward()
    counts = fc.get_flop_counts()
    # transformers 5.17 (the GPU image's) builds the rotary angles with a small matmul (no weights; 5.24 broadcasts):
    # not model FLOPs, left out of both counts
    rope = sum(n for module, ops in counts.items() if module.endswith("rotary_emb") for n in ops.values())
    per_op = {str(op): n for op, n in counts["Global"].items()}
    attention = sum(n for op, n in per_op.items() if any(a in op for a in ATTENTION_OPS))
    return sum(per_op.values()) - attention - rope, attention


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_step_flops_equal_flop_counter(lora):
    model = _tiny_model()
    if lora:
        model = parallel.add_lora(model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"]))
    policy = PolicyLogps(model)
    rows = {**_ragged_batch(), "ref_chosen_logps": [0.0] * 6, "ref_rejected_logps": [0.0] * 6}
    batch = policy.collate(rows, pad_id=0)
    mf = policy.flops()
    matmuls, _ = counted(policy, batch)
    attention = 3 * 4 * mf.layers * mf.attn_dim * batch["attn_pairs"]
    ours = batch_flops(mf, batch, policy.reply_only_head) - attention
    if not lora:
        assert ours == pytest.approx(matmuls, rel=1e-9)
    else:  # the convention counts the frozen base's input gradients everywhere (4N); autograd skips them where nothing
        # trainable lies upstream (the first layer's inputs come from the frozen embedding): a share of one layer at most
        assert matmuls < ours < matmuls * (1 + 1 / (2 * mf.layers))
    # the prompt once per pair and the head on the scored positions only: less than the per-token convention
    assert batch["model_positions"] < batch["tokens"] and len(batch["score_pos"]) < batch["model_positions"]


def test_attention_pairs_are_the_masks_allowed_entries():
    rows = _ragged_batch()
    packed = pack_pairs(rows, "sdpa")  # the dense block masks the sdpa path attends with, built apart from the count
    assert packed["attn_pairs"] == sum(int(mask.sum()) for _, _, mask in packed["attn_blocks"])
    padded = pad_pairs(rows, 0)
    lengths = [len(s) for s in rows["chosen_input_ids"] + rows["rejected_input_ids"]]
    assert padded["attn_pairs"] == sum(n * (n + 1) // 2 for n in lengths) and padded["model_positions"] == sum(lengths)


def test_datasheet_peaks():
    assert datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12 and datasheet_peak("NVIDIA H200") == 989e12
    assert datasheet_peak("NVIDIA H100 PCIe") == 756e12 and datasheet_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert datasheet_peak("some CPU") is None and datasheet_peak(None) is None
