"""Per-sequence logps against an independent float64 computation and a plain transformers forward."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dpo_ray.forward import PolicyLogps, pad_pairs
from dpo_ray.logps import sequence_logps


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


def _tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def _ragged_batch():
    g = torch.Generator().manual_seed(2)
    rows = {"chosen_input_ids": [], "rejected_input_ids": [], "chosen_loss_mask": [], "rejected_loss_mask": []}
    for n_prompt, n_c, n_r in [(5, 4, 9), (12, 3, 2), (2, 20, 6)]:
        prompt = torch.randint(0, 97, (n_prompt,), generator=g).tolist()
        for key, n in (("chosen", n_c), ("rejected", n_r)):
            rows[f"{key}_input_ids"].append(prompt + torch.randint(0, 97, (n,), generator=g).tolist())
            rows[f"{key}_loss_mask"].append([0] * n_prompt + [1] * n)
    return rows


def test_policy_logps_fast_path_equals_plain_forward_and_unpadded():
    model = _tiny_model()
    rows = _ragged_batch()
    batch = pad_pairs(rows, pad_id=0)
    with torch.no_grad():
        fast, counts = PolicyLogps(model)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        plain_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        want_padded = float64_reference(plain_logits, batch["input_ids"], batch["loss_mask"])
        # each sequence alone, no padding at all
        seqs = rows["chosen_input_ids"] + rows["rejected_input_ids"]
        masks = rows["chosen_loss_mask"] + rows["rejected_loss_mask"]
        alone = [float64_reference(model(input_ids=torch.tensor([s])).logits, torch.tensor([s]), torch.tensor([m]))[0] for s, m in zip(seqs, masks)]
    assert PolicyLogps(model).reply_only_head
    torch.testing.assert_close(fast.double(), want_padded, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(fast.double(), torch.stack(alone), atol=1e-4, rtol=1e-6)
    assert counts.tolist() == [sum(m) for m in masks]


def test_gradients_match_plain_path():
    model = _tiny_model().train()
    batch = pad_pairs(_ragged_batch(), pad_id=0)
    grads = []
    for fast in (True, False):
        model.zero_grad()
        logps, _ = PolicyLogps(model, reply_only_head=fast)(batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
        logps.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
