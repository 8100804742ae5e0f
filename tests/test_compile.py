"""train.compile: the compiled decoder layers give the eager step's numbers (step-1 loss ln 2, gradients, losses and
weights after several steps) under the packed attentions, bf16 autocast, LoRA and FSDP2, with no recompile after the
first step although every step's packed row has another length; no compiler: one warning, the step runs eagerly.

On CPU (inductor's C++ kernels; the CUDA path is the GPU check's). Precision is stated per case: fp32 cases compare to
1e-5, the bf16 autocast case to bf16's rounding (the compiled graph fuses ops and rounds in other places)."""
from __future__ import annotations

import json
import logging
import math
import os
import tempfile

import pyarrow as pa
import pytest
import torch

from dpo_ray import parallel
from dpo_ray.compiling import compile_layers, compiler_missing
from dpo_ray.config import Config, LoraConfig, TrainConfig
from dpo_ray.forward import PolicyLogps, autocast
from dpo_ray.model import load_model
from dpo_ray.train_loop import micro_loss, train_step

CPU = torch.device("cpu")
STEPS, BATCH = 4, 8


@pytest.fixture(scope="module")
def table(demo_model):
    """40 demo pairs as prepare writes them, with the demo model's own reference log-probs (fp32): step 1 reads ln 2."""
    from dpo_ray.data import to_pair, tokenize_pairs
    from dpo_ray.demo import DEMO_DATA
    from dpo_ray.model import load_tokenizer
    from dpo_ray.packing import pair_tokens
    from dpo_ray.scoring import LogpsScorer

    with open(DEMO_DATA, encoding="utf-8") as f:
        pairs = [to_pair(json.loads(line)) for _, line in zip(range(STEPS * BATCH), f)]
    rows = tokenize_pairs(load_tokenizer(demo_model), pairs, max_length=96, prompt_budget=48)
    keys = ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")
    t = pa.table({k: [r[k] for r in rows] for k in keys})
    t = t.append_column("pair_tokens", pa.array(pair_tokens(t), pa.int32()))
    return LogpsScorer(demo_model, demo_model, "ref_")(t)


def train(model, table, attention: str = "sdpa", compiled: bool = False, bf16: bool = False, lora=None):
    """STEPS optimizer steps of train_step (the worker's step) on consecutive slices of BATCH pairs; returns the step-1
    gradients, every step's loss, the weights after, the compile stats, and the packed lengths of the steps."""
    t = TrainConfig(batch_size_per_worker=BATCH, lr=LR, warmup_ratio=0.0, attention=attention, bf16=bf16, compile=compiled)
    if lora is not None:
        torch.manual_seed(0)  # the adapters' A matrices are drawn at random: the same draw for both runs
        model = parallel.add_lora(model, lora)
    wrapper = PolicyLogps(model, attention=attention)
    if compiled:
        torch._dynamo.reset()  # compiled afresh: the stats count this model's compiles, not a cache hit of an earlier test
    stats = compile_layers(parallel.decoder_layers(model), CPU) if compiled else None
    optimizer = parallel.make_optimizer(wrapper, t, CPU)
    precision = autocast(bf16, CPU)
    step_rows = [table.slice(i * BATCH, BATCH) for i in range(STEPS)]
    batch = wrapper.collate({k: step_rows[0][k].to_pylist() for k in step_rows[0].column_names}, 0, CPU)
    loss, *_ = micro_loss(wrapper, batch, t.loss, BATCH, 1.0, precision)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in wrapper.named_parameters() if p.grad is not None}
    optimizer.zero_grad(set_to_none=True)
    losses, lengths = [], []
    for i, rows in enumerate(step_rows):
        m, _ = train_step(wrapper, wrapper, optimizer, rows, t, 0, CPU, precision)
        losses.append(m["loss"])
        lengths.append(sum(rows["pair_tokens"].to_pylist()))
        if stats is not None:
            stats.mark_warm()
    weights = {n: p.detach().clone() for n, p in wrapper.named_parameters() if p.requires_grad}
    return grads, losses, weights, stats, lengths


LR = 1e-3


def assert_same(eager, compiled, tol: float, weight_max: float, weight_mean: float) -> None:
    """Step-1 gradients and every step's loss to `tol`; the weights after STEPS AdamW steps to fractions of the learning
    rate: AdamW moves a weight by about lr a step whatever its gradient's size, so a gradient near zero that differs in
    its last bits (the compiled graph adds in another order) can move its weight by up to a step's lr differently."""
    grads, losses, weights = eager[:3]
    assert set(grads) == set(compiled[0]) and len(grads) > 0
    for name, g in grads.items():
        torch.testing.assert_close(compiled[0][name], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item()), msg=name)
    assert compiled[1] == pytest.approx(losses, rel=tol, abs=tol)
    diffs = torch.cat([(compiled[2][n] - w).abs().flatten() for n, w in weights.items()])
    assert diffs.max().item() <= weight_max * LR and diffs.mean().item() <= weight_mean * LR, (diffs.max().item(), diffs.mean().item())


def assert_compiled_once(stats, lengths) -> None:
    assert stats is not None and stats.graphs > 0 and stats.seconds > 0
    assert len(set(lengths)) == len(lengths)  # every step a packed row of another length ...
    assert stats.recompiles == 0  # ... and nothing compiled after the first step


@pytest.mark.parametrize("attention", ["sdpa", "varlen"])
def test_compiled_step_equals_eager_fp32(attention, demo_model, table):
    eager = train(load_model(demo_model), table, attention)
    compiled = train(load_model(demo_model), table, attention, compiled=True)
    assert compiled[1][0] == pytest.approx(math.log(2), abs=1e-5)  # step 1: the reference is the policy itself
    assert_same(eager, compiled, 1e-5, weight_max=0.1, weight_mean=1e-4)
    assert_compiled_once(compiled[3], compiled[4])
    assert compiled[1][-1] < compiled[1][0]  # it trains


def test_compiled_step_equals_eager_bf16_autocast_and_lora(demo_model, table):
    """bf16 autocast over fp32 weights, with LoRA adapters (peft) inside the compiled layers."""
    lora = LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "gate_proj"])
    eager = train(load_model(demo_model), table, bf16=True, lora=lora)
    compiled = train(load_model(demo_model), table, compiled=True, bf16=True, lora=lora)
    assert all("lora_" in n for n in compiled[0])  # only the adapters learn
    assert abs(compiled[1][0] - math.log(2)) < 2e-2  # bf16 policy against the fp32 reference
    assert_same(eager, compiled, 3e-2, weight_max=4.0, weight_mean=0.05)
    assert_compiled_once(compiled[3], compiled[4])


def test_compiled_fsdp2_equals_eager(demo_model, table, tmp_path):
    """train.strategy=fsdp: FSDP2 on a one-process gloo group, the layers compiled inside its hooks (build_policy's path)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        runs = []
        for compiled in (False, True):
            cfg = Config.model_validate({"train": {"strategy": "fsdp", "compile": compiled, "bf16": False}})
            policy, wrapper, _ = parallel.build_policy(cfg, demo_model, 0, 1, CPU, False)
            assert (wrapper.compile_stats is not None) == compiled
            t = cfg.train.model_copy(update={"batch_size_per_worker": BATCH, "lr": LR, "warmup_ratio": 0.0})
            optimizer = parallel.make_optimizer(policy, t, CPU)
            losses = [train_step(policy, wrapper, optimizer, table.slice(i * BATCH, BATCH), t, 0, CPU, fsdp=True)[0]["loss"]
                      for i in range(STEPS)]
            if compiled:
                wrapper.compile_stats.mark_warm()
            weights = {n: p.full_tensor().detach().clone() for n, p in policy.named_parameters()}
            runs.append((losses, weights))
        assert runs[0][0][0] == pytest.approx(math.log(2), abs=1e-5)
        assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-5, abs=1e-5)
        diffs = torch.cat([(runs[1][1][n] - w).abs().flatten() for n, w in runs[0][1].items()])
        assert diffs.max().item() <= 0.1 * LR and diffs.mean().item() <= 1e-4 * LR  # as assert_same
    finally:
        dist.destroy_process_group()


def test_no_compiler_or_a_failing_compile_runs_eagerly(demo_model, table, monkeypatch, caplog):
    empty = tempfile.mkdtemp()
    with monkeypatch.context() as m:  # a machine without g++/c++/clang++ on PATH
        m.setenv("PATH", empty)
        m.delenv("CXX", raising=False)
        assert "C++ compiler" in compiler_missing(CPU)
        with caplog.at_level(logging.WARNING, logger="dpo_ray"):
            assert compile_layers(parallel.decoder_layers(load_model(demo_model)), CPU) is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"train.compile: no C++ compiler (g++, c++ or clang++) for inductor on PATH; the step runs eagerly"]
    caplog.clear()

    def broken(gm, example_inputs):  # a backend whose compile fails, as an op inductor cannot lower would
        raise RuntimeError("this op will not compile")

    model = load_model(demo_model)
    wrapper = PolicyLogps(model)
    rows = table.slice(0, BATCH)
    batch = wrapper.collate({k: rows[k].to_pylist() for k in rows.column_names}, 0, CPU)
    with torch.no_grad():
        want = wrapper(batch)[0]
        compile_layers(parallel.decoder_layers(model), CPU, backend=broken)
        with caplog.at_level(logging.WARNING, logger="dpo_ray"):
            got = wrapper(batch)[0]
            again = wrapper(batch)[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the step runs eagerly" in warnings[0] and "will not compile" in warnings[0]
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(again, want)
    assert os.listdir(empty) == []
