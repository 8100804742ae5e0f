"""Big-model rows for the GPU check (issue 11): a ~7B Qwen2-shaped model with LoRA, and a ~1.5B one full fine-tune
with FSDP2 on one GPU, a few DPO steps each, through dpo-ray's own blocks (dpo_ray.parallel: add_lora, build_policy,
make_optimizer, clip_gradients; PolicyLogps packed pairs; dpo_loss). Random weights from a config, nothing downloaded.

Not the Ray Train path (Ray start, data and the reference stage would not fit the device time): the step is the loop's
step, timed with CUDA synchronisation over the measured steps after warm-up.

python benchmarks/big_models.py --device cuda --out big.json          # on the GPU machine
python benchmarks/big_models.py --device cpu --out /tmp/big.json      # the dry run here: tiny shapes, same code

Prints one JSON line per row and a table; tokens/s counts chosen + rejected tokens (the prompt in both, as every row
of RESULTS.md does); MFU counts the positions the model computes (the prompt once per pair) at 6N FLOPs for a full
fine-tune and 4N for LoRA (no weight gradients for the frozen base), N = all parameters but the input embedding,
against the bf16 matmul peak measured in the same process (benchmarks/peak.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SHAPES = {  # Qwen2.5-7B and Qwen2.5-1.5B (vocab, hidden, layers, MLP, heads, kv heads, tied); tiny ones for the CPU dry run
    "cuda": {"7b": (152064, 3584, 28, 18944, 28, 4, False), "1.5b": (151936, 1536, 28, 8960, 12, 2, True)},
    "cpu": {"7b": (1024, 128, 2, 384, 4, 2, False), "1.5b": (1024, 64, 2, 192, 4, 2, True)},
}


def qwen2_config(shape):
    from transformers import Qwen2Config

    vocab, hidden, layers, mlp, heads, kv, tied = shape
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, intermediate_size=mlp, num_attention_heads=heads,
                       num_key_value_heads=kv, tie_word_embeddings=tied, max_position_embeddings=32768, rope_theta=1e6)


def pairs(n: int, vocab: int, prompt: int, reply: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = {"chosen_input_ids": [], "rejected_input_ids": [], "chosen_loss_mask": [], "rejected_loss_mask": []}
    for _ in range(n):
        p = torch.randint(3, vocab, (prompt,), generator=g).tolist()
        for side in ("chosen", "rejected"):
            r = torch.randint(3, vocab, (reply,), generator=g).tolist()
            rows[f"{side}_input_ids"].append(p + r)
            rows[f"{side}_loss_mask"].append([0] * prompt + [1] * reply)
    return rows


def n_flops(model) -> int:
    emb = model.get_input_embeddings().weight
    params = {id(p): p for p in model.parameters()}.values()
    head = model.get_output_embeddings().weight
    return sum(p.numel() for p in params) - emb.numel() + (head.numel() if head is emb else 0)


def steps(policy, wrapper, optimizer, rows, device, n_warm: int, n_meas: int, bs: int) -> dict:
    """The loop's step (packed pairs, bf16 autocast, DPO sigmoid loss, clip, AdamW) on the same batch, timed."""
    from dpo_ray import parallel
    from dpo_ray.forward import autocast
    from dpo_ray.losses import dpo_loss

    batch = wrapper.collate(rows, 0, device)
    zeros = torch.zeros(bs, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, t0 = [], 0.0
    for i in range(n_warm + n_meas):
        if i == n_warm:
            sync()
            t0 = time.perf_counter()
        with autocast(device.type == "cuda", device):
            logps, _ = policy(batch)
        loss = dpo_loss(logps[:bs], logps[bs:], zeros, zeros, beta=0.1)[0].mean()
        loss.backward()
        parallel.clip_gradients(policy, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    sync()
    seconds = time.perf_counter() - t0
    positions = batch["input_ids"].numel()  # what the model computes: a packed row, the prompt once per pair
    return {"tokens": batch["tokens"], "positions": positions, "seconds": seconds, "step_seconds": seconds / n_meas,
            "tokens_per_s": batch["tokens"] * n_meas / seconds, "positions_per_s": positions * n_meas / seconds, "losses": losses}


def lora_row(device, shape, spec) -> dict:
    """~7B with LoRA r=16 on every linear layer, activation checkpointing, fp32 frozen base built on the device."""
    from transformers import Qwen2ForCausalLM

    from dpo_ray import parallel
    from dpo_ray.config import LoraConfig
    from dpo_ray.forward import PolicyLogps
    from dpo_ray.model import enable_activation_checkpointing

    t = time.perf_counter()
    torch.manual_seed(0)
    with device:
        model = Qwen2ForCausalLM(qwen2_config(shape))
    model = parallel.add_lora(model, LoraConfig(r=16, alpha=32, dropout=0.05))
    enable_activation_checkpointing(model)
    wrapper = PolicyLogps(model).to(device)
    build = time.perf_counter() - t
    optimizer = parallel.make_optimizer(wrapper, spec, device)
    n = n_flops(model.get_base_model())
    out = steps(wrapper, wrapper, optimizer, pairs(spec.pairs, shape[0], spec.prompt, spec.reply), device, spec.warm, spec.meas, spec.pairs)
    trainable = sum(p.numel() for p in parallel.trainable(wrapper))
    return {"row": "qwen2-7b LoRA r=16 (1 GPU, activation checkpointing)", "params": n, "trainable": trainable, "build_s": build,
            "flops_per_token": 4 * n, **out}


def fsdp_row(device, shape, spec, work: Path) -> dict:
    """~1.5B full fine-tune through build_policy with train.strategy=fsdp on a one-process group: rank 0 loads the
    saved weights, FSDP2 shards them (one shard here), bf16 compute copies, fp32 master weights and AdamW."""
    import torch.distributed as dist
    from transformers import Qwen2ForCausalLM

    from dpo_ray import parallel
    from dpo_ray.config import load_config

    t = time.perf_counter()
    path = work / "qwen2-1.5b"
    torch.manual_seed(0)
    with device:
        Qwen2ForCausalLM(qwen2_config(shape)).save_pretrained(path)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    cfg = load_config(None, ["train.strategy=fsdp", "train.gradient_checkpointing=false"])
    policy, wrapper, model = parallel.build_policy(cfg, str(path), 0, 1, device, bf16=device.type == "cuda")
    build = time.perf_counter() - t
    optimizer = parallel.make_optimizer(policy, spec, device)
    n = n_flops(model)
    out = steps(policy, wrapper, optimizer, pairs(spec.pairs, shape[0], spec.prompt, spec.reply), device, spec.warm, spec.meas, spec.pairs)
    dist.destroy_process_group()
    return {"row": "qwen2-1.5b full fine-tune, fsdp on 1 GPU (bf16 compute, fp32 master)", "params": n, "trainable": n, "build_s": build,
            "flops_per_token": 6 * n, **out}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", required=True)
    ap.add_argument("--rows", default="lora,fsdp")
    a = ap.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"
    spec = argparse.Namespace(lr=1e-5, weight_decay=0.0, pairs=4 if cuda else 2, prompt=512 if cuda else 16, reply=512 if cuda else 16,
                              warm=2, meas=4)
    from benchmarks.peak import run as peak

    top = peak({"threads": os.cpu_count(), "device": a.device, "bf16": cuda})
    results = {"peak": top, "rows": []}
    with tempfile.TemporaryDirectory() as work:
        for name in a.rows.split(","):
            t = time.perf_counter()
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                row = lora_row(device, SHAPES[a.device]["7b"], spec) if name == "lora" else fsdp_row(device, SHAPES[a.device]["1.5b"], spec, Path(work))
                row["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
                row["mfu"] = row["flops_per_token"] * row["positions_per_s"] / top["flops_per_s"]
            except Exception as e:  # one row failing still leaves the other's numbers
                row = {"row": name, "error": f"{type(e).__name__}: {str(e)[:500]}"}
            row["wall_s"] = time.perf_counter() - t
            print(json.dumps(row), flush=True)
            results["rows"].append(row)
            if cuda:
                import gc

                gc.collect()
                torch.cuda.empty_cache()
    Path(a.out).write_text(json.dumps(results, indent=1))
    print(f"\npeak: {top['name']} {top['flops_per_s'] / 1e12:.1f} TFLOP/s\n\n| row | params | trainable | tokens/step | positions/step | tokens/s | MFU | peak GPU MB | build s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["rows"]:
        if "error" in r:
            print(f"| {r['row']} | error: {r['error'][:200]} |")
        else:
            print(f"| {r['row']} | {r['params'] / 1e9:.2f}B | {r['trainable'] / 1e6:.1f}M | {r['tokens']:,} | {r['positions']:,} | {r['tokens_per_s']:,.0f} | "
                  f"{r['mfu']:.1%} | {r['peak_gpu_mb'] or 0:,.0f} | {r['build_s']:.0f} |")


if __name__ == "__main__":
    main()
