"""Replies to held-out prompts: batched Hugging Face `generate` with the KV cache and left padding, greedy or sampled.

Used by the evaluate stage for the trained policy and the reference (pipeline/generate.py). The prompts are the
prepared rows' own prompt tokens (the chat template rendered with its generation prompt, cut to
data.max_prompt_length), so a model is asked exactly what it was trained to answer. A reply ends at EOS or at the
template's end-of-turn token, whichever the tokenizer has (stop_token_ids); the stop token is not part of it.

Each batch is generated as one call on a fixed set of prompts, seeded with (seed, batch index) when sampling: the
same settings give the same table, however Ray Data spreads the batches over actors.
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import torch

from .model import load_model, load_tokenizer

END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


@dataclass(frozen=True)
class Settings:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0

    def key(self) -> dict:
        """What the reply depends on besides the model and the prompt (part of the reference generations' cache key)."""
        d = asdict(self)
        if not self.do_sample:  # greedy: the sampling knobs change nothing
            d = {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return d


def settings_of(g) -> Settings:
    """Settings from the config's eval.generate section."""
    return Settings(g.max_new_tokens, g.do_sample, g.temperature, g.top_p, g.seed)


def stop_token_ids(tokenizer, model_config=None) -> list[int]:
    """EOS, the end-of-turn tokens of common chat templates that this vocabulary has, and the model's own EOS ids."""
    ids = [tokenizer.eos_token_id]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in END_OF_TURN if t in vocab and t in tokenizer.all_special_tokens + list(tokenizer.added_tokens_encoder)]
    eos = getattr(getattr(model_config, "generation_config", None) or model_config, "eos_token_id", None) if model_config else None
    ids += eos if isinstance(eos, list) else [eos] if eos is not None else []
    return sorted({int(i) for i in ids if i is not None})


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, longest), the prompts right-aligned: a batch's replies all start at one column."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def cut_at_stop(tokens: list[int], stop_ids: list[int]) -> tuple[list[int], bool]:
    """(the reply's tokens before its first stop token, whether it stopped there rather than at max_new_tokens)."""
    stops = set(stop_ids)
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i], True
    return tokens, False


def generate(model, prompts: list[list[int]], pad_id: int, stop_ids: list[int], s: Settings, batch_index: int = 0) -> list[tuple[list[int], bool]]:
    """One batched generate call: per prompt (reply tokens, stopped). Greedy unless s.do_sample; sampling is seeded with
    (s.seed, batch_index), so a batch's replies do not depend on what ran before it."""
    device = next(model.parameters()).device
    ids, mask = left_pad(prompts, pad_id)
    kwargs = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=0) if s.do_sample else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    if s.do_sample:
        torch.manual_seed(s.seed * 1_000_003 + batch_index)
    with torch.inference_mode():
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=s.max_new_tokens,
                             eos_token_id=stop_ids, pad_token_id=pad_id, use_cache=True, **kwargs)
    new = out[:, ids.shape[1]:].tolist()
    return [cut_at_stop(row, stop_ids) for row in new]


class Generator:
    """A Ray Data actor class: each input row is one batch of prompts (row_ids, prompt_ids lists, batch_index), each
    output row one reply, with `<prefix>reply`, `<prefix>tokens` (its length in tokens), `<prefix>stopped` and the
    batch's generate seconds. The model is loaded once per actor; bf16 weights on CUDA when training uses bf16."""

    def __init__(self, model_path: str, tokenizer_path: str, prefix: str, settings: dict, trust_remote_code: bool = False,
                 token: str | None = None, bf16: bool = False, threads: int | None = None):
        cuda = torch.cuda.is_available()
        if not cuda:
            torch.set_num_threads(threads or os.cpu_count() or 1)
        dtype = torch.bfloat16 if cuda and bf16 else torch.float32
        self.model = load_model(model_path, trust_remote_code, dtype=dtype, token=token).eval().to("cuda" if cuda else "cpu")
        self.tokenizer = load_tokenizer(tokenizer_path, trust_remote_code, token)
        self.stop_ids = stop_token_ids(self.tokenizer, self.model)
        self.settings, self.prefix = Settings(**settings), prefix

    def __call__(self, batch: dict) -> dict:
        out = {"row_id": [], f"{self.prefix}reply": [], f"{self.prefix}tokens": [], f"{self.prefix}stopped": [], "seconds": []}
        for row_ids, prompts, index in zip(batch["row_ids"], batch["prompt_ids"], batch["batch_index"]):
            t0 = time.perf_counter()
            replies = generate(self.model, [list(p) for p in prompts], self.tokenizer.pad_token_id, self.stop_ids, self.settings, int(index))
            seconds = time.perf_counter() - t0
            for row_id, (tokens, stopped) in zip(row_ids, replies):
                out["row_id"].append(str(row_id))
                out[f"{self.prefix}reply"].append(self.tokenizer.decode(tokens, skip_special_tokens=True).strip())
                out[f"{self.prefix}tokens"].append(len(tokens))
                out[f"{self.prefix}stopped"].append(stopped)
                out["seconds"].append(seconds / len(replies))
        return out
