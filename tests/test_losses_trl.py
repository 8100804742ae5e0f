"""dpo-ray's losses against TRL 1.16's own code, on the same per-token log-probs, in float64.

TRL's `DPOTrainer._compute_loss` (trl/trainer/dpo_trainer.py) is called as it is, on a batch whose model and reference
model are stand-ins that return given per-token log-probs (the `fused_lm_head` outputs: log_probs, log_sum_sq_probs, ...):
the model is not what is under test, TRL's loss code is the oracle. dpo-ray computes from the same numbers what its
forward hands the loss: per-sequence sums, LD-DPO shared-part sums (logps.split_sums), WPO log-weights
(logps.wpo_log_weights), and then dpo_ray.losses.loss_terms. TRL returns the batch loss and logs batch-mean metrics, so
per-pair values are compared through one-pair batches.
ORPO is compared with trl/experimental/orpo's `odds_ratio_loss` and its NLL (the cross-entropy of the chosen tokens).
"""
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from dpo_ray.logps import split_sums, wpo_log_weights
from dpo_ray.losses import F_DIVERGENCE_LOSSES, SORTED_LOSSES, TRL_LOSS_TYPES, LossSpec, combine, ld_logps, loss_terms

DPOTrainer = pytest.importorskip("trl.trainer.dpo_trainer").DPOTrainer  # trl is in the test extra: CI always runs this


def make_batch(B: int, seed: int, T: int = 48, dtype=torch.float64) -> dict:
    """A padded TRL batch of B pairs [chosen; rejected] with per-token policy and reference log-probs (0 off the reply)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(2, 12, (B,), generator=g)
    lc, lr = torch.randint(1, 16, (B,), generator=g), torch.randint(1, 16, (B,), generator=g)
    lr[0] = lc[0]  # one pair of equal lengths: LD-DPO has no tail there
    completion = torch.zeros(2 * B, T, dtype=torch.long)
    attention = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(B):
        for row, n in ((i, lc[i]), (B + i, lr[i])):
            completion[row, prompt[i] : prompt[i] + n] = 1
            attention[row, : prompt[i] + n] = 1
    shift = completion[:, 1:].to(dtype)
    lp = -3 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) * shift
    ref = (lp - 0.4 * torch.randn(2 * B, T - 1, generator=g, dtype=dtype)).clamp(max=0) * shift
    lsq = -2 * torch.rand(2 * B, T - 1, generator=g, dtype=dtype) * shift  # log sum_v p_v^2 per position
    return {"input_ids": torch.randint(3, 100, (2 * B, T), generator=g) * attention, "attention_mask": attention,
            "completion_mask": completion, "lp": lp, "ref": ref, "lsq": lsq}


def trl_loss(batch: dict, **settings) -> tuple[float, dict]:
    """TRL 1.16's _compute_loss on this batch: (loss, the batch means it logs)."""
    B2, T = batch["input_ids"].shape
    out = SimpleNamespace(log_probs=batch["lp"], log_sum_sq_probs=batch["lsq"], entropy=torch.zeros(B2, T - 1, dtype=batch["lp"].dtype),
                          mean_logits=torch.zeros(B2, T - 1, dtype=batch["lp"].dtype), is_top1=torch.zeros(B2, T - 1, dtype=torch.bool))
    s = {"loss_type": ["sigmoid"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
         "f_alpha_divergence_coef": 0.5, "use_weighting": False, "ld_alpha": None, "discopop_tau": 0.05, **settings}
    policy = torch.nn.Module()  # only its .training and .is_gradient_checkpointing are read
    policy.is_gradient_checkpointing = False
    fake = SimpleNamespace(
        model=policy,
        ref_model=lambda **kw: SimpleNamespace(log_probs=batch["ref"]),
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x),
        aux_loss_enabled=False, precompute_ref_logps=False, ld_alpha=s["ld_alpha"], f_divergence_type=s["f_divergence_type"],
        f_alpha_divergence_coef=s["f_alpha_divergence_coef"], loss_types=list(s["loss_type"]),
        loss_weights=s["loss_weights"] or [1.0] * len(s["loss_type"]), beta=s["beta"], label_smoothing=s["label_smoothing"],
        use_weighting=s["use_weighting"], args=SimpleNamespace(discopop_tau=s["discopop_tau"], gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "completion_mask")}
    default = torch.get_default_dtype()
    torch.set_default_dtype(batch["lp"].dtype)  # TRL builds exo_pair's epsilon with torch.tensor(): in the batch's precision
    try:
        loss = DPOTrainer._compute_loss(fake, lambda **kw: out, inputs, False)
    finally:
        torch.set_default_dtype(default)
    return float(loss), {k: v[-1] for k, v in fake._metrics["train"].items()}


def ours(batch: dict, **settings):
    """dpo-ray on the same numbers: (per-pair loss, terms, chosen rewards, rejected rewards, the spec)."""
    s = {"loss_type": ["sigmoid"], "loss_weights": None, "beta": 0.1, "label_smoothing": 0.0, "f_divergence_type": "reverse_kl",
         "f_alpha_divergence_coef": 0.5, "use_weighting": False, "ld_alpha": None, "discopop_tau": 0.05, **settings}
    spec = LossSpec(types=tuple(s["loss_type"]), weights=tuple(s["loss_weights"] or [1.0] * len(s["loss_type"])), beta=s["beta"],
                    label_smoothing=s["label_smoothing"], discopop_tau=s["discopop_tau"], f_divergence_type=s["f_divergence_type"],
                    f_alpha_divergence_coef=s["f_alpha_divergence_coef"], use_weighting=s["use_weighting"], ld_alpha=s["ld_alpha"])
    mask = batch["completion_mask"][:, 1:].bool()
    seq = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask]
    counts = mask.sum(1)
    rank = torch.cat([torch.arange(int(n)) for n in counts])
    B = mask.shape[0] // 2
    per = {}
    for who in ("lp", "ref"):
        tok = batch[who][mask]
        total = tok.new_zeros(2 * B).index_add(0, seq, tok)
        per[who] = ld_logps(total, split_sums(tok, seq, rank, counts), spec.ld_alpha), total
    w = wpo_log_weights(batch["lp"][mask], batch["lsq"][mask], seq, counts).exp()
    (pol, nll), (ref, _) = per["lp"], per["ref"]
    terms, cr, rr = loss_terms(spec, pol[:B], pol[B:], ref[:B], ref[B:], counts[:B], counts[B:], nll_chosen=nll[:B],
                               wc=w[:B] if spec.use_weighting else None, wr=w[B:] if spec.use_weighting else None)
    return combine(spec, terms), terms, cr, rr, spec


def pair(batch: dict, i: int) -> dict:
    B = batch["input_ids"].shape[0] // 2
    return {k: v[[i, B + i]] for k, v in batch.items()}


SMOOTHING = {"robust": 0.1, "exo_pair": 1e-3, "aot": 0.1, "aot_unpaired": 0.1}  # the losses TRL 1.x reads label_smoothing in


@pytest.mark.parametrize("loss_type", TRL_LOSS_TYPES)
def test_each_loss_type_equals_trl(loss_type):
    batch = make_batch(8, seed=1)
    settings = {"loss_type": [loss_type], "beta": 0.3, "label_smoothing": SMOOTHING.get(loss_type, 0.0)}
    trl, trl_metrics = trl_loss(batch, **settings)
    losses, _, cr, rr, _ = ours(batch, **settings)
    assert losses.mean().item() == pytest.approx(trl, rel=1e-9, abs=1e-12)
    assert cr.mean().item() == pytest.approx(trl_metrics["rewards/chosen"], rel=1e-9, abs=1e-12)
    assert (cr - rr).mean().item() == pytest.approx(trl_metrics["rewards/margins"], rel=1e-9, abs=1e-12)
    if loss_type in SORTED_LOSSES or loss_type == "sft":
        return  # a pair's term depends on the batch: the batch value above is what TRL defines
    for i in range(8):  # per pair: TRL on a one-pair batch
        one, m = trl_loss(pair(batch, i), **settings)
        assert losses[i].item() == pytest.approx(one, rel=1e-9, abs=1e-12)
        assert cr[i].item() == pytest.approx(m["rewards/chosen"], rel=1e-9, abs=1e-12)
        assert rr[i].item() == pytest.approx(m["rewards/rejected"], rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_each_f_divergence_equals_trl(divergence):
    """Every loss that takes an f-divergence, as one weighted list; alpha_divergence in float32 (TRL's clamp table has
    no float64 entry), the others in float64."""
    dtype = torch.float32 if divergence == "alpha_divergence" else torch.float64
    batch = make_batch(8, seed=2, dtype=dtype)
    types = sorted(F_DIVERGENCE_LOSSES - {"sigmoid"})  # with label_smoothing > 0 (exo_pair needs it) sigmoid is cDPO: below
    settings = {"loss_type": types, "loss_weights": [0.5 + 0.25 * k for k in range(len(types))], "label_smoothing": 1e-3,
                "f_divergence_type": divergence, "f_alpha_divergence_coef": 0.3, "beta": 0.2}
    trl, _ = trl_loss(batch, **settings)
    losses, *_ = ours(batch, **settings)
    tol = 1e-6 if dtype == torch.float32 else 1e-9
    assert losses.mean().item() == pytest.approx(trl, rel=tol)
    plain, *_ = ours(batch, **{**settings, "f_divergence_type": "reverse_kl"})
    assert abs(plain.mean().item() - trl) > 1e-4  # the divergence changed the loss
    sigmoid = {**settings, "loss_type": ["sigmoid"], "loss_weights": None, "label_smoothing": 0.0}
    for i in (0, 3):
        one, _ = trl_loss(pair(batch, i), **sigmoid)
        assert ours(pair(batch, i), **sigmoid)[0].item() == pytest.approx(one, rel=tol)


def test_wpo_weighting_equals_trl():
    """WPO over every loss TRL lets it weight: all but the sorted ones, and but sft, on which TRL 1.16 raises (it multiplies
    an expanded tensor in place); dpo-ray weights each pair's NLL there, checked against the formula."""
    batch = make_batch(8, seed=3)
    types = [t for t in TRL_LOSS_TYPES if t not in SORTED_LOSSES | {"sft", "sigmoid"}]  # sigmoid: cDPO with eps, below
    settings = {"loss_type": types, "label_smoothing": 1e-3, "use_weighting": True, "beta": 0.5}
    trl, _ = trl_loss(batch, **settings)
    losses, terms, *_ = ours(batch, **settings)
    assert losses.mean().item() == pytest.approx(trl, rel=1e-9)
    for t in ("sigmoid", "apo_down"):
        one, _ = trl_loss(batch, **{**settings, "loss_type": [t], "label_smoothing": 0.0})
        assert ours(batch, **{**settings, "loss_type": [t], "label_smoothing": 0.0})[0].mean().item() == pytest.approx(one, rel=1e-9)
    unweighted, *_ = ours(batch, **{**settings, "use_weighting": False})
    assert abs(unweighted.mean().item() - trl) > 1e-3
    with pytest.raises(RuntimeError, match="memory location"):
        trl_loss(batch, loss_type=["sft"], use_weighting=True)
    _, terms, *_ = ours(batch, loss_type=["sft"], use_weighting=True)
    mask = batch["completion_mask"][:, 1:].to(torch.float64)
    w = ((batch["lp"] - batch["lsq"]) * mask).sum(1).div(mask.sum(1)).exp()  # eq. 2, from the per-token arrays
    want = -(batch["lp"][:8].sum(1) * w[:8] * w[8:]).sum() / mask[:8].sum()
    assert terms["sft"].mean().item() == pytest.approx(want.item(), rel=1e-9)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_ld_dpo_equals_trl(alpha):
    """LD-DPO for policy and reference alike, from the split sums (the reference's as the cache keeps them)."""
    batch = make_batch(8, seed=4)
    settings = {"loss_type": ["sigmoid", "ipo", "bco_pair", "sft"], "ld_alpha": alpha, "beta": 0.2}
    trl, m = trl_loss(batch, **settings)
    losses, _, cr, rr, _ = ours(batch, **settings)
    assert losses.mean().item() == pytest.approx(trl, rel=1e-9)
    assert cr.mean().item() == pytest.approx(m["rewards/chosen"], rel=1e-9)
    assert (cr - rr).mean().item() == pytest.approx(m["rewards/margins"], rel=1e-9)
    if alpha != 1.0:  # the tail counts less: a pair with unequal lengths differs from plain DPO
        plain, *_ = ours(batch, **{**settings, "ld_alpha": None})
        assert not torch.allclose(plain, losses)


def test_weighted_list_mpo_equals_trl():
    batch = make_batch(8, seed=5)
    settings = {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    trl, _ = trl_loss(batch, **settings)
    losses, terms, *_ = ours(batch, **settings)
    assert losses.mean().item() == pytest.approx(trl, rel=1e-9)
    parts = [trl_loss(batch, loss_type=[t])[0] for t in settings["loss_type"]]
    assert [terms[t].mean().item() for t in settings["loss_type"]] == pytest.approx(parts, rel=1e-9)


def test_orpo_equals_trl_orpo():
    from trl.experimental.orpo.orpo_trainer import ORPOTrainer

    batch = make_batch(8, seed=6)
    mask = batch["completion_mask"][:, 1:].to(torch.float64)
    sums, counts = batch["lp"].sum(1), mask.sum(1)
    avg = sums / counts
    fake = SimpleNamespace(beta=0.25, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cr, rr, _, _ = ORPOTrainer.odds_ratio_loss(fake, avg[:8], avg[8:])
    nll = -sums[:8].sum() / counts[:8].sum()  # TRL's chosen_nll_loss: cross-entropy over every chosen token of the batch
    want = nll - losses.mean()
    got, _, our_cr, our_rr, _ = ours(batch, loss_type=["orpo"], beta=0.25)
    # odds_ratio_loss casts the log-probs to float32 (`.float()`): equal to float32 precision, not 1e-9
    assert got.mean().item() == pytest.approx(want.item(), rel=1e-6)
    assert our_cr.tolist() == pytest.approx(cr.tolist(), rel=1e-6) and our_rr.tolist() == pytest.approx(rr.tolist(), rel=1e-6)
    # and in float64 against the paper's formula (eqs. 4, 7): NLL - beta log sigmoid(log odds(chosen) - log odds(rejected))
    odds = lambda a: a - torch.log(1 - torch.exp(a))  # noqa: E731
    exact = nll - 0.25 * torch.nn.functional.logsigmoid(odds(avg[:8]) - odds(avg[8:])).mean()
    assert got.mean().item() == pytest.approx(exact.item(), rel=1e-9)


def test_cdpo_is_sigmoid_with_label_smoothing_which_trl_ignores():
    batch = make_batch(8, seed=7)
    trl_plain, _ = trl_loss(batch, loss_type=["sigmoid"])
    trl_smoothed, _ = trl_loss(batch, loss_type=["sigmoid"], label_smoothing=0.2)
    cdpo, *_ = ours(batch, loss_type=["sigmoid"], label_smoothing=0.2)
    assert trl_smoothed == trl_plain  # TRL 1.x: sigmoid does not read label_smoothing
    assert cdpo.mean().item() != pytest.approx(trl_plain, rel=1e-6)  # dpo-ray keeps cDPO
