"""What every benchmark row shares: the model and tokenizer, the data sets, tokenization, memory and timing helpers.

Data sets (MiniMind chat-format JSONL, written under the work directory):
- demo:   the bundled demo pairs (short, similar lengths);
- skewed: generated pairs whose prompt and reply lengths follow a long-tailed (log-normal) law, capped so a
          sequence fits max_length: mostly short, a few long, as real preference data is. Words come from the
          demo corpus, so the demo tokenizer covers them.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
from pathlib import Path

from dpo_ray.demo import DEMO_DATA, build_demo_model


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux: ru_maxrss is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_gpu_mb() -> float | None:
    """Peak allocated CUDA memory of this process (None without CUDA)."""
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() and torch.cuda.is_initialized() else None


MODELS = ("tiny", "qwen-0.5b", "qwen-1.5b")
QWEN = {  # Qwen2.5 shapes: hidden, layers, heads, KV heads, MLP; vocab 151936, tied embeddings
    "qwen-0.5b": (896, 24, 14, 2, 4864),
    "qwen-1.5b": (1536, 28, 12, 2, 8960),
}


def model_dir(work: Path, name: str = "tiny") -> Path:
    """A model and tokenizer, built offline once under `work`:
    tiny:      the demo's tiny Llama (hidden 128, 4 layers, vocab 2048) and its BPE tokenizer;
    qwen-0.5b: Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads / 2 KV heads, MLP 4864, vocab 151936, tied
               embeddings; 494M parameters) with random weights, and the demo tokenizer (its ids are a subset);
    qwen-1.5b: Qwen2.5-1.5B's shape (hidden 1536, 28 layers, 12 / 2 heads, MLP 8960; 1.54B parameters), likewise."""
    tiny = work / "tiny-llama"
    if not (tiny / "config.json").exists():
        build_demo_model(tiny)
    if name == "tiny":
        return tiny
    if name not in QWEN:
        raise SystemExit(f"unknown model {name!r}; choose one of {MODELS}")
    out = work / f"qwen2-{name.split('-')[1]}-random"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        tok = AutoTokenizer.from_pretrained(tiny)
        hidden, layers, heads, kv_heads, mlp = QWEN[name]
        config = Qwen2Config(vocab_size=151936, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=131072,
                             rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
        torch.manual_seed(0)
        Qwen2ForCausalLM(config).save_pretrained(out)
        tok.save_pretrained(out)
    return out


def flops_model(path: Path) -> dict:
    """What the FLOP count needs: N = the parameters every token multiplies through (all but the input embedding;
    the LM head counted once, tied or not), layers and hidden size (for the attention term)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb = model.get_input_embeddings().weight
    total = sum(p.numel() for p in model.parameters())  # tied weights are listed once
    head = config.vocab_size * config.hidden_size
    tied = model.get_output_embeddings().weight is emb
    return {"params": total, "N": total - emb.numel() + (head if tied else 0),
            "layers": config.num_hidden_layers, "hidden": config.hidden_size}


def model_flops_of(path: Path):
    """dpo_ray.flops.ModelFlops of the model in `path` (built on the meta device: no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from dpo_ray.flops import ModelFlops

    with torch.device("meta"):
        return ModelFlops.of(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)))


def train_flops_per_token(m: dict, seq_len: float) -> float:
    """6N per token for forward + backward, plus attention (PaLM's count: 12 * layers * hidden * sequence length)."""
    return 6 * m["N"] + 12 * m["layers"] * m["hidden"] * seq_len


def forward_flops_per_token(m: dict, seq_len: float) -> float:
    return 2 * m["N"] + 4 * m["layers"] * m["hidden"] * seq_len


def _words() -> list[str]:
    words = []
    with open(DEMO_DATA, encoding="utf-8") as f:
        for line in f:
            for m in json.loads(line)["chosen"]:
                words += m["content"].split()
    return words


def _text(rng: random.Random, words: list[str], n: int) -> str:
    start = rng.randrange(len(words) - n) if len(words) > n else 0
    return " ".join(words[start : start + n])


def write_skewed(path: Path, n: int = 3000, max_words: int = 360, seed: int = 7, prompt_median: int = 20,
                 reply_median: int = 30, sigma: float = 1.0) -> Path:
    """Long-tailed lengths: prompt ~ 20 words median, replies ~ 30 words median (log-normal, sigma 1.0), a total cap of
    `max_words` words per sequence (about 1.3 tokens a word here). Chosen and rejected lengths are drawn independently."""
    if path.exists():
        return path
    rng, words = random.Random(seed), _words()
    draw = lambda median: max(1, int(rng.lognormvariate(math.log(median), sigma)))  # noqa: E731
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            p = min(draw(prompt_median), max_words // 2)
            prompt = [{"role": "user", "content": _text(rng, words, p)}]
            c, r = (min(draw(reply_median), max_words - p) for _ in range(2))
            row = {"chosen": prompt + [{"role": "assistant", "content": _text(rng, words, c)}],
                   "rejected": prompt + [{"role": "assistant", "content": _text(rng, words, r)}]}
            f.write(json.dumps(row) + "\n")
    return path


def write_long(path: Path, n: int = 300) -> Path:
    """Sequences near 1024 tokens: prompt and replies ~ 330 words median (log-normal, sigma 0.3), at most 780 words a
    sequence: for the GPU rows at max_length 1024 (longer ones are cut, prompt first, as in training)."""
    return write_skewed(path, n=n, max_words=780, seed=9, prompt_median=330, reply_median=330, sigma=0.3)


def datasets(work: Path) -> dict[str, Path]:
    return {"demo": DEMO_DATA, "skewed": write_skewed(work / "data" / "skewed.jsonl"), "long": write_long(work / "data" / "long.jsonl")}


def tokenized_pairs(data: Path, tokenizer_dir: Path, max_length: int, max_prompt_length: int) -> list[dict]:
    """Every valid line tokenized by dpo-ray's own row code (chat template, masks on the final reply + EOS)."""
    from dpo_ray.data import Reject, decode_line, to_pair, tokenize_pair, validate
    from dpo_ray.model import load_tokenizer

    tok = load_tokenizer(str(tokenizer_dir))
    out = []
    with open(data, "rb") as f:
        for raw in f:
            try:
                pair = to_pair(decode_line(raw.rstrip(b"\n")))  # every layout prepare reads
                validate(pair)
                out.append(tokenize_pair(tok, pair, max_length=max_length, prompt_budget=max_prompt_length))
            except Reject:
                continue
    return out


def set_threads(n: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
