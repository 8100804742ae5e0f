"""The demo's SFT model (demo:tiny-llama-sft) and its rule judge (dpo_ray.demo_judge): the judge tells the demo's chosen
replies from its rejected ones and behaves on edge cases; the SFT model is built once, the same bytes each build, and
writes replies the judge scores well above the random model's. Real transformers models, greedy `generate`. Cheap: the
SFT build (about 20 s here) is the bulk; it lands in the session cache_dir, for any other test that wants it."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dpo_ray.demo import DEMO_DATA, ENTITIES, build_demo_sft_model, generate_pairs, sft_examples
from dpo_ray.demo_judge import asked_entity, rules, score

ROOT = Path(__file__).resolve().parent.parent


def last_user(messages: list[dict]) -> str:
    return [m for m in messages if m["role"] == "user"][-1]["content"]


def test_the_judge_scores_the_chosen_reply_above_the_rejected_one_on_the_demo_pairs():
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    scores = [(score(last_user(r["chosen"]), r["chosen"][-1]["content"]), score(last_user(r["rejected"]), r["rejected"][-1]["content"]))
              for r in rows]
    better = sum(c > r for c, r in scores) / len(scores)
    assert better >= 0.99, f"the judge prefers the chosen reply on only {better:.3f} of the pairs"  # 1.000 measured
    assert all(0.0 <= s <= 1.0 for pair in scores for s in pair)
    assert sum(c for c, _ in scores) / len(scores) > 0.99 and sum(r for _, r in scores) / len(scores) < 0.5


def test_the_judge_on_edge_cases():
    fox = "the fox is a small wild animal with a bushy tail that hunts at night"
    assert score("Tell me about the fox.", "") == score("Tell me about the fox.", "  \n") == 0.0
    assert score("Tell me about the fox.", fox.upper() + "!") == 1.0  # any case and punctuation
    # a follow-up asks about the entity it names last; the earlier one is context
    assert asked_entity("Thanks for the owl. Now tell me about the fox.") == "the fox"
    assert score("And what about the fox?", f"Sure! {fox}. Many people enjoy watching it in nature.") == 1.0
    owl = "The owl is a bird that sees well in the dark and turns its head far around."
    assert rules("And what about the fox?", owl) == {"polite": True, "not_repetitive": True, "on_topic": False, "right_fact": False}
    assert score("And what about the fox?", "The fox is a bird that sees well in the dark and turns its head far around.") == 0.75
    assert score("What is Mars?", "Mars Mars Mars Mars Mars") == 0.5  # on topic and polite, but a loop and no fact
    assert not rules("What is Mars?", "arsarsarsarsarsarsars")["not_repetitive"]
    assert score("What is the bee?", "That is a stupid question. Ask someone else.") == 0.25
    # two good replies tie; a prompt naming no demo entity is judged on politeness and repetition alone
    assert score("What is Mars?", "Mars is a cold red planet with the tallest volcano we know.") == \
        score("What is Mars?", "Good question. Mars is a cold red planet with the tallest volcano we know.") == 1.0
    assert rules("How are you?", "I am well, thank you.") == {"polite": True, "not_repetitive": True}
    assert score("How are you?", "Whatever.") == 0.5
    assert all(asked_entity(f"What is {name}?") == name.lower() for items in ENTITIES.values() for name, _ in items)


def test_the_judge_imports_no_ray_mlflow_or_torch():
    code = "import sys, dpo_ray.demo_judge; print(sorted({'torch', 'ray', 'mlflow', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_sft_examples_mask_the_prompt_and_keep_the_reply_and_eos(demo_tokenizer):
    chosen = sft_examples(demo_tokenizer, DEMO_DATA, "chosen")
    both = sft_examples(demo_tokenizer, DEMO_DATA, "chosen+rejected")
    rows = [json.loads(line) for line in DEMO_DATA.read_text().splitlines()]
    assert len(chosen) == len(rows) and len(both) == 2 * len(rows)
    for (ids, mask), reply in [(chosen[0], rows[0]["chosen"][-1]), (both[1], rows[0]["rejected"][-1]), (chosen[7], rows[7]["chosen"][-1])]:
        assert demo_tokenizer.decode([t for t, m in zip(ids, mask) if m]) == reply["content"] + "<|im_end|>"
        assert mask[:mask.index(1)] == [0] * mask.index(1) and all(mask[mask.index(1):])
    with pytest.raises(ValueError, match="replies must be one of"):
        sft_examples(demo_tokenizer, DEMO_DATA, "rejected")


def test_the_sft_build_is_the_same_bytes_each_time(demo_model, tmp_path):
    """A short build (128 pairs, 4 steps) twice: the same weights file; chosen+rejected trains on other examples."""
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(DEMO_DATA.read_text().splitlines(keepends=True)[:128]))
    a, b, c = (build_demo_sft_model(tmp_path / name, Path(demo_model), data, replies=replies)
               for name, replies in (("a", "chosen"), ("b", "chosen"), ("c", "chosen+rejected")))
    weights = [(d / "model.safetensors").read_bytes() for d in (a, b, c)]
    assert weights[0] == weights[1] != weights[2]
    assert (a / "tokenizer.json").read_bytes() == (Path(demo_model) / "tokenizer.json").read_bytes()


def generate(path: str, prompts: list[list[dict]], max_new_tokens: int = 48) -> list[str]:
    """Greedy replies, batched and left padded, the chat template with its generation prompt, stopping at <|im_end|>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return [tok.decode(ids[enc["input_ids"].shape[1]:], skip_special_tokens=True) for ids in out]


def test_the_sft_model_is_built_once_and_writes_replies_the_judge_scores_well(demo_model, cache_dir, caplog, tmp_path):
    from dpo_ray.model import ModelError, resolve_model

    if any(Path(demo_model).parent.glob("demo-tiny-llama-sft-*")):  # an earlier test built it: build it here again, to watch
        (tmp_path / "models").mkdir()
        os.symlink(demo_model, tmp_path / "models" / Path(demo_model).name)
        cache_dir = tmp_path
        demo_model = str(tmp_path / "models" / Path(demo_model).name)
    random_weights = (Path(demo_model) / "model.safetensors").read_bytes()
    with caplog.at_level(logging.INFO, logger="dpo_ray"):
        sft = resolve_model("demo:tiny-llama-sft", cache_dir)
    built = caplog.text
    assert "building demo:tiny-llama-sft" in built and "demo SFT: step 125/125" in built and "ETA" in built
    assert Path(sft).name.startswith("demo-tiny-llama-sft-") and Path(sft).parent == Path(demo_model).parent
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dpo_ray"):
        assert resolve_model("demo:tiny-llama-sft", cache_dir) == sft and resolve_model("demo:tiny-llama", cache_dir) == demo_model
    assert "demo SFT" not in caplog.text  # cached: not built again
    assert (Path(demo_model) / "model.safetensors").read_bytes() == random_weights  # the random model is left as it was
    with pytest.raises(ModelError, match="demo:tiny-llama, demo:tiny-llama-sft"):
        resolve_model("demo:tiny-llama-dpo", cache_dir)

    pairs = generate_pairs(16, seed=99)  # prompts in the demo's style, not the bundled pairs' (seed 1234)
    prompts = [p["chosen"][:-1] for p in pairs]
    means = {}
    for name, path in (("sft", sft), ("random", demo_model)):
        replies = generate(path, prompts)
        means[name] = sum(score(last_user(p), r) for p, r in zip(prompts, replies)) / len(replies)
    print(f"judge mean of 16 greedy replies: {means}")
    assert means["sft"] >= 0.85 and means["sft"] - means["random"] >= 0.4, means  # measured 1.00 and 0.17
