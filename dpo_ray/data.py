"""Parse and validate preference rows (six layouts), render the chat template, build loss masks.

Pure Python over a `transformers` tokenizer: every row becomes either a tokenized pair or a
`Reject(reason, detail)`; nothing is dropped silently. Layouts, detected per row (TRL's names):
  standard                 {"prompt": str, "chosen": str, "rejected": str}
  standard_implicit        {"chosen": str, "rejected": str}: the prompt is their common start
  conversational           {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
  conversational_implicit  {"chosen": [messages], "rejected": [messages]}: whole conversations (MiniMind)
  ultrafeedback            {"prompt": str, "chosen": [messages], "rejected": [messages]}: the conversations win
  sharegpt                 {"conversations": [{"from", "value"}], "chosen": {"from", "value"}, "rejected": {...}}
A pair is messages (rendered with the chat template) or, for string data without it, plain text.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
TRIED = ("tried: prompt/chosen/rejected strings or message lists, chosen/rejected strings or whole conversations, "
         "ShareGPT conversations/chosen/rejected")


@dataclass
class Reject(Exception):
    reason: str  # a stable code, counted in stats
    detail: str  # a short human reason

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


LAYOUTS = ("standard", "standard_implicit", "conversational", "conversational_implicit", "ultrafeedback", "sharegpt")


@dataclass
class Pair:
    """One preference pair: `chosen`/`rejected` message lists ending in the reply, or `text` = (prompt, chosen, rejected)
    strings tokenized as they are (no chat template)."""

    layout: str  # one of LAYOUTS
    chosen: list[dict] | None = None
    rejected: list[dict] | None = None
    text: tuple[str, str, str] | None = None


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


def common_start(chosen, rejected):
    """TRL's implicit prompt: the common start of the two (strings or message lists); a string split right after a
    space leaves the space with the replies."""
    n = min(len(chosen), len(rejected))
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), n)
    if isinstance(chosen, str) and 0 < idx < n and chosen[idx - 1] == " ":
        idx -= 1
    return idx


def map_columns(obj: dict, columns: dict[str, str]) -> dict:
    """data.columns: {prompt: question, chosen: response_j, rejected: response_k, system: sys} -> the standard keys.
    A system column becomes a system message before the prompt."""
    out = {key: obj[col] for key, col in columns.items() if col in obj and key != "system"}
    system = obj.get(columns["system"]) if columns.get("system") else None
    if system:
        if not isinstance(system, str):
            raise Reject("bad_type", f"system column '{columns['system']}' must be a string")
        p = out.get("prompt")
        if isinstance(p, str):
            out["prompt"] = [{"role": "user", "content": p}]
        if isinstance(out.get("prompt"), list):
            out["prompt"] = [{"role": "system", "content": system}] + out["prompt"]
    return out


def to_pair(obj: dict, columns: dict[str, str] | None = None, chat_template: bool = True) -> Pair:
    """Any accepted layout (detected from this row alone) -> a Pair. Raises Reject, naming the layouts tried."""
    if columns:
        obj = map_columns(obj, columns)
    if "conversations" in obj:
        conv = obj["conversations"]
        if not isinstance(conv, list) or not conv:
            raise Reject("bad_type", "conversations must be a non-empty list")
        prompt = [_sharegpt_turn(m, f"conversations[{i}]") for i, m in enumerate(conv)]
        if isinstance(obj.get("system"), str) and obj["system"] and prompt[0]["role"] != "system":
            prompt.insert(0, {"role": "system", "content": obj["system"]})  # LLaMA-Factory's system column
        chosen, rejected = [_sharegpt_turn(obj.get(k), k) for k in ("chosen", "rejected")]
        return Pair("sharegpt", prompt + [chosen], prompt + [rejected])
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise Reject("missing_key", f"missing key '{missing[0]}' (the row has {sorted(obj)[:8]}); {TRIED}")
    c, r, p = obj["chosen"], obj["rejected"], obj.get("prompt")
    if isinstance(c, str) and isinstance(r, str):
        if p is None:
            i = common_start(c, r)
            return Pair("standard_implicit", text=(c[:i], c[i:], r[i:]))
        if isinstance(p, str) and not chat_template:
            return Pair("standard", text=(p, c, r))
        if isinstance(p, (str, list)):
            prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _messages(p, "prompt")
            reply = lambda x: [{"role": "assistant", "content": x}]
            return Pair("standard" if isinstance(p, str) else "conversational", prompt + reply(c), prompt + reply(r))
    if isinstance(c, list) and isinstance(r, list):
        cm, rm = _messages(c, "chosen"), _messages(r, "rejected")
        if p is None:
            return Pair("conversational_implicit", cm, rm)
        if isinstance(p, list):
            pm = _messages(p, "prompt")
            return Pair("conversational", pm + cm, pm + rm)
        if isinstance(p, str) and cm[0]["role"] == "assistant":  # a prompt string and the reply as messages
            pm = [{"role": "user", "content": p}]
            return Pair("conversational", pm + cm, pm + rm)
        if isinstance(p, str):  # UltraFeedback: whole conversations that repeat the prompt
            users = [m["content"].strip() for m in cm[:-1] if m["role"] == "user"]
            if p.strip() not in users:
                raise Reject("prompt_mismatch", f"'prompt' differs from every user turn of the chosen conversation: {p[:80]!r}")
            return Pair("ultrafeedback", cm, rm)
    kind = lambda v: type(v).__name__
    raise Reject("unknown_layout", f"prompt/chosen/rejected are {kind(p) if 'prompt' in obj else 'absent'}/{kind(c)}/{kind(r)}; {TRIED}")


def validate(pair: Pair) -> None:
    """Raises Reject for a pair that cannot be trained on."""
    if pair.text is None:
        return validate_pair(pair.chosen, pair.rejected)
    prompt, chosen, rejected = pair.text
    if not prompt.strip():
        raise Reject("no_prompt", "chosen and rejected share no common start (the prompt)" if pair.layout == "standard_implicit"
                     else "the prompt is empty")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply.strip():
            raise Reject("empty_reply", f"{name} reply is empty or whitespace")
    if chosen == rejected:
        raise Reject("identical_replies", "chosen and rejected replies are identical")


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


def pair_hash(pair: Pair) -> str:
    """Content hash of a pair: exact duplicates share it, and it picks the eval split stably. Message pairs hash as
    [chosen, rejected] (as before the other layouts came); text pairs hash their three strings."""
    content = [pair.chosen, pair.rejected] if pair.text is None else ["text", *pair.text]
    return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:32]


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


def _bos(tokenizer) -> list[int]:
    """[BOS] when the tokenizer puts one before plain text (Llama), else [] (Qwen, GPT-2): what a base model saw in pretraining."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [bos] else []


def tokenize_pairs(tokenizer, pairs: list, max_length: int, prompt_budget: int) -> list[dict | Reject]:
    """Validated pairs (Pair, or (chosen, rejected) messages) -> one prepared row (ids int lists, masks 0/1 lists,
    flags) or one Reject per pair.

    Message pairs use the template's own rendering: the prompt is everything up to where the reply text starts in the
    rendered conversation (so a template's own assistant header, e.g. MiniMind's empty <think> block, stays prompt),
    the mask covers the reply and EOS. Chosen and rejected share their prompt turns (validate_pair), so the prompt is
    rendered once per pair. Text pairs (no chat template) are tokenized as TRL does: prompt and each reply on their
    own, the tokenizer's BOS (if it adds one) before the prompt, EOS after the reply. The whole batch is one call of
    the (Rust) tokenizer. `prompt_not_prefix` flags a message pair whose rendered prompt (with generation prompt) is
    not a token prefix of the rendered conversation: a template quirk worth a warning.
    """
    texts, plans = [], []
    for pair in pairs:
        pair = pair if isinstance(pair, Pair) else Pair("conversational", *pair)
        if pair.text is not None:
            plans.append((len(texts), None))
            texts += list(pair.text)
            continue
        try:
            prompt_text = render(tokenizer, pair.chosen[:-1], True)
            fulls = [render(tokenizer, conv, False) for conv in (pair.chosen, pair.rejected)]
            spans = [_reply_span(full, prompt_text, conv[-1]["content"]) for full, conv in zip(fulls, (pair.chosen, pair.rejected))]
        except Reject as r:
            plans.append(r)
            continue
        plans.append((len(texts), spans))
        texts += [prompt_text, *fulls]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True) if texts else {}
    bos = _bos(tokenizer) if any(plan[1] is None for plan in plans if not isinstance(plan, Reject)) else []
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
            if spans is None:  # plain text: prompt and reply tokenized apart
                p, r = bos + prefix_ids, ids + [tokenizer.eos_token_id]
            else:
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


def tokenize_pair(tokenizer, chosen, rejected=None, max_length: int = 512, prompt_budget: int = 256) -> dict:
    """One validated pair (a Pair, or chosen and rejected messages) -> the prepared row (see tokenize_pairs). Raises Reject."""
    row = tokenize_pairs(tokenizer, [chosen if isinstance(chosen, Pair) else (chosen, rejected)], max_length, prompt_budget)[0]
    if isinstance(row, Reject):
        raise row
    return row
