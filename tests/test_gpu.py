"""The CUDA path against the float64 CPU computation: every logps path, their gradients, and step-1 parity.

Marked `gpu`: skipped without CUDA. `DPO_RAY_GPU_TESTS_ON_CPU=1` runs them on the CPU instead (the dry run of
benchmarks/gpu_check.sh --device cpu: the same code, so the one GPU run is not the first). Tolerances: fp32 within
1e-5 of the float64 result (relative, over all sequences); bf16 autocast within 1e-2 (5e-2 for gradients; bf16 has 8 mantissa bits).
"""
import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import build_qwen2
from test_logps import _alone_float64, _ragged_batch, _tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
pytestmark = pytest.mark.gpu
TOL = {"fp32": 1e-5, "bf16": 1e-2}  # relative error of the logps, ||got - want|| / ||want||
GRAD_TOL = {"fp32": 1e-4, "bf16": 5e-2}
HIDDEN = 64  # 4 heads of 16: FlexAttention's CUDA kernels want head dims of 16 or more


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would land near 3e-4)
        return "cuda"
    if os.environ.get("DPO_RAY_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip("needs a CUDA device (DPO_RAY_GPU_TESTS_ON_CPU=1 runs these on the CPU)")


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double()).norm() / want.double().norm()).item()


def _policy(model, path: str, head: str):
    from dpo_ray.forward import PolicyLogps

    attention = {"packed-flex": "flex", "packed-varlen": "varlen"}.get(path, "sdpa")
    return PolicyLogps(model, reply_only_head=head == "reply-head", packed=path != "padded", attention=attention)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("head", ["reply-head", "full-head"])
@pytest.mark.parametrize("path", ["packed-sdpa", "packed-flex", "packed-varlen", "padded"])
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_logps_on_device_equal_float64(device, arch, path, head, precision):
    from dpo_ray.forward import autocast

    model = _tiny_model(arch, HIDDEN)
    rows = _ragged_batch()
    want, want_counts = _alone_float64(model, rows)
    policy = _policy(copy.deepcopy(model), path, head).to(device)
    with torch.inference_mode(), autocast(precision == "bf16", device):
        logps, counts = policy(policy.collate(rows, pad_id=0, device=device))
    assert logps.dtype == torch.float32 and counts.cpu().tolist() == want_counts
    err = _rel(logps, want)
    print(f"{arch} {path} {head} {precision} on {device}: relative error {err:.2e}")
    assert err < TOL[precision], err


def _float64_grads(rows):
    model = _tiny_model(hidden=HIDDEN).double().train()
    policy = _policy(model, "padded", "full-head")
    logps, _ = policy(policy.collate(rows, pad_id=0))
    (logps * torch.linspace(-1, 1, len(logps), dtype=torch.float64)).sum().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("path", ["packed-sdpa", "packed-flex", "packed-varlen"])
def test_gradients_on_device_equal_float64(device, path, precision):
    from dpo_ray.forward import autocast

    rows = _ragged_batch()
    want = _float64_grads(rows)
    model = _tiny_model(hidden=HIDDEN).train()
    policy = _policy(model, path, "reply-head").to(device)
    with autocast(precision == "bf16", device):
        logps, _ = policy(policy.collate(rows, pad_id=0, device=device))
    (logps * torch.linspace(-1, 1, len(logps), device=device)).sum().backward()
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    err = _rel(got, want)
    print(f"gradients {path} {precision} on {device}: relative error {err:.2e}")
    assert err < GRAD_TOL[precision], err


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, demo_model) -> str:
    return build_qwen2(tmp_path_factory.mktemp("qwen2-small"), demo_model)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "varlen"])
def test_reference_stage_reads_the_training_forward_at_step_1(device, qwen_dir, attention, tmp_path):
    """The reference stage's scorer against the training forward on the same pairs, in bf16 autocast: the loss is
    ln 2 and the margins 0 up to batch-shape rounding (|loss - ln 2| < 2e-3, mean |margin| < 1e-2 at beta 0.1)."""
    from benchmarks.common import tokenized_pairs
    from benchmarks.parity import step1
    from dpo_ray.demo import DEMO_DATA

    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:32]))
    rows = tokenized_pairs(data, Path(qwen_dir), 256, 128)
    r = step1(rows, qwen_dir, qwen_dir, device, bf16=True, attention=attention, ref_batch=16, train_batch=8)
    new = r["policy_numerics"]
    print(f"step 1 on {device} ({attention}): {r}")
    assert abs(new["loss_minus_ln2"]) < 2e-3 and new["mean_abs_margin"] < 1e-2, r
    assert math.isfinite(r["old_bf16_weights"]["mean_abs_margin"])
