"""The longest max_length whose DPO training step fits on the device at batch 1, for one row.

Each probe trains two optimizer steps (AdamW's state exists from the first) on one pair whose chosen and rejected
sequences are both exactly L tokens (prompt L/2, replies L/2), bf16 autocast over fp32 weights on CUDA. Lengths are
tried in the given (rising) order until the first failure (out of memory, or any other error, which is named).
After each probe one JSON line is printed (cumulative), so a probe killed at its time limit loses only itself.

  dpo-ray-sdpa / dpo-ray-varlen / dpo-ray-flex: the training forward (dpo_ray.forward.PolicyLogps, packed, reply-only head) + dpo_loss;
  trl-pre: benchmarks/trl_row.py (TRL DPOTrainer, precompute_ref_log_probs=True), max_length L, max_prompt_length L/2.

python benchmarks/max_length.py '<spec json>'   spec: row, model_dir, lengths, device, work
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def dpo_ray_probe(spec: dict, attention: str):
    from dpo_ray.forward import PolicyLogps, autocast
    from dpo_ray.losses import dpo_loss
    from dpo_ray.model import load_model

    device = torch.device(spec["device"])
    model = load_model(spec["model_dir"])
    policy = PolicyLogps(model, attention=attention).to(device).train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, fused=True)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)

    def probe(L: int):
        half = L // 2
        prompt = torch.randint(10, vocab, (half,), generator=g).tolist()
        rows = {"chosen_input_ids": [prompt + torch.randint(10, vocab, (L - half,), generator=g).tolist()],
                "rejected_input_ids": [prompt + torch.randint(10, vocab, (L - half,), generator=g).tolist()],
                "chosen_loss_mask": [[0] * half + [1] * (L - half)], "rejected_loss_mask": [[0] * half + [1] * (L - half)]}
        for _ in range(2):
            batch = policy.collate(rows, 0, device)
            with autocast(device.type == "cuda", device):
                logps, _ = policy(batch)
            losses, _, _ = dpo_loss(logps[:1], logps[1:], logps[:1].detach() - 0.1, logps[1:].detach(), beta=0.1)
            losses.mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return probe


def trl_probe(spec: dict):
    from benchmarks import trl_row
    from benchmarks.common import _words

    words = _words()
    work = Path(spec["work"]) / "maxlen"
    work.mkdir(parents=True, exist_ok=True)

    def text(n: int, start: int) -> str:
        return " ".join(words[(start + i) % len(words)] for i in range(n))

    def probe(L: int):
        data = work / f"pair-{L}.jsonl"
        prompt = [{"role": "user", "content": text(L, 0)}]  # every part longer than L tokens: cut to exactly L
        data.write_text(json.dumps({"chosen": prompt + [{"role": "assistant", "content": text(L, 1000)}],
                                    "rejected": prompt + [{"role": "assistant", "content": text(L, 5000)}]}) + "\n")
        r = trl_row.run({"model_dir": spec["model_dir"], "tokenizer_dir": spec["model_dir"], "data": str(data), "batch_size": 1,
                         "warmup_steps": 1, "steps": 1, "max_length": L, "max_prompt_length": L // 2, "lr": 1e-6, "beta": 0.1,
                         "threads": min(8, os.cpu_count() or 1), "precompute_ref": True, "device": spec["device"], "bf16": spec["device"] == "cuda"})
        got = max(rec["positions"] for rec in trl_row._LAST["records"]) // 2  # longest padded sequence TRL ran
        if got != L:
            raise RuntimeError(f"TRL ran sequences of {got} tokens, not {L}: the probe's text is too short")

    return probe


def main(spec: dict) -> None:
    row = spec["row"]
    probe = trl_probe(spec) if row == "trl-pre" else dpo_ray_probe(spec, row.split("-")[-1])
    cuda = spec["device"] == "cuda"
    out = {"row": row, "tried": [], "longest": None, "first_failure": None, "peak_gpu_mb": None}
    for L in spec["lengths"]:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            probe(L)
        except Exception as e:  # noqa: BLE001  (the probe's whole point: report why it stopped)
            out["first_failure"] = L
            out["failure"] = "out of memory" if _oom(e) else f"{type(e).__name__}: {str(e)[:300]}"
            out["tried"].append({"length": L, "ok": False, "seconds": round(time.perf_counter() - t0, 1)})
            print(json.dumps(out), flush=True)
            break
        peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        out["tried"].append({"length": L, "ok": True, "seconds": round(time.perf_counter() - t0, 1), "peak_gpu_mb": peak})
        out["longest"], out["peak_gpu_mb"] = L, peak
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
