"""The embedded default: a generated preference dataset, a BPE tokenizer and a tiny Llama, all offline.

`python -m dpo_ray.demo` rewrites dpo_ray/demo_data/pairs.jsonl (deterministic; the file ships with
the package). The tokenizer (byte-level BPE trained on those pairs, ChatML template) and a randomly
initialised ~4M-parameter Llama are built on first use into <cache_dir>/models/ (<output_dir>/models/
when cache_dir is an object-store URI: a model must be a local directory), in HF format, so
they serve as policy and reference and anyone can load them with `from_pretrained`.

demo:tiny-llama-sft (configs/demo.yaml's policy and reference) is that Llama after a short supervised pass
(build_demo_sft_model: one epoch over the pairs' chosen replies, loss on the reply and its EOS, 125 steps of 32, about
20-25 s on 2 CPUs, seeded and on 2 threads: the same bytes each build), so the demo starts, as real DPO does, from a
model that writes sentences: its greedy replies score 0.98 with the demo's rule judge (dpo_ray.demo_judge), the random
model's 0.20. Built once into <cache_dir>/models/demo-tiny-llama-sft-<DEMO_MODEL_VERSION>-<DEMO_SFT_VERSION>, from
the random model's directory. replies="chosen+rejected" trains on both replies (twice the time).

What DPO should learn: chosen replies are on-topic, polite and informative; rejected ones are rude,
refusing, repetitive, curt, about another subject, or state a wrong fact.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

log = logging.getLogger("dpo_ray")

DEMO_DATA = Path(__file__).parent / "demo_data" / "pairs.jsonl"
DEMO_MODEL_VERSION = "v1"  # bump when the builder changes: it is part of the cache key
DEMO_SFT_VERSION = "v1"  # the same for the SFT pass (build_demo_sft_model); the random model's version is in its key too
SFT_REPLIES = ("chosen", "chosen+rejected")

ENTITIES = {
    "animal": [
        ("the fox", "a small wild animal with a bushy tail that hunts at night"),
        ("the owl", "a bird that sees well in the dark and turns its head far around"),
        ("the whale", "the largest animal in the sea and it breathes air"),
        ("the bee", "an insect that makes honey and carries pollen between flowers"),
        ("the camel", "an animal that can walk for days in the desert without water"),
        ("the penguin", "a bird that cannot fly but swims very well in cold water"),
        ("the elephant", "a large animal with a long trunk and a very good memory"),
        ("the octopus", "a sea animal with eight arms that can change its colour"),
        ("the horse", "a strong animal that people have ridden for thousands of years"),
        ("the frog", "an animal that starts life in water as a tadpole"),
        ("the bat", "a flying animal that finds its way with sound"),
        ("the turtle", "an animal with a hard shell that can live a long time"),
    ],
    "fruit": [
        ("the apple", "a crisp fruit that grows on trees in cool places"),
        ("the banana", "a long yellow fruit that is soft and sweet"),
        ("the lemon", "a sour yellow fruit used in drinks and cooking"),
        ("the mango", "a sweet tropical fruit with a large flat seed"),
        ("the grape", "a small round fruit that grows in bunches on vines"),
        ("the cherry", "a small red fruit with a single hard stone"),
        ("the pear", "a sweet fruit that is narrow at the top"),
        ("the orange", "a round citrus fruit full of juice"),
    ],
    "planet": [
        ("Mercury", "the smallest planet and the closest one to the Sun"),
        ("Venus", "the hottest planet because its thick air traps heat"),
        ("Mars", "a cold red planet with the tallest volcano we know"),
        ("Jupiter", "the largest planet and it is made mostly of gas"),
        ("Saturn", "a gas planet with wide bright rings of ice"),
        ("Neptune", "a distant blue planet with very strong winds"),
    ],
    "instrument": [
        ("the piano", "an instrument with keys that strike strings inside a wooden case"),
        ("the violin", "a small string instrument played with a bow"),
        ("the drum", "an instrument you hit to make a beat"),
        ("the flute", "a wind instrument you play by blowing across a hole"),
        ("the guitar", "a string instrument you strum or pluck with your fingers"),
        ("the trumpet", "a brass instrument with three valves and a bright sound"),
    ],
    "tool": [
        ("the hammer", "a tool with a heavy head used to drive nails"),
        ("the saw", "a tool with a toothed blade used to cut wood"),
        ("the ladder", "a tool with steps that helps you reach high places"),
        ("the compass", "a tool whose needle points north"),
        ("the microscope", "a tool that makes very small things look large"),
        ("the telescope", "a tool that makes distant things like stars look closer"),
    ],
}
CATEGORY_LINE = {
    "animal": "Many people enjoy watching it in nature.",
    "fruit": "It is healthy and tasty to eat.",
    "planet": "It travels around the Sun like the Earth does.",
    "instrument": "Musicians play it all around the world.",
    "tool": "It makes many jobs much easier.",
}
ASK = [
    "Tell me about {e}.", "What is {e}?", "Can you explain what {e} is?", "I want to learn about {e}.",
    "Please describe {e}.", "What do you know about {e}?", "Give me a short fact about {e}.", "Teach me something about {e}.",
]
FOLLOW = ["And what about {e}?", "Thanks. Now tell me about {e}.", "Great. What is {e}?"]
SYSTEM = ["You are a helpful assistant.", "You are a friendly teacher who gives short clear answers."]
GOOD = [
    "{E} is {t}. {c}", "Sure! {E} is {t}. {c}", "Good question. {E} is {t}.", "{E} is {t}. I hope this helps!",
]
RUDE = [
    "That is a stupid question. Ask someone else.", "Why should I tell you? Go look it up yourself.",
    "Ugh, not this again. Figure it out.", "Stop bothering me with boring questions.",
]
REFUSE = ["I cannot help with that.", "Sorry, I do not want to answer this.", "I will not talk about that topic."]
CURT = ["Yes.", "No idea.", "Maybe.", "Whatever.", "It is a thing."]


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _pair(rng: random.Random, all_items: list) -> dict:
    cat, name, trait = rng.choice(all_items)
    question = rng.choice(ASK).format(e=name)
    good = rng.choice(GOOD).format(E=_cap(name), t=trait, c=CATEGORY_LINE[cat])
    kind = rng.choices(["rude", "refuse", "repeat", "curt", "off_topic", "wrong_fact"], [25, 20, 20, 10, 15, 10])[0]
    if kind == "rude":
        bad = rng.choice(RUDE)
    elif kind == "refuse":
        bad = rng.choice(REFUSE)
    elif kind == "repeat":
        bad = " ".join([name] * rng.randint(4, 9))
    elif kind == "curt":
        bad = rng.choice(CURT)
    elif kind == "off_topic":
        other = rng.choice([x for x in all_items if x[1] != name])
        bad = rng.choice(GOOD).format(E=_cap(other[1]), t=other[2], c=CATEGORY_LINE[other[0]])
    else:  # the right name with another subject's fact
        other = rng.choice([x for x in all_items if x[1] != name])
        bad = rng.choice(GOOD).format(E=_cap(name), t=other[2], c=CATEGORY_LINE[cat])
    prompt = []
    if rng.random() < 0.2:
        prompt.append({"role": "system", "content": rng.choice(SYSTEM)})
    if rng.random() < 0.2:  # multi-turn: an earlier exchange, then the real question as a follow-up
        pcat, pname, ptrait = rng.choice(all_items)
        prompt += [
            {"role": "user", "content": rng.choice(ASK).format(e=pname)},
            {"role": "assistant", "content": f"{_cap(pname)} is {ptrait}."},
        ]
        question = rng.choice(FOLLOW).format(e=name)
    prompt.append({"role": "user", "content": question})
    return {
        "chosen": prompt + [{"role": "assistant", "content": good}],
        "rejected": prompt + [{"role": "assistant", "content": bad}],
    }


def generate_pairs(n: int = 4000, seed: int = 1234) -> list[dict]:
    rng = random.Random(seed)
    all_items = [(cat, name, trait) for cat, items in ENTITIES.items() for name, trait in items]
    return [_pair(rng, all_items) for _ in range(n)]


def write_pairs(path: Path = DEMO_DATA, n: int = 4000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in generate_pairs(n):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int = 2048):
    """A byte-level BPE trained on `texts`, with ChatML special tokens and template; EOS = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None, unk_token=None)
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_demo_model(out_dir: Path, data_path: Path = DEMO_DATA, seed: int = 0) -> Path:
    """Write tokenizer + randomly initialised tiny Llama (HF format, safetensors) to out_dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-off build of a 1M-parameter model needs no bar

    texts = []
    with open(data_path, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts += [m["content"] for m in row["chosen"]] + [row["rejected"][-1]["content"]]
    tokenizer = build_tokenizer(texts)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def sft_examples(tokenizer, data_path: Path = DEMO_DATA, replies: str = "chosen", max_length: int = 256) -> list[tuple[list[int], list[int]]]:
    """(input_ids, loss_mask) of each demo conversation ending in its chosen reply (and its rejected one for
    replies="chosen+rejected"), tokenized as the DPO data is (dpo_ray.data.tokenize_pairs): the chat template, the
    mask over the last assistant reply and its EOS."""
    from .data import tokenize_pairs

    if replies not in SFT_REPLIES:
        raise ValueError(f"replies must be one of {SFT_REPLIES}, got {replies!r}")
    with open(data_path, encoding="utf-8") as f:
        pairs = [(row["chosen"], row["rejected"]) for row in map(json.loads, f)]
    rows = tokenize_pairs(tokenizer, pairs, max_length, max_length // 2)
    sides = ("chosen", "rejected") if replies == "chosen+rejected" else ("chosen",)
    return [(row[f"{s}_input_ids"], row[f"{s}_loss_mask"]) for row in rows if isinstance(row, dict) for s in sides]


def sft_batch(examples: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded input_ids, attention_mask and labels (-100 outside the loss mask) of a few examples."""
    import torch

    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, mask) in enumerate(examples):
        ids[i, :len(x)] = torch.tensor(x)
        attention[i, :len(x)] = 1
        labels[i, :len(x)] = torch.tensor([t if m else -100 for t, m in zip(x, mask)])
    return ids, attention, labels


def build_demo_sft_model(out_dir: Path, base_dir: Path, data_path: Path = DEMO_DATA, replies: str = "chosen",
                         epochs: int = 1, batch_size: int = 32, lr: float = 3e-3, seed: int = 0, threads: int = 2,
                         log_every_s: float = 5.0) -> Path:
    """The demo SFT model: the tiny Llama in `base_dir` (build_demo_model) after a supervised pass over the demo
    conversations (sft_examples: loss on the reply + EOS only), written with its tokenizer to out_dir.

    Deterministic: seeded weights order and batches, `threads` torch threads (restored after), fp32, no dropout: the
    same bytes each build on one machine. AdamW, linear warmup over 5% of the steps, cosine decay to 10% of lr."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    start = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    examples = sft_examples(tokenizer, data_path, replies)
    rng = random.Random(seed)
    batches = []
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        batches += [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    total, warmup = len(batches), max(1, len(batches) // 20)
    log.info("building demo:tiny-llama-sft: a supervised pass of %s over %d demo replies (%s), %d steps of %d, into %s",
             base_dir, len(examples), replies, total, batch_size, out_dir)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(seed)
        model = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                                  0.1 + 0.45 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup))))
        loop_start = last_log = time.monotonic()
        for step, idx in enumerate(batches, 1):
            ids, attention, labels = sft_batch([examples[i] for i in idx], tokenizer.pad_token_id)
            loss = model(input_ids=ids, attention_mask=attention, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()
            now = time.monotonic()
            if now - last_log >= log_every_s or step == total:
                last_log = now
                log.info("demo SFT: step %d/%d | loss %.3f | %.0fs | ETA %.0fs", step, total, loss.item(), now - start,
                         (now - loop_start) / step * (total - step))
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    finally:
        torch.set_num_threads(threads_before)
    log.info("built demo:tiny-llama-sft in %.1fs (final loss %.3f)", time.monotonic() - start, loss.item())
    return out_dir


if __name__ == "__main__":
    print(f"wrote {write_pairs()}")
