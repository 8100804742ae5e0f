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
  score_rank (N,) its index among its sequence's scored tokens (LD-DPO's split at the shorter reply's length),
  score_counts (2B,) the scored positions of each sequence (counted here, so the device is never read for them),
  attn_blocks (packed, attention "sdpa"): (start, length, (L, L) bool mask) per block of consecutive pairs;
  flex_index (packed, attention "flex"): (3, N) int32 per position: its pair, and the start and end of the
      chosen reply span it must not see (empty for chosen positions) -> flex_block_mask();
  varlen (packed, attention "varlen"): the prompt-once layout for flash varlen attention (varlen_index()): hidden
      states stay shared [P, chosen, rejected tail] per pair; inside attention the keys and values are gathered
      (kv_index) into [P, chosen, P, rejected tail], one sequence per reply: queries (P+c, r), keys (P+c, P+r), causal
      aligned bottom-right. Built once per batch on the host, reused by every layer.
Plus plain numbers for throughput accounting: tokens (real sequence tokens, chosen + rejected, the same
for both layouts), positions (token positions the model runs, padding included), and for model FLOPs
(dpo_ray.flops) model_positions (those positions without padding) and attn_pairs (the query-key pairs the
attention masks allow: causal per sequence, a rejected tail over the shared prompt and itself).
Pure torch: no Ray, no MLflow.
"""
from __future__ import annotations

import functools
import inspect
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.profiler import record_function

ATTENTION = "dpo_ray_packed"  # the transformers attention implementation name registered below
BLOCK_TOKENS = 192  # packed positions per attention call (a longer pair gets a call of its own)
ATTENTIONS = ("sdpa", "flex", "varlen")  # packed kernels: SDPA per block with a dense mask; FlexAttention with a block
# mask; flash varlen_attn over the replies with the prompt's K/V copied to the rejected one (per-sequence SDPA on CPU)


def shared_prefix(chosen: np.ndarray, rejected: np.ndarray) -> int:
    """Length of the common prefix of the two sequences (the prompt, and any identical start of the replies).

    Every position inside it has the same tokens and the same context in both sequences, so its hidden
    state serves both: the rejected tokens it predicts are scored from the chosen copy.
    """
    n = min(len(chosen), len(rejected))
    diff = np.flatnonzero(chosen[:n] != rejected[:n])
    return int(diff[0]) if len(diff) else n


def pair_tokens(rows) -> list[int]:
    """Each pair's packed length (chosen + the rejected tail after the shared prefix): what a packed batch holds of it,
    and what the token budgets count. `rows`: a pyarrow Table or a dict of lists with the two input_ids columns."""
    chosen, rejected = rows["chosen_input_ids"], rows["rejected_input_ids"]
    if hasattr(chosen, "combine_chunks"):  # a pyarrow column: flat values and offsets, no Python lists
        return _pair_tokens_arrow(chosen.combine_chunks(), rejected.combine_chunks())
    out = []
    for c, r in zip(chosen, rejected):
        c, r = np.asarray(c), np.asarray(r)
        out.append(len(c) + len(r) - shared_prefix(c, r))
    return out


def _pair_tokens_arrow(chosen, rejected) -> list[int]:
    co, cv = chosen.offsets.to_numpy(), chosen.values.to_numpy()
    ro, rv = rejected.offsets.to_numpy(), rejected.values.to_numpy()
    return [int(co[i + 1] - co[i] + ro[i + 1] - ro[i] - shared_prefix(cv[co[i]:co[i + 1]], rv[ro[i]:ro[i + 1]]))
            for i in range(len(chosen))]


def token_budget_groups(tokens: list[int], budget: int) -> list[list[int]]:
    """Indices into `tokens` grouped into micro-batches of at most `budget` tokens each (a longer item is a group alone):
    longest first, each into the first group it fits (first-fit decreasing). Deterministic for given tokens."""
    order = sorted(range(len(tokens)), key=lambda i: (-tokens[i], i))
    groups, room = [], []
    for i in order:
        for g, left in enumerate(room):
            if tokens[i] <= left:
                groups[g].append(i)
                room[g] -= tokens[i]
                break
        else:
            groups.append([i])
            room.append(budget - tokens[i])
    return groups


def _scored(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(source positions, targets) of the scored tokens: position t-1 predicts ids[t] for mask[t] = 1, t >= 1."""
    t = np.flatnonzero(mask[1:]) + 1
    return t - 1, ids[t]


def _refs(batch: dict):
    out = {}
    for k in ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_shared_logps", "ref_rejected_shared_logps"):
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
            **_scores(pos, tgt, seq), "attn_blocks": None, "flex_index": None, "varlen": None, "n_seqs": len(seqs), "tokens": tokens, "positions": ids.size,
            "model_positions": tokens, "attn_pairs": sum(len(x) * (len(x) + 1) // 2 for x in seqs), **_refs(batch)}


def pack_pairs(batch: dict, attention: str = "sdpa", mask_device=None) -> dict:
    """Rows of ragged chosen/rejected lists -> one packed (1, N) row with the prompt shared inside each pair.

    attention "sdpa": per-block dense masks (attn_blocks), built on the host, or with mask_device on that device from
    an O(N) index (device_blocks: no (L, L) mask built on the host or copied); "flex": per-position indices for a
    FlexAttention block mask; "varlen": index tensors for varlen attention (varlen_index).
    """
    if attention not in ATTENTIONS:
        raise ValueError(f"packed attention {attention!r}: choose one of {ATTENTIONS}")
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
    flex = attention == "flex"
    with record_function("dpo_ray.attention_masks"):
        blocks = None if attention != "sdpa" else attention_blocks(layout) if mask_device is None else device_blocks(layout, mask_device)
        index = flex_index(layout) if flex else None
        varlen = varlen_index(layout) if attention == "varlen" else None
    return {"input_ids": torch.from_numpy(np.concatenate(ids))[None], "attention_mask": None,
            "position_ids": torch.from_numpy(np.concatenate(positions))[None], **_scores(pos, tgt, seq),
            "attn_blocks": blocks, "flex_index": index, "varlen": varlen,
            "n_seqs": 2 * B, "tokens": tokens, "positions": off, "model_positions": off,
            "attn_pairs": sum(lc * (lc + 1) // 2 + tail * s + tail * (tail + 1) // 2 for _, lc, s, tail in layout), **_refs(batch)}


def attention_blocks(layout: list[tuple[int, int, int, int]], budget: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """Consecutive pairs grouped into blocks of at most `budget` positions (a longer pair is a block alone), each
    with its (L, L) boolean mask: True where a query may attend. One attention call per block and layer: short
    pairs share a call (few kernel launches), long ones do not pay for masked-out positions of others."""
    blocks = []
    for g in _block_groups(layout, budget):
        start = g[0][0]
        L = g[-1][0] + g[-1][1] + g[-1][3] - start
        mask = np.zeros((L, L), dtype=bool)
        for off, lc, s, tail in g:
            o = off - start
            mask[o : o + lc, o : o + lc] = np.tri(lc, dtype=bool)  # chosen: causal over itself
            if tail:
                t0 = o + lc
                mask[t0 : t0 + tail, o : o + s] = True  # rejected tail: the whole shared prefix ...
                mask[t0 : t0 + tail, t0 : t0 + tail] = np.tri(tail, dtype=bool)  # ... and itself, causally
        blocks.append((start, L, torch.from_numpy(mask)))
    return blocks


def _block_groups(layout: list[tuple[int, int, int, int]], budget: int | None) -> list[list[tuple[int, int, int, int]]]:
    budget = budget or BLOCK_TOKENS
    groups, cur, length = [], [], 0
    for pair in layout:
        n = pair[1] + pair[3]
        if cur and length + n > budget:
            groups.append(cur)
            cur, length = [], 0
        cur.append(pair)
        length += n
    if cur:
        groups.append(cur)
    return groups


def device_blocks(layout: list[tuple[int, int, int, int]], device, budget: int | None = None) -> list[tuple[int, int, torch.Tensor]]:
    """attention_blocks' blocks with their masks built on `device` from the (3, N) flex_index (one small copy), by the
    FlexAttention rule: same pair, causal, outside the hole. A few elementwise kernels per block and batch, shared by
    every layer; the host does O(N) work instead of O(L^2)."""
    index = flex_index(layout).to(device, non_blocking=True)
    blocks = []
    for g in _block_groups(layout, budget):
        start = g[0][0]
        L = g[-1][0] + g[-1][1] + g[-1][3] - start
        pair, hole_start, hole_end = index[:, start : start + L].unsqueeze(-1).unbind(0)  # (L, 1) each: per query
        kv = torch.arange(start, start + L, device=index.device)
        mask = (pair == pair.T) & (kv <= kv[:, None]) & ((kv < hole_start) | (kv >= hole_end))
        blocks.append((start, L, mask))
    return blocks


def flex_index(layout: list[tuple[int, int, int, int]]) -> torch.Tensor:
    """(3, N) int32: each position's pair, and the [start, end) of the chosen positions it may not attend to
    (a rejected tail skips the chosen reply, i.e. chosen positions s..lc-1 of its pair; chosen positions skip none)."""
    n = layout[-1][0] + layout[-1][1] + layout[-1][3]
    out = np.zeros((3, n), dtype=np.int32)
    for i, (off, lc, s, tail) in enumerate(layout):
        out[0, off : off + lc + tail] = i
        out[1:, off + lc : off + lc + tail] = [[off + s], [off + lc]]
    return torch.from_numpy(out)


def varlen_index(layout: list[tuple[int, int, int, int]]) -> dict:
    """The varlen layout of a packed row: its positions are the queries, in order [chosen, rejected tail] per pair (a
    rejected sequence with no tail of its own has no query and is left out); the keys and values are gathered from the
    row by kv_index into [chosen, shared prefix, rejected tail] per pair. cu_seq_q / cu_seq_k (int32) delimit the
    sequences (chosen: P+c queries and keys; rejected: r queries, P+r keys), max_q / max_k are plain ints (no device
    read), and segments the same bounds as Python ints for the CPU stand-in."""
    kv, q_lens, k_lens = [], [], []
    for off, lc, s, tail in layout:
        kv.append(np.arange(off, off + lc))
        q_lens.append(lc), k_lens.append(lc)
        if tail:
            kv += [np.arange(off, off + s), np.arange(off + lc, off + lc + tail)]
            q_lens.append(tail), k_lens.append(s + tail)
    cu_q, cu_k = np.cumsum([0] + q_lens), np.cumsum([0] + k_lens)
    segments = [(int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])) for i in range(len(q_lens))]
    return {"kv_index": torch.from_numpy(np.concatenate(kv).astype(np.int64)), "cu_seq_q": torch.from_numpy(cu_q.astype(np.int32)),
            "cu_seq_k": torch.from_numpy(cu_k.astype(np.int32)), "max_q": int(max(q_lens)), "max_k": int(max(k_lens)), "segments": segments}


def flex_block_mask(index: torch.Tensor):
    """The FlexAttention BlockMask of a packed row from its flex_index (on the index's device): same pair, causal,
    outside the hole. Built with the compiled builder on CUDA (no (N, N) mask is ever materialised), eagerly on CPU."""
    from torch.nn.attention.flex_attention import create_block_mask

    pair, hole_start, hole_end = index.unbind(0)

    def mask_mod(b, h, q, kv):
        return (pair[q] == pair[kv]) & (kv <= q) & ((kv < hole_start[q]) | (kv >= hole_end[q]))

    n = index.shape[1]
    return create_block_mask(mask_mod, None, None, n, n, device=index.device, _compile=index.is_cuda)


def _scores(pos, tgt, seq) -> dict:
    """Each entry of pos/tgt/seq is one sequence's scored tokens in order: score_rank is a token's index in its reply."""
    cat = lambda xs: torch.from_numpy(np.concatenate(xs).astype(np.int64))  # noqa: E731
    counts = torch.from_numpy(np.bincount(np.concatenate(seq).astype(np.int64), minlength=len(seq)))  # seq: one array a sequence
    return {"score_pos": cat(pos), "score_target": cat(tgt), "score_seq": cat(seq), "score_counts": counts,
            "score_rank": cat([np.arange(len(p)) for p in pos])}


def to_device(batch: dict, device) -> dict:
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if batch.get("attn_blocks"):
        out["attn_blocks"] = [(a, n, m.to(device, non_blocking=True)) for a, n, m in batch["attn_blocks"]]
    if batch.get("varlen"):
        out["varlen"] = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch["varlen"].items()}
    return out


_compiled_flex = None


def flex(query, key, value, block_mask, scale=None, enable_gqa=False):
    """flex_attention with a block mask: compiled on CUDA (built once; uncompiled it would run a dense path), and
    on CPU FlexAttention's own eager (dense) implementation, for equality tests and dry runs."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if query.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        # FORCE_USE_FLEX_ATTENTION: never the flex-decoding kernel, which inductor picks for rows under 128 tokens and
        # which had no valid configuration for them on an H100 (torch 2.11: NoValidChoicesError, seen 2026-11-26)
        return _compiled_flex(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa,
                              kernel_options={"FORCE_USE_FLEX_ATTENTION": True})
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return _flex_eager_with_grad(query, key, value, block_mask, scale)
    with warnings.catch_warnings():  # "called without torch.compile()": on CPU that is the point
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(query, key, value, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _flex_eager_with_grad(query, key, value, block_mask, scale):
    """The public flex_attention refuses a backward on CPU; its higher-order op, called eagerly, has one (dense, the
    same math the public call runs forward). Private API: used on CPU only, never on the CUDA path."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_hop
    from torch.nn.attention.flex_attention import _apply_kernel_options

    options = _apply_kernel_options(query, key, value, False, None, None)
    scale = scale if scale is not None else query.shape[-1] ** -0.5
    out, _, _ = flex_hop(query, key, value, _no_score_mod, block_mask.as_tuple(), scale, options)
    return out


def _no_score_mod(score, b, h, q, kv):
    return score


@functools.cache
def _varlen_kernel():
    """torch's varlen_attn and the keyword arguments its version takes: causal is window_size=(-1, 0) from torch 2.12
    (is_causal=True before); scale and enable_gqa are missing in some versions (then q is prescaled, K/V heads repeated)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


def varlen_kwargs(params, scale: float | None, head_dim: int, gqa: bool) -> tuple[dict, float, bool]:
    """(keyword arguments, factor to multiply the queries by, whether to repeat the K/V heads) for a varlen_attn whose
    parameters are `params`: causal, bottom-right aligned, at `scale`, grouped-query when the kernel can."""
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    factor = 1.0
    if "scale" in params:
        kwargs["scale"] = scale
    elif scale is not None:
        factor = scale * head_dim**0.5  # the kernel's own scale is 1/sqrt(head_dim)
    repeat = gqa and "enable_gqa" not in params
    if gqa and not repeat:
        kwargs["enable_gqa"] = True
    return kwargs, factor, repeat


def varlen_attention(query, key, value, varlen: dict, scale=None) -> torch.Tensor:
    """Attention for the varlen layout: query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D). The keys and values
    are un-shared by one gather (the prompt's K/V copied for the rejected reply: no extra compute; its gradient sums
    both copies). On CUDA in bf16/fp16 one flash varlen_attn call for the whole row; elsewhere (CPU, fp32) one SDPA
    call per sequence with the same bottom-right causal rule, the stand-in the equality tests compare."""
    q = query[0].transpose(0, 1).contiguous()  # (N, H, D): already contiguous, transformers made query by a transpose
    ix = varlen["kv_index"]
    k, v = key[0].transpose(0, 1).index_select(0, ix), value[0].transpose(0, 1).index_select(0, ix)  # (Tk, Hkv, D)
    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        kernel, params = _varlen_kernel()
        kwargs, factor, repeat = varlen_kwargs(params, scale, q.shape[-1], gqa)
        if repeat:
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        out = kernel(q * factor if factor != 1.0 else q, k, v, varlen["cu_seq_q"], varlen["cu_seq_k"], varlen["max_q"], varlen["max_k"], **kwargs)
        return (out[0] if isinstance(out, tuple) else out)[None]  # (output, lse) from versions that return both
    outs = []
    for q0, q1, k0, k1 in varlen["segments"]:
        lq, lk = q1 - q0, k1 - k0
        mask = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)  # causal, aligned bottom-right
        outs.append(masked_sdpa(q[q0:q1].transpose(0, 1), k[k0:k1].transpose(0, 1), v[k0:k1].transpose(0, 1), mask, scale).transpose(0, 1))
    return torch.cat(outs)[None]


@torch.compiler.disable
def packed_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, attn_blocks=None, flex_mask=None,
                     varlen=None, **kwargs):
    """transformers attention function for packed pairs; without attn_blocks or flex_mask it is plain SDPA attention.

    query (1, H, N, D), key/value (1, Hkv, N, D) -> (1, N, H, D). With attn_blocks: one SDPA call per block of pairs,
    with the block's mask (each chosen sequence causal over itself; each rejected tail over the shared prefix and
    itself). With flex_mask: one FlexAttention call over the whole row with that block mask (the same rule). With
    varlen: varlen_attention (the same rule, the rejected reply's keys a copy of the prompt's and its own).
    """
    layout = getattr(attention_mask, LAYOUT_ATTR, None)  # a packed row's layout rides on its placeholder mask
    if layout is not None:
        attn_blocks, flex_mask, varlen = layout.get("attn_blocks"), layout.get("flex_mask"), layout.get("varlen")
    if varlen is not None:
        return varlen_attention(query, key, value, varlen, scale=scaling), None
    gqa = query.shape[1] != key.shape[1]
    if flex_mask is not None:
        out = flex(query, key, value, block_mask=flex_mask, scale=scaling, enable_gqa=gqa)
        return out.transpose(1, 2).contiguous(), None
    if attn_blocks is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    outs = [masked_sdpa(query[:, :, a : a + n], key[:, :, a : a + n], value[:, :, a : a + n], mask, scaling)
            for a, n, mask in attn_blocks]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def masked_sdpa(query, key, value, mask, scale=None):
    """SDPA with a boolean mask, (..., H, L, D) queries and (..., Hkv, L, D) keys/values. On CUDA it must not reach the
    math kernel (fp32 upcast, the whole score matrix): flash takes no mask, and torch 2.11's memory-efficient kernel
    takes a mask but no grouped-query heads (it gained them after 2.11, pytorch#191085), so with a mask and
    enable_gqa the call went to cuDNN attention on Hopper (first in 2.11's order with cuDNN > 9.15), whose backward
    can return NaN with a mask at some lengths (pytorch#196678; TRL#7181 on Qwen2.5-0.5B). So on CUDA: the KV heads
    repeated and the memory-efficient kernel asked for first (math only if it refuses an input). Elsewhere: SDPA with
    enable_gqa as before. benchmarks/NOTES-issue30-gpu.md has the reading of torch 2.11's selection code."""
    gqa = query.shape[-3] != key.shape[-3]  # heads: (..., H, L, D)
    if not query.is_cuda:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, enable_gqa=gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if gqa:
        n = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(n, dim=-3), value.repeat_interleave(n, dim=-3)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True):
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale)


def register() -> str:
    """Register the packed attention (and SDPA's mask builder for unpacked calls) with transformers; idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, packed_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    return ATTENTION


# A 4D mask is passed through by transformers' mask builder as-is: packed calls hand it this placeholder, which carries
# the row's layout (the attention blocks, the flex block mask or the varlen index) as a Python attribute, so that no
# (N, N) mask is ever built for a packed row and the decoder layers see only tensors: a compiled layer
# (train.compile) is not specialised on the layout's lists and ints, and recompiles only for a new dynamic shape.
# packed_attention (run eagerly, a graph break in a compiled layer) reads the layout back from the mask it is given.
LAYOUT_ATTR = "_dpo_ray_layout"


def placeholder_mask(device, **layout) -> torch.Tensor:
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=device)
    if layout:
        setattr(mask, LAYOUT_ATTR, layout)
    return mask
