"""Parse and validate preference rows (three layouts), render the chat template, build loss masks.

Pure Python over a `transformers` tokenizer: every row becomes either a tokenized pair or a
`Reject(reason, detail)`; nothing is dropped silently. Layouts accepted:
  chat      {"chosen": [{"role", "content"}, ...], "rejected": [...]}       (MiniMind; multi-turn)
  standard  {"prompt": str, "chosen": str, "rejected": str}  (prompt may also be a message list)
  sharegpt  {"conversations": [{"from", "value"}], "chosen": {"from","value"}, "rejected": {...}}
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


@dataclass
class Reject(Exception):
    reason: str  # a stable code, counted in stats
    detail: str  # a short human reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


# ---------------------------------------------------------------------------- parsing
def decode_line(raw: bytes) -> dict:
    """bytes of one JSONL line -> the JSON object. Raises Reject."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Reject("not_utf8", f"bytes that are not UTF-8 at offset {e.start}") from None
    text = text.lstrip("\ufeff").rstrip("\r\n")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise Reject("invalid_json", f"invalid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(obj, dict):
        raise Reject("not_an_object", f"a JSON {type(obj).__name__}, not an object")
    return obj


def _messages(value, field: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise Reject("bad_type", f"{field} must be a non-empty list of messages, got {type(value).__name__}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise Reject("bad_message", f"{field}[{i}] needs 'role' and 'content'")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise Reject("bad_message", f"{field}[{i}]: role must be one of {ROLES} and content a string")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _sharegpt_turn(value, field: str) -> dict:
    if not isinstance(value, dict) or "value" not in value or not isinstance(value["value"], str):
        raise Reject("bad_message", f"{field} needs 'from' and a string 'value'")
    role = SHAREGPT_ROLES.get(value.get("from", "gpt"))
    if role is None:
        raise Reject("bad_message", f"{field}: unknown 'from' {value.get('from')!r}")
    return {"role": role, "content": value["value"]}


def to_conversations(obj: dict) -> tuple[list[dict], list[dict]]:
    """Any accepted layout -> (chosen_messages, rejected_messages), each ending in the assistant reply."""
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise Reject("bad_type", "conversations must be a non-empty list")
        prompt = [_sharegpt_turn(m, f"conversations[{i}]") for i, m in enumerate(conv)]
        chosen, rejected = [_sharegpt_turn(obj.get(k), k) for k in ("chosen", "rejected")]
        return prompt + [chosen], prompt + [rejected]
    if "prompt" in obj:
        for k in ("chosen", "rejected"):
            if k not in obj:
                raise Reject("missing_key", f"missing key '{k}'")
            if not isinstance(obj[k], str):
                raise Reject("bad_type", f"'{k}' must be a string in the prompt/chosen/rejected layout")
        p = obj["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
        return prompt + [{"role": "assistant", "content": obj["chosen"]}], prompt + [{"role": "assistant", "content": obj["rejected"]}]
    for k in ("chosen", "rejected"):
        if k not in obj:
            raise Reject("missing_key", f"missing key '{k}' (expected chosen/rejected message lists, or prompt/chosen/rejected strings)")
    return _messages(obj["chosen"], "chosen"), _messages(obj["rejected"], "rejected")


def validate_pair(chosen: list[dict], rejected: list[dict]) -> None:
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        if conv[-1]["role"] != "assistant":
            raise Reject("no_final_reply", f"{name} does not end with an assistant reply")
        roles = [m["role"] for m in conv]
        body = roles[1:] if roles[0] == "system" else roles
        if not body or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(body)):
            raise Reject("role_order", f"{name}: roles must alternate user/assistant after an optional system message, got {roles}")
        if not conv[-1]["content"].strip():
            raise Reject("empty_reply", f"{name} reply is empty or whitespace")
    if chosen[:-1] != rejected[:-1]:
        raise Reject("prompt_mismatch", "chosen and rejected have different prompt turns")
    if chosen[-1]["content"] == rejected[-1]["content"]:
        raise Reject("identical_replies", "chosen and rejected replies are identical")


def pair_hash(chosen: list[dict], rejected: list[dict]) -> str:
    """Content hash of a pair: exact duplicates share it, and it picks the eval split stably."""
    return hashlib.sha256(json.dumps([chosen, rejected], ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------- tokenizing
def render(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def tokenize_reply(tokenizer, messages: list[dict]) -> tuple[list[int], list[int], bool]:
    """Token ids of (prompt, reply + EOS) for one conversation, using the template's own rendering.

    The prompt is everything up to where the reply text starts in the rendered conversation (so a
    template's own assistant header, e.g. MiniMind's empty <think> block, stays prompt). Returns
    (prompt_ids, reply_ids, prompt_is_prefix): the last flag is False when the rendered prompt with
    generation prompt is not a token prefix of the rendered conversation (a template quirk worth a warning).
    """
    full = render(tokenizer, messages, False)
    prompt_text = render(tokenizer, messages[:-1], True)
    reply = messages[-1]["content"]
    start = full.find(reply, len(prompt_text) if full.startswith(prompt_text) else 0)
    if start < 0:
        start = full.rfind(reply.strip())
        reply = reply.strip()
    if start < 0:
        raise Reject("template_error", "the chat template does not render the reply text verbatim")
    end = start + len(reply)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    first = next(i for i, (s, e) in enumerate(offsets) if e > start)  # first token touching the reply
    last = max(i for i, (s, e) in enumerate(offsets) if s < end)  # last token touching the reply
    prompt_ids, reply_ids = ids[:first], ids[first : last + 1]
    # The template's end-of-turn token when it is EOS (ChatML's <|im_end|>); where a template closes the
    # turn otherwise we still score EOS, so the model learns to stop. Tokens after it are dropped.
    reply_ids.append(tokenizer.eos_token_id)
    prefix_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    return prompt_ids, reply_ids, ids[: len(prefix_ids)] == prefix_ids


def truncate(prompt_ids: list[int], reply_ids: list[int], max_length: int, prompt_budget: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt from the left (to prompt_budget) and then the reply from the right to fit max_length."""
    cut = False
    if len(prompt_ids) + len(reply_ids) > max_length and len(prompt_ids) > prompt_budget:
        prompt_ids, cut = prompt_ids[-prompt_budget:], True
    room = max_length - len(prompt_ids)
    if len(reply_ids) > room:
        reply_ids, cut = reply_ids[: max(room, 0)], True
    return prompt_ids, reply_ids, cut


def tokenize_pair(tokenizer, chosen: list[dict], rejected: list[dict], max_length: int, prompt_budget: int) -> dict:
    """One validated pair -> the prepared row (ids int lists, masks 0/1 lists, flags)."""
    out: dict = {"truncated": False, "prompt_not_prefix": False}
    prompts = []
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        p, r, is_prefix = tokenize_reply(tokenizer, conv)
        p, r, cut = truncate(p, r, max_length, prompt_budget)
        if not r:
            raise Reject("no_reply_after_truncation", f"no {name} reply token fits in data.max_length={max_length}")
        out[f"{name}_input_ids"] = p + r
        out[f"{name}_loss_mask"] = [0] * len(p) + [1] * len(r)
        out["truncated"] |= cut
        out["prompt_not_prefix"] |= not is_prefix
        prompts.append(len(p))
    out["prompt_tokens"] = prompts[0]
    return out
