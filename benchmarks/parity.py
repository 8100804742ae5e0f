"""Step-1 parity: the reference stage's log-probs against the policy's own at its first training step.

At step 1 the policy is the reference, so every reward is 0 and the DPO loss is ln 2, up to the rounding of the two
computations. The reference is scored by the real reference-stage scorer (dpo_ray.scoring.LogpsScorer: fp32 weights,
bf16 autocast when bf16, inference_mode, reference batch size); the policy by the training forward (fp32 weights in
train mode, autocast, autograd on, training batch size). For comparison, the old reference numerics (bf16 weights,
no autocast) are scored too.

python benchmarks/parity.py '<spec json>'   -> one JSON line
spec: model_dir, tokenizer_dir, data (JSONL), pairs, max_length, max_prompt_length, ref_batch, train_batch, device,
      bf16, attention, beta
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KEYS = ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")


def _batches(rows: list[dict], size: int):
    for i in range(0, len(rows), size):
        yield {k: [r[k] for r in rows[i : i + size]] for k in KEYS}


def _split(logps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(logps) // 2
    return logps[:n], logps[n:]


def step1(rows: list[dict], model_dir: str, tokenizer_dir: str, device: str, bf16: bool, attention: str = "sdpa",
          ref_batch: int = 16, train_batch: int = 8, beta: float = 0.1) -> dict:
    from dpo_ray.forward import PolicyLogps, autocast
    from dpo_ray.losses import dpo_loss
    from dpo_ray.model import load_model
    from dpo_ray.scoring import LogpsScorer

    dev = torch.device(device)
    scorer = LogpsScorer(model_dir, tokenizer_dir, "ref_", bf16=bf16, attention=attention)
    assert scorer.device.type == dev.type, f"the scorer picked {scorer.device}, the check asked for {dev}"
    ref_c, ref_r = map(torch.cat, zip(*(_split(scorer.logps(b)["logps"]) for b in _batches(rows, ref_batch))))
    del scorer

    old = PolicyLogps(load_model(model_dir, dtype=torch.bfloat16), attention=attention).to(dev).eval()  # the old reference numerics
    with torch.inference_mode():
        old_c, old_r = map(torch.cat, zip(*(_split(old(old.collate(b, 0, dev)).__getitem__(0).float().cpu())
                                            for b in _batches(rows, ref_batch))))
    del old

    policy = PolicyLogps(load_model(model_dir), attention=attention).to(dev).train()
    parts = []
    for b in _batches(rows, train_batch):
        with autocast(bf16, dev):
            logps, *_ = policy(policy.collate(b, 0, dev))  # autograd on, as in the training step
        parts.append(_split(logps.detach().float().cpu()))
    pol_c, pol_r = map(torch.cat, zip(*parts))

    def read(rc, rr):
        losses, cr, rr_ = dpo_loss(pol_c.double(), pol_r.double(), rc.double(), rr.double(), beta=beta)
        margins = cr - rr_
        return {"loss_minus_ln2": losses.mean().item() - math.log(2), "mean_abs_margin": margins.abs().mean().item(),
                "max_abs_logp_diff": torch.cat([pol_c - rc, pol_r - rr]).abs().max().item()}

    return {"pairs": len(rows), "device": dev.type, "bf16": bf16, "attention": attention, "ref_batch": ref_batch,
            "train_batch": train_batch, "beta": beta, "policy_numerics": read(ref_c, ref_r),
            "old_bf16_weights": read(old_c, old_r)}


def run(spec: dict) -> dict:
    from benchmarks.common import tokenized_pairs

    rows = tokenized_pairs(Path(spec["data"]), Path(spec["tokenizer_dir"]), spec["max_length"], spec["max_prompt_length"])
    rows = rows[: spec.get("pairs", 64)]
    return step1(rows, spec["model_dir"], spec["tokenizer_dir"], spec.get("device", "cpu"), bool(spec.get("bf16", True)),
                 spec.get("attention", "sdpa"), spec.get("ref_batch", 16), spec.get("train_batch", 8), spec.get("beta", 0.1))


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
