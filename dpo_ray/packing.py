"""Batches for the policy forward: padded (B rows of chosen, B of rejected) or packed pairs (one row, no padding).

Packed layout, per pair: the chosen sequence, then the rejected sequence without the prefix it shares
with the chosen one (the prompt). The rejected tail attends to the shared prefix and to itself, never
to the chosen reply, and its position ids continue from the prefix, so every token sees exactly the
context it sees in its own unpadded sequence: the log-probs are those of the plain computation, the
prompt is computed once per pair, and no position is padding.

Either layout comes out as one dict the model wrapper (forward.PolicyLogps) takes whole:
  input_ids (R, T), attention_mask (R, T) or None, position_ids (R, T) or None,
  score_pos (N,) flat index into R*T of the positions whose logits are scored,
  score_target (N,) the token each of them predicts, score_seq (N,) its sequence (chosen 0..B-1, rejected B..2B-1),
  pair_layout (packed only): per pair (offset, chosen_len, shared_len, rejected_tail_len).
Plus plain numbers for throughput accounting: tokens (real sequence tokens, chosen + rejected, the same
for both layouts) and positions (token positions the model runs, padding included).
Pure torch: no Ray, no MLflow.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

ATTENTION = "dpo_ray_packed"  # the transformers attention implementation name registered below
TENSORS = ("input_ids", "attention_mask", "position_ids", "score_pos", "score_target", "score_seq")


def shared_prefix(chosen: np.ndarray, rejected: np.ndarray) -> int:
    """Length of the common prefix of the two sequences (the prompt, and any identical start of the replies).

    Every position inside it has the same tokens and the same context in both sequences, so its hidden
    state serves both: the rejected tokens it predicts are scored from the chosen copy.
    """
    n = min(len(chosen), len(rejected))
    diff = np.flatnonzero(chosen[:n] != rejected[:n])
    return int(diff[0]) if len(diff) else n


def _scored(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source positions, targets) of the scored tokens: position t-1 predicts ids[t] for mask[t] = 1, t >= 1."""
    t = np.flatnonzero(mask[1:]) + 1
    return t - 1, ids[t]


def _refs(batch: dict):
    out = {}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in batch:
            out[k] = torch.as_tensor(np.asarray(batch[k], dtype=np.float32))
    return out


def _arrays(batch: dict):
    keys = ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")
    return [[np.asarray(x, dtype=np.int64) for x in batch[k]] for k in keys]


def pad_pairs(batch: dict, pad_id: int) -> dict:
    """Rows of ragged chosen/rejected lists -> one right-padded (2B, T) batch, order [chosen; rejected].

    T is the longest sequence in this batch (not a global max_length).
    """
    ci, ri, cm, rm = _arrays(batch)
    seqs, masks = ci + ri, cm + rm
    T = max(len(s) for s in seqs)
    ids = np.full((len(seqs), T), pad_id, dtype=np.int64)
    attn = np.zeros((len(seqs), T), dtype=np.int64)
    pos, tgt, seq = [], [], []
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = s
        attn[i, : len(s)] = 1
        p, t = _scored(s, m)
        pos.append(i * T + p)
        tgt.append(t)
        seq.append(np.full(len(p), i))
    tokens = int(attn.sum())
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(attn), "position_ids": None,
            **_scores(pos, tgt, seq), "pair_layout": None, "n_seqs": len(seqs), "tokens": tokens, "positions": ids.size,
            **_refs(batch)}


def pack_pairs(batch: dict) -> dict:
    """Rows of ragged chosen/rejected lists -> one packed (1, N) row with the prompt shared inside each pair."""
    ci, ri, cm, rm = _arrays(batch)
    B = len(ci)
    ids, positions, pos, tgt, seq, layout = [], [], [], [], [], []
    off, tokens = 0, 0
    for i in range(B):
        c, r = ci[i], ri[i]
        s = shared_prefix(c, r)
        tail = len(r) - s
        ids += [c, r[s:]]
        positions += [np.arange(len(c)), np.arange(s, len(r))]
        p, t = _scored(c, cm[i])
        pos.append(off + p), tgt.append(t), seq.append(np.full(len(p), i))
        p, t = _scored(r, rm[i])  # p >= s - 1: the first scored rejected token may be predicted by the last shared position
        pos.append(np.where(p < s, off + p, off + len(c) + p - s)), tgt.append(t), seq.append(np.full(len(p), B + i))
        layout.append((off, len(c), s, tail))
        off += len(c) + tail
        tokens += len(c) + len(r)
    return {"input_ids": torch.from_numpy(np.concatenate(ids))[None], "attention_mask": None,
            "position_ids": torch.from_numpy(np.concatenate(positions))[None], **_scores(pos, tgt, seq),
            "pair_layout": layout, "n_seqs": 2 * B, "tokens": tokens, "positions": off, **_refs(batch)}


def _scores(pos, tgt, seq) -> dict:
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    return {"score_pos": cat(pos), "score_target": cat(tgt), "score_seq": cat(seq)}


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, pair_layout=None, **kwargs):
    """transformers attention function for packed pairs; without pair_layout it is plain SDPA attention.

    query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D). Per pair: the chosen sequence is
    causal over itself; the rejected tail attends to the shared prefix (all of it) and causally to itself.
    """
    if pair_layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    outs = []
    for off, lc, s, tail in pair_layout:
        q, k, v = (x[:, :, off : off + lc] for x in (query, key, value))
        outs.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa))
        if tail:
            end = off + lc + tail
            q = query[:, :, off + lc : end]
            k = torch.cat([key[:, :, off : off + s], key[:, :, off + lc : end]], dim=2)
            v = torch.cat([value[:, :, off : off + s], value[:, :, off + lc : end]], dim=2)
            mask = torch.ones(tail, s + tail, dtype=torch.bool, device=q.device).tril(diagonal=s)  # lower-right causal
            outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=gqa))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the packed attention (and SDPA's mask builder for unpacked calls) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


# A 4D mask is passed through by transformers' mask builder as-is: packed calls hand it this placeholder
# (ignored by packed_attention) so that no (N, N) mask is ever built for a packed row.
def placeholder_mask(device) -> torch.Tensor:
    return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
