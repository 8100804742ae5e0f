"""Per-sequence logps against an independent float64 computation and a plain transformers forward."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from dpo_ray import packing
from dpo_ray.forward import PolicyLogps
from dpo_ray.logps import sequence_logps
from dpo_ray.model import enable_activation_checkpointing


def float64_reference(logits, ids, mask):
    """Loop over every position, float64 log_softmax: the definition, written plainly."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    out = []
    for b in range(ids.shape[0]):
        out.append(sum(lp[b, t - 1, ids[b, t]].item() for t in range(1, ids.shape[1]) if mask[b, t]))
    return torch.tensor(out, dtype=torch.float64)


def test_sequence_logps_matches_float64():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 9, 50, generator=g) * 3
    ids = torch.randint(0, 50, (3, 9), generator=g)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0, 1]])
    logps, counts = sequence_logps(logits, ids, mask)
    torch.testing.assert_close(logps.double(), float64_reference(logits, ids, mask), atol=1e-5, rtol=1e-6)
    assert counts.tolist() == [3, 8, 1]


def test_sequence_logps_chunked_and_bf16():
    import dpo_ray.logps as L
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 40, 30, generator=g)
    ids = torch.randint(0, 30, (2, 40), generator=g)
    mask = (torch.rand(2, 40, generator=g) > 0.3).long()
    full, _ = sequence_logps(logits, ids, mask)
    old = L.CHUNK_TOKENS
    L.CHUNK_TOKENS = 7  # force several chunks
    try:
        chunked, _ = sequence_logps(logits, ids, mask)
    finally:
        L.CHUNK_TOKENS = old
    torch.testing.assert_close(chunked, full, atol=1e-5, rtol=0)
    ref = float64_reference(logits.bfloat16().float(), ids, mask)  # bf16 logits, fp32 math
    torch.testing.assert_close(sequence_logps(logits.bfloat16(), ids, mask)[0].double(), ref, atol=1e-4, rtol=1e-6)


def _tiny_model(arch: str = "llama", hidden: int = 32):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    if arch == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()  # attention bias on q/k/v, GQA
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def _ragged_batch():
    """Pairs that share a prompt, replies of different lengths; one pair whose replies also start alike, one
    whose rejected reply is a prefix of the chosen one, and one with nothing shared at all."""
    g = torch.Generator().manual_seed(2)
    rand = lambda n: torch.randint(1, 97, (n,), generator=g).tolist()  # noqa: E731
    rows = {"chosen_input_ids": [], "rejected_input_ids": [], "chosen_loss_mask": [], "rejected_loss_mask": []}

    def add(prompt, chosen, rejected):
        for key, reply in (("chosen", chosen), ("rejected", rejected)):
            rows[f"{key}_input_ids"].append(prompt + reply)
            rows[f"{key}_loss_mask"].append([0] * len(prompt) + [1] * len(reply))

    for n_prompt, n_c, n_r in [(5, 4, 9), (12, 3, 2), (2, 20, 6)]:
        add(rand(n_prompt), rand(n_c), rand(n_r))
    start = rand(3)
    add(rand(4), start + rand(5), start + rand(2))  # replies share their first 3 tokens
    reply = rand(6)
    add(rand(3), reply, reply[:4])  # the rejected sequence is a prefix of the chosen one
    rows["chosen_input_ids"].append([5, 6, 7, 8]); rows["chosen_loss_mask"].append([0, 0, 1, 1])  # noqa: E702
    rows["rejected_input_ids"].append([9, 6, 7]); rows["rejected_loss_mask"].append([0, 1, 1])  # noqa: E702  differ at token 0
    return rows


def _alone_float64(model, rows):
    """Each sequence on its own, no padding, the whole model in float64: the independent computation."""
    m64 = copy.deepcopy(model).double()
    seqs = rows["chosen_input_ids"] + rows["rejected_input_ids"]
    masks = rows["chosen_loss_mask"] + rows["rejected_loss_mask"]
    with torch.no_grad():
        return torch.stack([float64_reference(m64(input_ids=torch.tensor([s])).logits, torch.tensor([s]), torch.tensor([m]))[0]
                            for s, m in zip(seqs, masks)]), [sum(m[1:]) for m in masks]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("packed", ["packed", "packed-small-blocks", "packed-flex", "packed-varlen", "padded"])
@pytest.mark.parametrize("reply_only_head", [True, False], ids=["reply-head", "full-head"])
def test_every_fast_path_equals_plain_float64(arch, packed, reply_only_head, monkeypatch):
    if packed == "packed-small-blocks":  # attention blocks of a few pairs and of one long pair alone
        monkeypatch.setattr(packing, "BLOCK_TOKENS", 24)
    attention = {"packed-flex": "flex", "packed-varlen": "varlen"}.get(packed, "sdpa")
    packed = packed != "padded"
    model = _tiny_model(arch)
    rows = _ragged_batch()
    policy = PolicyLogps(model, reply_only_head=reply_only_head, packed=packed, attention=attention)
    assert policy.packed == packed and policy.reply_only_head == reply_only_head
    batch = policy.collate(rows, pad_id=0)
    with torch.no_grad():
        logps, counts = policy(batch)
    want, want_counts = _alone_float64(model, rows)
    torch.testing.assert_close(logps.double(), want, atol=2e-5, rtol=1e-6)
    assert counts.tolist() == want_counts
    seqs = rows["chosen_input_ids"] + rows["rejected_input_ids"]
    assert batch["tokens"] == sum(len(s) for s in seqs)
    if packed and attention == "varlen":  # one row, no mask at all: index tensors; the rule is checked in test_varlen_layout
        assert batch["attn_blocks"] is None and batch["flex_index"] is None and batch["varlen"]["cu_seq_q"][-1] == batch["positions"]
        assert batch["input_ids"].shape[0] == 1 and batch["positions"] == batch["input_ids"].shape[1] < batch["tokens"]
    elif packed and attention == "flex":  # one row, no dense mask; the block mask's rule is checked in test_flex_block_mask
        assert batch["attn_blocks"] is None and batch["flex_index"].shape == (3, batch["positions"])
        assert batch["input_ids"].shape[0] == 1 and batch["positions"] == batch["input_ids"].shape[1] < batch["tokens"]
    elif packed:  # no padding, and the shared prefixes are computed once
        sizes = [n for _, n, _ in batch["attn_blocks"]]
        assert sizes == [batch["positions"]] if packing.BLOCK_TOKENS > 100 else (len(sizes) >= 4 and max(sizes) > packing.BLOCK_TOKENS)
        assert batch["input_ids"].shape[0] == 1 and batch["positions"] == batch["input_ids"].shape[1] < batch["tokens"]
    else:
        assert batch["positions"] == batch["input_ids"].numel() > batch["tokens"]


def test_flex_block_mask_is_the_dense_mask():
    """The FlexAttention rule, evaluated densely, equals the SDPA path's per-block boolean masks (one block here)."""
    from torch.nn.attention.flex_attention import create_mask

    rows = _ragged_batch()
    dense = packing.pack_pairs(rows, "sdpa")
    index = packing.pack_pairs(rows, "flex")["flex_index"]
    (_, n, want), = dense["attn_blocks"]
    block_mask = packing.flex_block_mask(index)
    got = create_mask(block_mask.mask_mod, None, None, n, n, device="cpu")[0, 0]
    assert got.shape == want.shape and torch.equal(got, want)
    assert block_mask.shape[-2:] == (n, n)


@pytest.mark.parametrize("block_tokens", [192, 24])
def test_device_built_block_masks_equal_the_host_ones(block_tokens, monkeypatch):
    """sdpa's block masks built from the O(N) index on a device (here the CPU) equal the host-built dense ones."""
    monkeypatch.setattr(packing, "BLOCK_TOKENS", block_tokens)
    rows = _ragged_batch()
    host, dev = packing.pack_pairs(rows, "sdpa")["attn_blocks"], packing.pack_pairs(rows, "sdpa", mask_device="cpu")["attn_blocks"]
    assert len(host) == len(dev) >= (1 if block_tokens > 100 else 4)
    for (a, n, m), (b, k, d) in zip(host, dev):
        assert (a, n) == (b, k) and d.dtype == torch.bool and torch.equal(m, d)


def test_varlen_layout_is_the_dense_mask():
    """What each query of the varlen layout sees (its sequence's keys, causal from the bottom right, mapped back to row
    positions through kv_index) is the SDPA path's dense mask: chosen causal over itself, a rejected tail over the
    shared prefix and itself; the sequences are [P+c, r] queries and [P+c, P+r] keys per pair."""
    rows = _ragged_batch()
    (_, n, want), = packing.pack_pairs(rows, "sdpa")["attn_blocks"]
    v = packing.pack_pairs(rows, "varlen")["varlen"]
    got = torch.zeros(n, n, dtype=torch.bool)
    for q0, q1, k0, k1 in v["segments"]:
        keys = v["kv_index"][k0:k1]
        for i in range(q1 - q0):
            got[q0 + i, keys[: i + 1 + (k1 - k0) - (q1 - q0)]] = True
    assert torch.equal(got, want)
    assert v["cu_seq_q"].dtype == v["cu_seq_k"].dtype == torch.int32 and v["cu_seq_q"][-1] == n
    lens_q, lens_k = v["cu_seq_q"].diff().tolist(), v["cu_seq_k"].diff().tolist()
    assert v["max_q"] == max(lens_q) and v["max_k"] == max(lens_k) and v["kv_index"].numel() == v["cu_seq_k"][-1]
    c, r = rows["chosen_input_ids"][0], rows["rejected_input_ids"][0]  # first pair: prompt 5, replies 4 and 9
    assert lens_q[:2] == [len(c), 9] and lens_k[:2] == [len(c), len(r)]


def test_varlen_kwargs_follow_the_kernel_signature():
    """torch 2.12+ (window_size, scale, enable_gqa) and an older varlen_attn (is_causal; no scale, no enable_gqa)."""
    new = {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale", "window_size", "enable_gqa"}
    assert packing.varlen_kwargs(new, 0.125, 64, gqa=True) == ({"window_size": (-1, 0), "scale": 0.125, "enable_gqa": True}, 1.0, False)
    old = {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal"}
    kwargs, factor, repeat = packing.varlen_kwargs(old, 0.1, 64, gqa=True)
    assert kwargs == {"is_causal": True} and repeat and abs(factor - 0.1 * 8) < 1e-12
    assert packing.varlen_kwargs(old, None, 64, gqa=False) == ({"is_causal": True}, 1.0, False)


@pytest.mark.parametrize("chunk", [1024, 5], ids=["one-chunk", "many-chunks"])
def test_reply_head_keeps_at_most_one_chunk_of_logits(chunk, monkeypatch):
    """The reply-only head's gradient equals a plain (N, V) computation's, and what it saves for backward holds
    no (N, V) tensor when the reply spans several chunks: logits are recomputed one chunk at a time."""
    import dpo_ray.logps as L

    monkeypatch.setattr(L, "CHUNK_TOKENS", chunk)
    g = torch.Generator().manual_seed(3)
    N, H, V = 23, 16, 301
    hidden = torch.randn(N, H, generator=g, dtype=torch.float64).requires_grad_()
    head = torch.nn.Linear(H, V, bias=True).double()
    targets = torch.randint(0, V, (N,), generator=g)
    weights = torch.linspace(-1, 1, N, dtype=torch.float64)
    plain = torch.log_softmax(head(hidden), -1).gather(-1, targets[:, None]).squeeze(-1)
    want = torch.autograd.grad((plain * weights).sum(), [hidden, head.weight, head.bias])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.data_ptr(), t.shape)) or t, lambda t: t):
        got_logps = L.linear_logps(hidden, head.weight, head.bias, targets)
    got = torch.autograd.grad((got_logps * weights).sum(), [hidden, head.weight, head.bias])
    torch.testing.assert_close(got_logps, plain.float(), atol=1e-5, rtol=1e-6)  # fp32 log-softmax of float64 logits
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    logits_kept = sum(s.numel() for _, s in set(saved) if len(s) == 2 and s[1] == V and s[0] != H)  # distinct (n, V) tensors: not W.T
    assert 0 < logits_kept <= min(chunk, N) * V, (saved, chunk)


@pytest.mark.parametrize("attention", ["sdpa", "flex", "varlen"])
def test_packed_gradients_match_padded_plain_path(attention):
    """Packed + reply-only head, with and without gradient checkpointing, against the padded full-logits path."""
    rows = _ragged_batch()
    grads, saved = [], []
    for packed, fast, checkpointing in ((True, True, False), (True, True, True), (False, False, False)):
        model = _tiny_model().train()
        if checkpointing:
            enable_activation_checkpointing(model)
        policy = PolicyLogps(model, reply_only_head=fast, packed=packed, attention=attention)
        kept = []  # bytes the forward saves for backward

        def keep(t):
            kept.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logps, _ = policy(policy.collate(rows, pad_id=0))
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()  # weights of both signs, as in the DPO loss
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        saved.append(sum(kept))
    torch.testing.assert_close(grads[0], grads[2], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grads[1], grads[2], atol=1e-5, rtol=1e-4)
    assert saved[1] < 0.5 * saved[0], saved  # checkpointing keeps layer inputs only, recomputes the rest in backward


def test_packed_model_still_runs_ordinary_padded_calls_and_saves_plainly(tmp_path):
    model = _tiny_model()
    ids = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 10, 0, 0]])
    attn = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=attn).logits
        PolicyLogps(model)  # switches the model to the packed attention
        after = model(input_ids=ids, attention_mask=attn).logits
    assert model.config._attn_implementation == "dpo_ray_packed"
    torch.testing.assert_close(after[attn.bool()], before[attn.bool()], atol=1e-6, rtol=1e-6)
    model.save_pretrained(tmp_path)
    assert "dpo_ray_packed" not in (tmp_path / "config.json").read_text()  # a saved model loads anywhere
