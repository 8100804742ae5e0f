"""Judges of replies for the evaluate stage, and the win rate.

Pointwise judges score one reply (a Python function, a Hugging Face reward model): Ray Data callables, a batch of
rows with `prompt_json` and `reply` in, `score` and `error` out. Pairwise judges say which of two replies is better
(a Python function, a Hugging Face chat model asked through its chat template): rows with `prompt_json`, `a`, `b` in,
`p_a` (the probability that `a` is the better one) and `error` out; the caller asks in both orders and averages, so
a judge that prefers a position gains nothing (pipeline/generate.py). A row the judge fails on keeps its error text
(what raised, where) and a NaN, and the stage decides what to do with it. `prompt_json` is the prompt as prepared
(dpo_ray.data: the messages before the reply, or a plain-text prompt): a function gets the last user message as
`prompt`, a reward model the whole conversation in its own chat template, a pairwise model the conversation as text
in pairwise_prompt.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import traceback

from .errors import UserError


class JudgeError(UserError, RuntimeError):
    """A judge that cannot be loaded, or that failed on too many prompts."""


def load_function(spec: str, key: str = "function"):
    """'module:callable' -> the callable, or a JudgeError naming what is missing (as eval.judge.<key>)."""
    module, _, name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the `dpo-ray` script's sys.path lacks the directory it runs in;
        sys.path.append(os.getcwd())  # appended before ray.init, it reaches the local workers' sys.path too
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported as one line
        raise JudgeError(f"eval.judge.{key} {spec}: cannot import module {module!r} ({type(e).__name__}: {e}); it must be "
                         f"importable where the workers run: installed, on PYTHONPATH, or in the directory dpo-ray runs from") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise JudgeError(f"eval.judge.{key} {spec}: module {module} ({getattr(mod, '__file__', '?')}) has no callable {name!r}")
    return fn


def messages(prompt_json: str) -> list[dict]:
    """The prompt as chat messages (a plain-text prompt as one user message)."""
    p = json.loads(prompt_json)
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def last_user(prompt_json: str) -> str:
    """The prompt's last user message: the turn the reply answers."""
    users = [m["content"] for m in messages(prompt_json) if m.get("role") == "user"]
    return users[-1] if users else ""


def conversation(prompt_json: str) -> str:
    """The prompt as a pairwise judge reads it: the last user message, preceded by the earlier turns as
    'role: content' lines when there are any."""
    turns = messages(prompt_json)
    if len(turns) == 1 and turns[0].get("role") == "user":
        return str(turns[0]["content"])
    return "\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in turns)


def describe(e: BaseException) -> str:
    """'ValueError: bad (my_rules.py:12 in score)': what was raised and the innermost frame it came from."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


def load_judge(auto_class, path: str, trust_remote_code: bool, token: str | None, threads: int | None, key: str, kind: str):
    """(tokenizer, model in eval mode on its device, device) of a model judge: bf16 on CUDA, fp32 on CPU with the
    actor's threads; a JudgeError naming `key` when it does not load as `kind`."""
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    if not cuda:
        torch.set_num_threads(threads or os.cpu_count() or 1)
    device = torch.device("cuda" if cuda else "cpu")
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, token=token)
        model = auto_class.from_pretrained(path, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust_remote_code,
                                           token=token).eval().to(device)
    except (OSError, ValueError) as e:
        raise JudgeError(f"{key} {path}: cannot load it as {kind} ({str(e).splitlines()[0][:200]})") from None
    return tok, model, device


class FunctionJudge:
    """fn(prompt: str, reply: str) -> float, per row; its own exceptions and non-finite results become row errors."""

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec)

    def __call__(self, batch: dict) -> dict:
        scores, errors = [], []
        for prompt_json, reply in zip(batch["prompt_json"], batch["reply"]):
            try:
                value = float(self.fn(last_user(str(prompt_json)), str(reply)))
                if not math.isfinite(value):
                    raise ValueError(f"returned {value}, not a finite number")
                scores.append(value)
                errors.append("")
            except Exception as e:  # noqa: BLE001 - a user function's failure is recorded per row
                scores.append(float("nan"))
                errors.append(describe(e))
        return {**{k: batch[k] for k in batch}, "score": scores, "error": errors}


class RewardModelJudge:
    """A sequence-classification reward model: the score is its first logit for (prompt, reply) rendered with the reward
    model's own chat template (plain concatenation without one), cut to max_length tokens from the left."""

    def __init__(self, path: str, trust_remote_code: bool = False, token: str | None = None, max_length: int = 4096, threads: int | None = None):
        from transformers import AutoModelForSequenceClassification

        self.tok, self.model, self.device = load_judge(AutoModelForSequenceClassification, path, trust_remote_code, token, threads,
                                                       "eval.judge.reward_model", "a sequence-classification model")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.tok.padding_side, self.tok.truncation_side = "right", "left"
        self.model.config.pad_token_id = self.tok.pad_token_id  # the score is read at each row's last real token
        self.max_length = min(max_length, getattr(self.tok, "model_max_length", max_length) or max_length)

    def text(self, prompt_json: str, reply: str) -> str:
        conv = messages(prompt_json) + [{"role": "assistant", "content": reply}]
        if self.tok.chat_template:
            return self.tok.apply_chat_template(conv, tokenize=False)
        return "\n".join(m["content"] for m in conv)

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["reply"])
        try:
            texts = [self.text(str(p), str(r)) for p, r in zip(batch["prompt_json"], batch["reply"])]
            enc = self.tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt", add_special_tokens=False)
            with torch.inference_mode():
                logits = self.model(**{k: v.to(self.device) for k, v in enc.items()}).logits
            scores, errors = logits[:, 0].float().cpu().tolist(), [""] * n
        except Exception as e:  # noqa: BLE001 - a failed batch marks its rows
            scores, errors = [float("nan")] * n, [describe(e)] * n
        return {**{k: batch[k] for k in batch}, "score": scores, "error": errors}


class PairwiseFunctionJudge:
    """fn(prompt: str, a: str, b: str) -> float in [0, 1] (the probability that a is better), per row; its exceptions
    and results outside [0, 1] become row errors."""

    def __init__(self, spec: str):
        self.spec, self.fn = spec, load_function(spec, "pairwise_function")

    def __call__(self, batch: dict) -> dict:
        out, errors = [], []
        for prompt_json, a, b in zip(batch["prompt_json"], batch["a"], batch["b"]):
            try:
                value = float(self.fn(last_user(str(prompt_json)), str(a), str(b)))
                if not 0.0 <= value <= 1.0:  # NaN fails this too
                    raise ValueError(f"returned {value}, not a probability in [0, 1]")
                out.append(value)
                errors.append("")
            except Exception as e:  # noqa: BLE001 - a user function's failure is recorded per row
                out.append(float("nan"))
                errors.append(describe(e))
        return {**{k: batch[k] for k in batch}, "p_a": out, "error": errors}


def label_ids(tokenizer, labels: tuple[str, str]) -> tuple[int, int]:
    """The token ids a pairwise model's next token is read at: each label's first token (alone or after a space, as
    the chat template leaves it, the tokenizer's encoding of the bare label). A JudgeError when they coincide."""
    ids = tuple(tokenizer.encode(label, add_special_tokens=False)[0] for label in labels)
    if ids[0] == ids[1]:
        raise JudgeError(f"eval.judge.pairwise_labels {list(labels)}: both start with the same token ({ids[0]}); choose labels "
                         f"the tokenizer encodes differently")
    return ids


class PairwiseModelJudge:
    """A causal chat model asked `template` (with {prompt}, {a}, {b}) as a user message through its chat template, with
    the generation prompt; the verdict is read from the next token's logits at the two labels:
    p_a = P(label a) / (P(label a) + P(label b)) = sigmoid(logit_a - logit_b). No sampling. Right padding: each row's
    logits are taken at its own last token, so a batch gives what one text alone gives. Cut from the left to max_length."""

    def __init__(self, path: str, template: str, labels: tuple[str, str] = ("A", "B"), trust_remote_code: bool = False,
                 token: str | None = None, max_length: int = 4096, threads: int | None = None):
        from transformers import AutoModelForCausalLM

        self.tok, self.model, self.device = load_judge(AutoModelForCausalLM, path, trust_remote_code, token, threads,
                                                       "eval.judge.pairwise_model", "a causal LM")
        if not self.tok.chat_template:
            raise JudgeError(f"eval.judge.pairwise_model {path}: its tokenizer has no chat template; a pairwise judge must be a chat model")
        if self.tok.pad_token_id is None:
            self.tok.pad_token = self.tok.eos_token
        self.template, self.ids = template, label_ids(self.tok, tuple(labels))
        self.max_length = min(max_length, getattr(self.tok, "model_max_length", max_length) or max_length)

    def tokens(self, prompt_json: str, a: str, b: str) -> list[int]:
        """The judge's input: the template filled in, as the one user turn, with the generation prompt; left-cut."""
        text = self.template.format(prompt=conversation(prompt_json), a=a, b=b)
        ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        return list(ids)[-self.max_length:]

    def __call__(self, batch: dict) -> dict:
        import torch

        n = len(batch["a"])
        try:
            rows = [self.tokens(str(p), str(a), str(b)) for p, a, b in zip(batch["prompt_json"], batch["a"], batch["b"])]
            width = max(len(r) for r in rows)
            ids = torch.full((n, width), self.tok.pad_token_id, dtype=torch.long)
            mask = torch.zeros((n, width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            last = logits[torch.arange(n), torch.tensor([len(r) - 1 for r in rows])].float()
            out, errors = torch.sigmoid(last[:, self.ids[0]] - last[:, self.ids[1]]).cpu().tolist(), [""] * n
        except Exception as e:  # noqa: BLE001 - a failed batch marks its rows
            out, errors = [float("nan")] * n, [describe(e)] * n
        return {**{k: batch[k] for k in batch}, "p_a": out, "error": errors}


def both_orders(p_first: float, p_second_a: float) -> float:
    """The probability that reply x is better from a pairwise judge asked twice: p_first = p_a with x shown as a,
    p_second_a = p_a with x shown as b. Averaged: a constant preference for a position cancels (identical replies read
    0.5 whatever the judge's bias)."""
    return (p_first + (1.0 - p_second_a)) / 2


def verdict(policy: float, reference: float) -> float | None:
    """1 when the policy's reply scores higher, 0 when lower, 0.5 for a tie; None when either score is missing."""
    if not (math.isfinite(policy) and math.isfinite(reference)):
        return None
    return 1.0 if policy > reference else 0.0 if policy < reference else 0.5


def win_rate(policy: list[float], reference: list[float]) -> tuple[float, int]:
    """(the mean verdict over the prompts both replies were judged on, how many those are); NaN when none were."""
    v = [x for x in (verdict(p, r) for p, r in zip(policy, reference)) if x is not None]
    return (sum(v) / len(v) if v else float("nan")), len(v)
