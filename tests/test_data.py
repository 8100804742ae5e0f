"""Row parsing, chat-template masks and truncation, on the demo tokenizer and MiniMind's real one."""
import json

import pytest

from conftest import SHARED
from dpo_ray.data import Reject, decode_line, to_pair, tokenize_pair, tokenize_pairs, truncate, validate_pair

MULTI_TURN = {
    "chosen": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
               {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is an owl?"},
               {"role": "assistant", "content": "A bird that sees well at night."}],
    "rejected": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                 {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "What is an owl?"},
                 {"role": "assistant", "content": "Go away."}],
}


def masked_text(tok, ids, mask):
    return tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def check_masks(tok, chosen, rejected):
    row = tokenize_pair(tok, chosen, rejected, max_length=4096, prompt_budget=2048)
    for name, conv in (("chosen", chosen), ("rejected", rejected)):
        ids, mask = row[f"{name}_input_ids"], row[f"{name}_loss_mask"]
        assert len(ids) == len(mask) and mask[0] == 0
        assert masked_text(tok, ids, mask) == conv[-1]["content"] + tok.eos_token
        first = mask.index(1)
        assert all(mask[first:]) and ids[-1] == tok.eos_token_id  # one contiguous reply span, ending in EOS
    assert row["chosen_input_ids"][: row["prompt_tokens"]] == row["rejected_input_ids"][: row["prompt_tokens"]]
    return row


def test_demo_tokenizer_masks_decode_to_reply_plus_eos(demo_tokenizer):
    row = check_masks(demo_tokenizer, MULTI_TURN["chosen"], MULTI_TURN["rejected"])
    assert not row["prompt_not_prefix"]
    # the earlier assistant turn ("Hello!") is prompt, not scored
    assert "Hello!" not in masked_text(demo_tokenizer, row["chosen_input_ids"], row["chosen_loss_mask"])


def test_minimind_template_think_block_stays_out_of_the_mask(minimind_tokenizer):
    tok = minimind_tokenizer
    row = check_masks(tok, MULTI_TURN["chosen"], MULTI_TURN["rejected"])
    full = tok.decode(row["chosen_input_ids"])
    assert full.endswith("<think>\n\n</think>\n\nA bird that sees well at night.<|im_end|>")  # the template's own rendering


@pytest.mark.parametrize("name", ["dpo_en_demo.json", "dpo_zh_demo.json"])
def test_real_sharegpt_pairs_mask_correctly(minimind_tokenizer, name):
    path = SHARED / "llamafactory" / name
    if not path.exists():
        pytest.skip(f"{path} absent")
    rows = json.loads(path.read_text(encoding="utf-8"))[:40]
    for obj in rows:
        pair = to_pair(obj)
        chosen, rejected = pair.chosen, pair.rejected
        validate_pair(chosen, rejected)
        check_masks(minimind_tokenizer, chosen, rejected)


def test_standard_layout_and_message_prompt():
    p = to_pair({"prompt": "2+2?", "chosen": "4", "rejected": "5"})
    c, r = p.chosen, p.rejected
    assert c == [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}] and r[-1]["content"] == "5"
    c = to_pair({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}).chosen
    assert [m["role"] for m in c] == ["system", "user", "assistant"]


def test_truncation_cuts_prompt_left_then_reply_right():
    p, r, cut = truncate(list(range(10)), [100, 101, 102, 103, 104], max_length=8, prompt_budget=4)
    assert p == [6, 7, 8, 9] and r == [100, 101, 102, 103] and cut
    p, r, cut = truncate([1, 2], [3, 4], max_length=8, prompt_budget=4)
    assert (p, r, cut) == ([1, 2], [3, 4], False)


def test_truncated_pair_keeps_masks_aligned(demo_tokenizer):
    long = {"role": "user", "content": "tell me " * 200}
    row = tokenize_pair(demo_tokenizer, [long, {"role": "assistant", "content": "word " * 100}],
                        [long, {"role": "assistant", "content": "no"}], max_length=64, prompt_budget=32)
    assert row["truncated"] and len(row["chosen_input_ids"]) == 64 and row["prompt_tokens"] == 32
    assert sum(row["chosen_loss_mask"]) == 32 and row["rejected_input_ids"][-1] == demo_tokenizer.eos_token_id


def test_batched_tokenizing_equals_one_pair_at_a_time(demo_tokenizer):
    """prepare tokenizes a whole batch in one call: each row must be what the pair alone gives, a reject in its place."""
    tok = demo_tokenizer
    hi = [{"role": "user", "content": "Hi"}]
    long = [{"role": "user", "content": "tell me about owls " * 40}]
    pairs = [(hi + [{"role": "assistant", "content": "Hello!"}], hi + [{"role": "assistant", "content": "Go away."}]),
             (long + [{"role": "assistant", "content": "Owls hunt at night."}], long + [{"role": "assistant", "content": "No."}]),
             (MULTI_TURN["chosen"], MULTI_TURN["rejected"])]
    max_length = max(len(tokenize_pair(tok, *p, 4096, 2048)[k]) for p in pairs[::2] for k in ("chosen_input_ids", "rejected_input_ids"))
    batch = tokenize_pairs(tok, pairs, max_length, prompt_budget=max_length)  # the long prompt fills everything
    assert isinstance(batch[1], Reject) and batch[1].reason == "no_reply_after_truncation"
    for pair, row in zip(pairs[::2], batch[::2]):
        assert row == tokenize_pair(tok, *pair, max_length, max_length) and not row["truncated"]
        for name, conv in zip(("chosen", "rejected"), pair):
            ids, mask = row[f"{name}_input_ids"], row[f"{name}_loss_mask"]
            assert masked_text(tok, ids, mask) == conv[-1]["content"] + tok.eos_token
            assert tok.decode(ids[: row["prompt_tokens"]]) == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("raw,reason", [
    (b"{not json", "invalid_json"),
    (b"[1, 2]", "not_an_object"),
    (b'{"chosen": []}', "missing_key"),
    (b"\xff\xfe{}", "not_utf8"),
])
def test_decode_rejects(raw, reason):
    with pytest.raises(Reject) as e:
        to_pair(decode_line(raw))
    assert e.value.reason == reason


def test_bom_and_crlf_are_accepted():
    obj = decode_line('\ufeff{"prompt": "q", "chosen": "a", "rejected": "b"}\r'.encode())
    assert obj["prompt"] == "q"


@pytest.mark.parametrize("chosen,rejected,reason", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], [{"role": "user", "content": "x"}, {"role": "assistant", "content": "b"}], "prompt_mismatch"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "identical_replies"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "empty_reply"),
    ([{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "a"}], [{"role": "assistant", "content": "q"}, {"role": "assistant", "content": "b"}], "role_order"),
    ([{"role": "user", "content": "q"}], [{"role": "user", "content": "q"}], "no_final_reply"),
])
def test_validate_rejects(chosen, rejected, reason):
    with pytest.raises(Reject) as e:
        validate_pair(chosen, rejected)
    assert e.value.reason == reason
