"""The demo SFT model for each reply set: build seconds (twice: the machine is shared) and the demo judge's mean score
of its greedy and its sampled replies (temperature 1, seed 0) on the demo's first 64 held-out prompts.

    python benchmarks/demo_sft.py [--policy RUN_DIR/model ...] [--out benchmarks/demo_sft.json]

Held-out prompts: the demo pairs in the eval split as `prepare` draws it (configs/demo.yaml's eval_fraction 0.05, by
content hash), the first 64 by line, their conversation up to the reply; generation as configs/demo.yaml's
eval.generate (batched, left padded, 48 new tokens, stops at <|im_end|>). --policy adds other models (e.g. a demo
run's trained policy) scored the same way, with the fraction of prompts where they beat the SFT model (ties 0.5).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import tempfile
import time
import zlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dpo_ray.data import Pair, pair_hash  # noqa: E402
from dpo_ray.demo import DEMO_DATA, SFT_REPLIES, build_demo_model, build_demo_sft_model  # noqa: E402
from dpo_ray.demo_judge import score  # noqa: E402


def held_out_prompts(n: int = 64, eval_fraction: float = 0.05) -> list[list[dict]]:
    out = []
    for line in DEMO_DATA.read_text().splitlines():
        row = json.loads(line)
        h = pair_hash(Pair("conversational", row["chosen"], row["rejected"]))
        if zlib.crc32(h.encode()) % 1_000_000 < eval_fraction * 1_000_000:  # pipeline.prepare._split_of
            out.append(row["chosen"][:-1])
    return out[:n]


def replies(path: str, prompts: list[list[dict]], sample: bool, max_new_tokens: int = 48, batch: int = 16) -> list[str]:
    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    out = []
    for i in range(0, len(prompts), batch):
        texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[i:i + batch]]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        extra = {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0} if sample else {"do_sample": False}
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **extra)
        out += [tok.decode(x[enc["input_ids"].shape[1]:], skip_special_tokens=True) for x in ids]
    return out


def judged(path: str, prompts: list[list[dict]]) -> dict:
    last = [[m for m in p if m["role"] == "user"][-1]["content"] for p in prompts]
    res = {}
    for mode in ("greedy", "sampled"):
        r = replies(path, prompts, mode == "sampled")
        s = [score(q, a) for q, a in zip(last, r)]
        res[mode] = {"judge_mean": round(sum(s) / len(s), 4), "scores": s, "examples": [[q, a] for q, a in list(zip(last, r))[:3]]}
    return res


def win_rate(a: list[float], b: list[float]) -> float:
    return round(sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a), 4)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "demo_sft.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    prompts = held_out_prompts()
    work = Path(tempfile.mkdtemp(prefix="demo-sft-"))
    base = build_demo_model(work / "base")
    result = {"prompts": len(prompts), "torch_threads": 2, "models": {"random": judged(str(base), prompts)}}
    for replies_set in SFT_REPLIES:
        seconds, digests = [], []
        for i in range(2):
            t = time.monotonic()
            out = build_demo_sft_model(work / f"{replies_set}-{i}", base, replies=replies_set)
            seconds.append(round(time.monotonic() - t, 1))
            digests.append(hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()[:16])
        result["models"][f"sft:{replies_set}"] = {"build_s": seconds, "same_bytes": digests[0] == digests[1], "sha256": digests[0],
                                                  **judged(str(out), prompts)}
    for p in args.policy:
        result["models"][p] = judged(p, prompts)
    for name, m in result["models"].items():
        if name.startswith("sft:"):
            continue
        for ref in SFT_REPLIES:
            m.setdefault("win_rate_over", {})[ref] = {mode: win_rate(m[mode]["scores"], result["models"][f"sft:{ref}"][mode]["scores"])
                                                      for mode in ("greedy", "sampled")}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for name, m in result["models"].items():
        print(name, {k: m[k] for k in ("build_s", "same_bytes") if k in m}, "greedy", m["greedy"]["judge_mean"],
              "sampled", m["sampled"]["judge_mean"], m.get("win_rate_over", ""))


if __name__ == "__main__":
    main()
