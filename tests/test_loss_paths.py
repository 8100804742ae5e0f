"""The loss inputs that read per-token values (LD-DPO's split sums, WPO's weights, sft's NLL) through the fast forward
paths, against full-vocabulary float64; packed vs padded gradients; batch-coupled losses (aot) over micro-batches."""
import copy
from contextlib import nullcontext

import pytest
import torch

import dpo_ray.logps as L
from dpo_ray.forward import PolicyLogps
from dpo_ray.losses import LOSS_TYPES, LossSpec
from dpo_ray.train_loop import coupled_step, loss_extras, micro_loss

from test_logps import _ragged_batch, _tiny_model


def float64_extras(model, rows):
    """Each sequence alone, the whole model in float64, full log_softmax: per sequence its reply sum, the sum over the
    first min(|chosen|, |rejected|) reply tokens, and WPO's mean of log p - log sum_v p_v^2."""
    m64 = copy.deepcopy(model).double()
    B = len(rows["chosen_input_ids"])
    per = []
    for ids, mask in zip(rows["chosen_input_ids"] + rows["rejected_input_ids"], rows["chosen_loss_mask"] + rows["rejected_loss_mask"]):
        with torch.no_grad():
            lp = torch.log_softmax(m64(input_ids=torch.tensor([ids])).logits[0], dim=-1)  # (T, V)
        tok = [(lp[t - 1, ids[t]].item(), torch.logsumexp(2 * lp[t - 1], dim=-1).item()) for t in range(1, len(ids)) if mask[t]]
        per.append(tok)
    out = {"total": [], "shared": [], "wpo": []}
    for s, tok in enumerate(per):
        n = min(len(per[s % B]), len(per[s % B + B]))
        out["total"].append(sum(a for a, _ in tok))
        out["shared"].append(sum(a for a, _ in tok[:n]))
        out["wpo"].append(sum(a - b for a, b in tok) / len(tok))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("reply_only_head", [True, False], ids=["reply-head", "full-head"])
def test_split_sums_and_wpo_weights_equal_full_vocabulary_float64(packed, reply_only_head, monkeypatch):
    monkeypatch.setattr(L, "CHUNK_TOKENS", 5)  # several chunks of the head
    model, rows = _tiny_model(), _ragged_batch()
    policy = PolicyLogps(model, reply_only_head=reply_only_head, packed=packed)
    with torch.no_grad():
        logps, _, extras = policy(policy.collate(rows, pad_id=0, extras=("shared", "wpo")))
    want = float64_extras(model, rows)
    torch.testing.assert_close(logps.double(), want["total"], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(extras["shared"].double(), want["shared"], atol=2e-5, rtol=1e-6)
    torch.testing.assert_close(extras["wpo"].double(), want["wpo"], atol=2e-6, rtol=1e-6)
    assert not torch.equal(extras["shared"], logps)  # some pairs have a tail


def _with_refs(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(rows["chosen_input_ids"])
    rc, rr = -40 * torch.rand(B, generator=g), -40 * torch.rand(B, generator=g)
    return {**rows, "ref_chosen_logps": rc.tolist(), "ref_rejected_logps": rr.tolist(),
            "ref_chosen_shared_logps": (0.7 * rc).tolist(), "ref_rejected_shared_logps": (0.6 * rr).tolist()}


def _grads(policy, groups, rows, spec):
    policy.zero_grad()
    tokens_per_pair = sum(sum(m[1:]) for m in rows["chosen_loss_mask"]) / len(rows["chosen_loss_mask"])
    sub = lambda idx: {k: [v[i] for i in idx] for k, v in rows.items()}  # noqa: E731
    batches = [policy.collate(sub(idx), 0, extras=loss_extras(spec)) for idx in groups]
    if spec.batch_coupled and len(groups) > 1:
        losses = coupled_step(policy, batches, spec, tokens_per_pair, nullcontext(), lambda last: nullcontext())[0]
    else:
        out = []
        for b in batches:
            loss, losses, *_ = micro_loss(policy, b, spec, len(rows["chosen_loss_mask"]), tokens_per_pair)
            loss.backward()
            out.append(losses.detach())
        losses = torch.cat(out)
    return losses, torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None]).clone()


def test_per_token_losses_packed_gradients_equal_padded():
    """WPO, LD-DPO and sft read per-token values: the packed path's gradient equals the padded path's."""
    rows = _with_refs(_ragged_batch())
    spec = LossSpec(types=("sigmoid", "sft"), weights=(1.0, 0.5), use_weighting=True, ld_alpha=0.4, beta=0.3)
    model = _tiny_model().train()
    whole = [list(range(len(rows["chosen_input_ids"])))]
    loss_p, g_packed = _grads(PolicyLogps(model, packed=True), whole, rows, spec)
    loss_d, g_padded = _grads(PolicyLogps(model, packed=False), whole, rows, spec)
    torch.testing.assert_close(loss_p, loss_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_packed, g_padded, rtol=1e-4, atol=1e-6)
    _, g_plain = _grads(PolicyLogps(model, packed=True), whole, rows, LossSpec(types=("sigmoid", "sft"), weights=(1.0, 0.5), beta=0.3))
    assert not torch.allclose(g_packed, g_plain, rtol=1e-3)  # the weights and the split changed the gradient


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_sorted_losses_over_micro_batches_equal_the_whole_step(loss_type):
    """aot sorts the step's pairs: split in micro-batches (two passes) it gives the whole step's loss and gradient."""
    rows = _with_refs(_ragged_batch(), seed=1)
    spec = LossSpec(types=(loss_type,), weights=(1.0,), label_smoothing=0.1, beta=0.5)
    policy = PolicyLogps(_tiny_model(), packed=True).train()
    n = len(rows["chosen_input_ids"])
    loss_whole, g_whole = _grads(policy, [list(range(n))], rows, spec)
    loss_split, g_split = _grads(policy, [[0, 3], [1, 4, 5], [2]], rows, spec)
    assert loss_split.mean().item() == pytest.approx(loss_whole.mean().item(), rel=1e-6)
    torch.testing.assert_close(g_split, g_whole, rtol=1e-4, atol=1e-6)
    # without the two passes, each micro-batch sorted alone, the gradient would differ
    policy.zero_grad()
    for idx in ([0, 3], [1, 4, 5], [2]):
        sub = {k: [v[i] for i in idx] for k, v in rows.items()}
        loss, *_ = micro_loss(policy, policy.collate(sub, 0), spec, n, 1.0)
        loss.backward()
    naive = torch.cat([p.grad.flatten() for p in policy.parameters() if p.grad is not None])
    assert not torch.allclose(naive, g_whole, rtol=1e-3)


@pytest.fixture(scope="module")
def demo_rows(demo_model):
    """32 demo pairs, tokenized as prepare does, with the demo model's own reference log-probs (the scorer, no Ray)."""
    import json

    import pyarrow as pa

    from dpo_ray.data import to_pair, tokenize_pairs
    from dpo_ray.demo import DEMO_DATA
    from dpo_ray.model import load_tokenizer
    from dpo_ray.packing import pair_tokens
    from dpo_ray.scoring import LogpsScorer

    with open(DEMO_DATA, encoding="utf-8") as f:
        pairs = [to_pair(json.loads(line)) for _, line in zip(range(32), f)]
    rows = tokenize_pairs(load_tokenizer(demo_model), pairs, max_length=96, prompt_budget=48)
    keys = ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")
    table = pa.table({k: [r[k] for r in rows] for k in keys})
    table = table.append_column("pair_tokens", pa.array(pair_tokens(table), pa.int32()))
    scored = LogpsScorer(demo_model, demo_model, "ref_")(table)
    return {k: scored[k].to_pylist() for k in scored.column_names if k != "pair_tokens"}


def _step_losses(policy, rows, spec, steps: int, lr: float = 3e-3):
    """Adam on batches of 8 of the 32 pairs in turn; the loss over all 32 (no grad) before and after."""
    n = len(rows["chosen_input_ids"])
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
    tpp = sum(sum(m[1:]) for m in rows["chosen_loss_mask"]) / n
    sub = lambda idx: {k: [v[i] for i in idx] for k, v in rows.items()}  # noqa: E731

    def full_loss():
        with torch.no_grad():
            return micro_loss(policy, policy.collate(rows, 0, extras=loss_extras(spec)), spec, n, tpp)[0].item()

    before = full_loss()
    for step in range(steps):
        idx = [(8 * step + j) % n for j in range(8)]
        loss, *_ = micro_loss(policy, policy.collate(sub(idx), 0, extras=loss_extras(spec)), spec, 8, tpp)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return before, full_loss()


SETTINGS = {"exo_pair": {"label_smoothing": 1e-3}, "robust": {"label_smoothing": 0.1}, "sigmoid": {"label_smoothing": 0.1}}


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_trains_the_demo_model_for_30_steps(loss_type, demo_model, demo_rows):
    from dpo_ray.model import load_model

    torch.manual_seed(0)
    policy = PolicyLogps(load_model(demo_model)).train()
    spec = LossSpec(types=(loss_type,), weights=(1.0,), beta=0.1, **SETTINGS.get(loss_type, {}))
    before, after = _step_losses(policy, demo_rows, spec, steps=30)
    assert after < before, (loss_type, before, after)


def test_mpo_wpo_ld_dpo_and_f_divergence_train_the_demo_model(demo_model, demo_rows):
    from dpo_ray.model import load_model

    torch.manual_seed(0)
    policy = PolicyLogps(load_model(demo_model)).train()
    spec = LossSpec(types=("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0), use_weighting=True, ld_alpha=0.5)
    before, after = _step_losses(policy, demo_rows, spec, steps=30)
    assert after < before
    policy = PolicyLogps(load_model(demo_model)).train()
    spec = LossSpec(types=("sigmoid", "hinge"), weights=(1.0, 0.5), f_divergence_type="js_divergence")
    before, after = _step_losses(policy, demo_rows, spec, steps=30)
    assert after < before
