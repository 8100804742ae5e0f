"""Benchmark row: the seed loop, as MiniMind's train_dpo.py runs DPO.

Every sample padded to max_length; chosen and rejected concatenated in one batch; the reference model
run on every step; full-vocabulary log_softmax + gather over every position; the loss
-logsigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r))) on mask-averaged log-probs, as MiniMind does.
Same model, tokenized rows (dpo-ray's own tokenization), batch, optimizer, threads and precision (fp32 on CPU,
bf16 autocast over fp32 weights on CUDA) as the other rows.

python benchmarks/seed_loop.py '<spec json>'  -> one JSON line
"""
from __future__ import annotations

import copy
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import peak_gpu_mb, peak_rss_mb, set_threads, tokenized_pairs  # noqa: E402
from dpo_ray.model import load_model  # noqa: E402


def logits_to_probs(logits, labels):  # MiniMind: full (B, T, V) log_softmax, then gather
    log_probs = F.log_softmax(logits, dim=2)
    return torch.gather(log_probs, dim=2, index=labels.unsqueeze(2)).squeeze(-1)


def dpo_loss(ref_probs, probs, mask, beta):  # MiniMind: per-sequence mean over the masked tokens
    seq_lengths = mask.sum(dim=1, keepdim=True)
    ref_probs = (ref_probs * mask).sum(dim=1) / seq_lengths.squeeze()
    probs = (probs * mask).sum(dim=1) / seq_lengths.squeeze()
    n = ref_probs.shape[0] // 2
    logits = (probs[:n] - probs[n:]) - (ref_probs[:n] - ref_probs[n:])
    return -F.logsigmoid(beta * logits).mean()


def batches(rows: list[dict], bs: int, max_length: int, pad_id: int):
    """MiniMind's DPODataset: pad to max_length; x = ids[:-1], y = ids[1:], mask = loss_mask[1:]."""
    for i in range(0, len(rows) - bs + 1, bs):
        group = rows[i : i + bs]
        seqs = [r["chosen_input_ids"] for r in group] + [r["rejected_input_ids"] for r in group]
        masks = [r["chosen_loss_mask"] for r in group] + [r["rejected_loss_mask"] for r in group]
        ids = torch.full((len(seqs), max_length), pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), max_length), dtype=torch.long)
        for j, (s, m) in enumerate(zip(seqs, masks)):
            ids[j, : len(s)] = torch.tensor(s)
            mask[j, : len(m)] = torch.tensor(m)
        yield ids[:, :-1], ids[:, 1:], mask[:, 1:], sum(len(s) for s in seqs)


def run(spec: dict) -> dict:
    set_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    rows = tokenized_pairs(Path(spec["data"]), Path(spec["tokenizer_dir"]), spec["max_length"], spec["max_prompt_length"])
    device = torch.device(spec.get("device", "cpu"))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if spec.get("bf16") else nullcontext()  # fp32 master weights
    model = load_model(spec["model_dir"]).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False)
    pad_id = model.config.pad_token_id or 0
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0, fused=True)  # the same AdamW kernel in every row
    model.train()
    steps, warmup = spec["steps"], spec["warmup_steps"]
    tokens = positions = 0
    loss_first = None
    t0 = None
    for step, (x, y, mask, real) in enumerate(batches(rows, spec["batch_size"], spec["max_length"], pad_id)):
        if step == warmup:
            sync()
            t0 = time.perf_counter()
        x, y, mask = x.to(device), y.to(device), mask.to(device)
        with autocast:
            with torch.no_grad():
                ref_probs = logits_to_probs(ref_model(x).logits, y) * mask
            probs = logits_to_probs(model(x).logits, y) * mask
            loss = dpo_loss(ref_probs, probs, mask, spec["beta"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # MiniMind's grad_clip
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss_first = loss.item() if loss_first is None else loss_first
        if step >= warmup:
            tokens += real
            positions += x.numel() + x.shape[0]  # the model runs max_length - 1 positions; count the full padded row
        if step + 1 == warmup + steps:
            break
    sync()
    seconds = time.perf_counter() - t0
    if step + 1 < warmup + steps:
        raise SystemExit(f"seed loop: the data has {step + 1} batches, fewer than warmup_steps + steps = {warmup + steps}")
    return {"name": "seed loop (MiniMind train_dpo.py)", "steps": steps, "pairs": steps * spec["batch_size"], "tokens": tokens,
            "positions": positions, "padding_fraction": 1 - tokens / positions, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "pairs_per_s": steps * spec["batch_size"] / seconds, "peak_rss_mb": peak_rss_mb(),
            "peak_gpu_mb": peak_gpu_mb(), "loss_first": loss_first}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
