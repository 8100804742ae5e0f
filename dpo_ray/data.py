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


def _reply_span(full: str, prompt_text: str, reply: str) -> tuple[int, int]:
    """Character span of the reply text in the rendered conversation: the first occurrence after the rendered prompt."""
    start = full.find(reply, len(prompt_text) if full.startswith(prompt_text) else 0)
    if start < 0:
        reply = reply.strip()
        start = full.rfind(reply)
    if start < 0:
        raise Reject("template_error", "the chat template does not render the reply text verbatim")
    return start, start + len(reply)


def _split_at_reply(ids: list[int], offsets: list[tuple[int, int]], span: tuple[int, int], eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids + EOS): the prompt is every token before the first one touching the reply text.

    The template's end-of-turn token when it is EOS (ChatML's <|im_end|>); where a template closes the turn
    otherwise we still score EOS, so the model learns to stop. Tokens after the reply are dropped."""
    start, end = span
    first = next(i for i, (s, e) in enumerate(offsets) if e > start)  # first token touching the reply
    last = max(i for i, (s, e) in enumerate(offsets) if s < end)  # last token touching the reply
    return ids[:first], ids[first : last + 1] + [eos_id]


def truncate(prompt_ids: list[int], reply_ids: list[int], max_length: int, prompt_budget: int) -> tuple[list[int], list[int], bool]:
    """Cut the prompt from the left (to prompt_budget) and then the reply from the right to fit max_length."""
    cut = False
    if len(prompt_ids) + len(reply_ids) > max_length and len(prompt_ids) > prompt_budget:
        prompt_ids, cut = prompt_ids[-prompt_budget:], True
    room = max_length - len(prompt_ids)
    if len(reply_ids) > room:
        reply_ids, cut = reply_ids[: max(room, 0)], True
    return prompt_ids, reply_ids, cut


def tokenize_pairs(tokenizer, pairs: list[tuple[list[dict], list[dict]]], max_length: int, prompt_budget: int) -> list[dict | Reject]:
    """Validated pairs -> one prepared row (ids int lists, masks 0/1 lists, flags) or one Reject per pair.

    Uses the template's own rendering: the prompt is everything up to where the reply text starts in the
    rendered conversation (so a template's own assistant header, e.g. MiniMind's empty <think> block, stays
    prompt), the mask covers the reply and EOS. Chosen and rejected share their prompt turns (validate_pair),
    so the prompt is rendered once per pair, and the whole batch is one call of the (Rust) tokenizer.
    `prompt_not_prefix` flags a pair whose rendered prompt (with generation prompt) is not a token prefix of
    the rendered conversation: a template quirk worth a warning.
    """
    texts, plans = [], []
    for chosen, rejected in pairs:
        try:
            prompt_text = render(tokenizer, chosen[:-1], True)
            fulls = [render(tokenizer, conv, False) for conv in (chosen, rejected)]
            spans = [_reply_span(full, prompt_text, conv[-1]["content"]) for full, conv in zip(fulls, (chosen, rejected))]
        except Reject as r:
            plans.append(r)
            continue
        plans.append((len(texts), spans))
        texts += [prompt_text, *fulls]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
    out: list[dict | Reject] = []
    for plan in plans:
        if isinstance(plan, Reject):
            out.append(plan)
            continue
        i, spans = plan
        prefix_ids = enc["input_ids"][i]
        row: dict = {"truncated": False, "prompt_not_prefix": False}
        for j, name in ((1, "chosen"), (2, "rejected")):
            ids = enc["input_ids"][i + j]
            p, r = _split_at_reply(ids, enc["offset_mapping"][i + j], spans[j - 1], tokenizer.eos_token_id)
            row["prompt_not_prefix"] |= ids[: len(prefix_ids)] != prefix_ids
            p, r, cut = truncate(p, r, max_length, prompt_budget)
            if not r:
                row = Reject("no_reply_after_truncation", f"no {name} reply token fits in data.max_length={max_length}")
                break
            row[f"{name}_input_ids"] = p + r
            row[f"{name}_loss_mask"] = [0] * len(p) + [1] * len(r)
            row["truncated"] |= cut
            row.setdefault("prompt_tokens", len(p))
        out.append(row)
    return out


def tokenize_pair(tokenizer, chosen: list[dict], rejected: list[dict], max_length: int, prompt_budget: int) -> dict:
    """One validated pair -> the prepared row (see tokenize_pairs). Raises Reject."""
    row = tokenize_pairs(tokenizer, [(chosen, rejected)], max_length, prompt_budget)[0]
    if isinstance(row, Reject):
        raise row
    return row
