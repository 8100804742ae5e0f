"""Judges of replies for the evaluate stage: a Python function or a Hugging Face reward model, and the win rate.

Both are Ray Data callables (a batch of rows with `prompt_json` and `reply` in, `score` and `error` out); a row the
judge fails on keeps its error text (what raised, where) and a NaN score, and the stage decides what to do with it.
`prompt_json` is the prompt as prepared (dpo_ray.data: the messages before the reply, or a plain-text prompt): a
function gets the last user message as `prompt`, a reward model the whole conversation in its own chat template.
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


def load_function(spec: str):
    """'module:callable' -> the callable, or a JudgeError naming what is missing."""
    module, _, name = spec.partition(":")
    if "" not in sys.path and os.getcwd() not in sys.path:  # the `dpo-ray` script's sys.path lacks the directory it runs in;
        sys.path.append(os.getcwd())  # appended before ray.init, it reaches the local workers' sys.path too
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure of user code is reported as one line
        raise JudgeError(f"eval.judge.function {spec}: cannot import module {module!r} ({type(e).__name__}: {e}); it must be "
                         f"importable where the workers run: installed, on PYTHONPATH, or in the directory dpo-ray runs from") from None
    fn = getattr(mod, name, None)
    if not callable(fn):
        raise JudgeError(f"eval.judge.function {spec}: module {module} ({getattr(mod, '__file__', '?')}) has no callable {name!r}")
    return fn


def messages(prompt_json: str) -> list[dict]:
    """The prompt as chat messages (a plain-text prompt as one user message)."""
    p = json.loads(prompt_json)
    return [{"role": "user", "content": p}] if isinstance(p, str) else p


def last_user(prompt_json: str) -> str:
    """The prompt's last user message: the turn the reply answers."""
    users = [m["content"] for m in messages(prompt_json) if m.get("role") == "user"]
    return users[-1] if users else ""


def describe(e: BaseException) -> str:
    """'ValueError: bad (my_rules.py:12 in score)': what was raised and the innermost frame it came from."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" ({os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"{type(e).__name__}: {str(e)[:300]}{where}"


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
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        cuda = torch.cuda.is_available()
        if not cuda:
            torch.set_num_threads(threads or os.cpu_count() or 1)
        self.device = torch.device("cuda" if cuda else "cpu")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, token=token)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                path, dtype=torch.bfloat16 if cuda else torch.float32, trust_remote_code=trust_remote_code, token=token).eval().to(self.device)
        except (OSError, ValueError) as e:
            raise JudgeError(f"eval.judge.reward_model {path}: cannot load it as a sequence-classification model ({str(e).splitlines()[0][:200]})") from None
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


def verdict(policy: float, reference: float) -> float | None:
    """1 when the policy's reply scores higher, 0 when lower, 0.5 for a tie; None when either score is missing."""
    if not (math.isfinite(policy) and math.isfinite(reference)):
        return None
    return 1.0 if policy > reference else 0.0 if policy < reference else 0.5


def win_rate(policy: list[float], reference: list[float]) -> tuple[float, int]:
    """(the mean verdict over the prompts both replies were judged on, how many those are); NaN when none were."""
    v = [x for x in (verdict(p, r) for p, r in zip(policy, reference)) if x is not None]
    return (sum(v) / len(v) if v else float("nan")), len(v)
