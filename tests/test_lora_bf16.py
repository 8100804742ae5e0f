"""LoRA with bf16 keeps its frozen base in bf16 (no fp32 master copy), the adapters in fp32; the reference scorer
loads the model in bf16 as well, so step 1 reads ln 2 with rewards 0; the memory plan counts the base at 2 bytes."""
import math

import torch

from dpo_ray import memory, parallel
from dpo_ray.config import Config
from dpo_ray.forward import PolicyLogps, autocast
from dpo_ray.scoring import LogpsScorer, scoring_precision
from dpo_ray.train_loop import micro_loss
from test_logps import _ragged_batch


def _cfg(bf16=True, strategy="ddp"):
    return Config.model_validate({"train": {"bf16": bf16, "strategy": strategy, "lora": {"r": 8, "dropout": 0.0}, "beta": 0.1}})


def test_lora_bf16_base_reads_ln2_at_step_1(demo_model):
    cfg = _cfg()
    t = cfg.train
    assert parallel.bf16_base(t, True) and not parallel.bf16_base(t, False) and not parallel.bf16_base(_cfg(strategy="fsdp").train, True)
    model = parallel.load_policy_model(cfg, demo_model, 0, bf16=True)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    adapters = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and adapters == {torch.float32}
    policy = PolicyLogps(model).train()

    rows = _ragged_batch()
    b = len(rows["chosen_input_ids"])
    bf16_weights = parallel.scores_in_bf16_weights(t, True)
    assert bf16_weights and scoring_precision(True, bf16_weights) == "bf16-weights+bf16-autocast"  # its own reference cache key
    refs = {w: LogpsScorer(demo_model, demo_model, "ref_", bf16=True, bf16_weights=w).logps(rows)["logps"] for w in (True, False)}

    batch = policy.collate(rows, pad_id=0)
    batch.update(ref_chosen_logps=refs[True][:b], ref_rejected_logps=refs[True][b:])
    loss, losses, _, cr, rr, pc, pr = micro_loss(policy, batch, t.loss, b, 1.0, autocast(True, "cpu"))
    assert abs(loss.item() - math.log(2)) < 1e-6 and cr.abs().max() < 1e-6 and rr.abs().max() < 1e-6, (loss, cr, rr)
    # the same step scored against fp32 weights (the old reference) is off by the base's bf16 rounding
    assert (torch.cat([pc, pr]).detach() - refs[False]).abs().max() > 10 * (torch.cat([pc, pr]).detach() - refs[True]).abs().max()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_memory_plan_counts_a_bf16_lora_base_at_2_bytes(demo_model):
    lora = _cfg().train.lora
    size = memory.model_size(demo_model, lora=lora)
    frozen = size.params - size.trainable
    assert 0 < size.trainable < frozen
    args = dict(cpu_offload=False, checkpointing=False, pairs=1, max_length=8)
    assert memory.plan(size, "ddp", 1, bf16=True, **args)["parameters"] == 4 * size.trainable + 2 * frozen
    assert memory.plan(size, "ddp", 1, bf16=False, **args)["parameters"] == 4 * size.params
    assert memory.plan(size, "fsdp", 1, bf16=True, **args)["parameters"] == 4 * size.params  # fsdp keeps an fp32 base
    full = memory.model_size(demo_model)
    assert memory.plan(full, "ddp", 1, bf16=True, **args)["parameters"] == 4 * full.params  # a full fine-tune: fp32 master
