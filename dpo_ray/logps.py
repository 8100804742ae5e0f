"""Per-sequence log-probabilities from logits and a loss mask. Pure torch: no Ray, no MLflow.

A sequence's log-prob is  sum_t mask[t] * log p(ids[t] | ids[<t]),  where the logits at position
t-1 predict ids[t]. Only the masked (reply) positions are scored: the prompt, usually most of the
tokens, never reaches log-softmax, and no full (B, T, V) float32 log_softmax copy is made.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHUNK_TOKENS = 1024  # rows of (N, V) upcast to fp32 at a time: bounds the extra memory to CHUNK_TOKENS * V * 4 bytes


def token_logps(logits: torch.Tensor, targets: torch.Tensor, sum_sq: bool = False):
    """log softmax(logits)[target] for each row, computed as logit[target] - logsumexp(logits) in fp32.

    logits (N, V) any float dtype, targets (N,) int -> (N,) float32. With sum_sq also (N,) log sum_v p_v^2
    = logsumexp(2 x) - 2 logsumexp(x), without gradient (WPO's weights), from the same fp32 chunk.
    """
    out, sq = [], []
    for start in range(0, logits.shape[0], CHUNK_TOKENS):
        x = logits[start : start + CHUNK_TOKENS].float()  # (n, V) fp32: the only upcast copy
        t = targets[start : start + CHUNK_TOKENS]
        lse = torch.logsumexp(x, dim=-1)
        out.append(x.gather(-1, t.unsqueeze(-1)).squeeze(-1) - lse)
        if sum_sq:
            with torch.no_grad():
                sq.append(torch.logsumexp(2 * x.detach(), dim=-1) - 2 * lse.detach())
    empty = logits.new_zeros(0, dtype=torch.float32)
    logps = torch.cat(out) if out else empty
    return (logps, torch.cat(sq) if sq else empty) if sum_sq else logps


def _linear_logps(hidden, weight, bias, targets, sum_sq=False):
    return token_logps(F.linear(hidden, weight, bias), targets, sum_sq)


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor, sum_sq: bool = False):
    """token_logps of the LM head `hidden @ weight.T + bias`, CHUNK_TOKENS rows at a time: hidden (N, H) -> (N,) fp32
    (with sum_sq, also the (N,) log sum_v p_v^2 of token_logps).

    No (N, V) logits are ever held at once, in forward or backward: with grad, every chunk but the last is
    checkpointed (only its (n, H) hidden rows are kept; its logits are recomputed in backward, one chunk at a time),
    so the head costs at most one chunk of logits (CHUNK_TOKENS x V, bf16 and its fp32 copy) beyond the hidden rows.
    """
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    out, n = [], hidden.shape[0]
    for start in range(0, n, CHUNK_TOKENS):
        args = (hidden[start : start + CHUNK_TOKENS], weight, bias, targets[start : start + CHUNK_TOKENS], sum_sq)
        last = start + CHUNK_TOKENS >= n
        out.append(checkpoint(_linear_logps, *args, use_reentrant=False) if grad and not last else _linear_logps(*args))
    if sum_sq:
        empty = hidden.new_zeros(0, dtype=torch.float32)
        return (torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])) if out else (empty, empty)
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def split_sums(per_token: torch.Tensor, seq: torch.Tensor, rank: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """LD-DPO's shared part: per sequence, the sum over its first min(|chosen|, |rejected|) scored tokens, where
    sequences 0..B-1 are the chosen and B..2B-1 the rejected replies of pairs 0..B-1 (counts (2B,) per sequence)."""
    b = counts.shape[0] // 2
    shared = torch.minimum(counts[:b], counts[b:]).repeat(2)  # (2B,)
    keep = rank < shared[seq]
    return per_token.new_zeros(counts.shape[0]).index_add(0, seq, per_token * keep)


def wpo_log_weights(per_token: torch.Tensor, log_sum_sq: torch.Tensor, seq: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """WPO (https://arxiv.org/abs/2406.11827), eq. 2, per sequence: mean over its reply tokens of
    (log p(token) - log sum_v p_v^2), without gradient; exp() of it is the sequence's weight."""
    with torch.no_grad():
        sums = per_token.new_zeros(counts.shape[0]).index_add(0, seq, per_token.detach() - log_sum_sq)
        return sums / counts.clamp(min=1)


def reply_positions(loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, col) of the logits that predict a masked token: col = t - 1 for each mask[row, t] = 1."""
    shifted = loss_mask[:, 1:].bool()  # (B, T-1): target t+1 is predicted from position t
    rows, cols = shifted.nonzero(as_tuple=True)
    return rows, cols


def sequence_logps(logits: torch.Tensor, input_ids: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of masked-token log-probs per sequence.

    Args:
        logits: (B, T, V) model outputs.
        input_ids: (B, T) token ids.
        loss_mask: (B, T) 1 where the token belongs to the scored reply (mask[:, 0] is ignored:
            nothing predicts the first token).
    Returns:
        logps (B,) float32 sums, and token counts (B,) int64.
    """
    rows, cols = reply_positions(loss_mask)
    per_token = token_logps(logits[rows, cols], input_ids[rows, cols + 1])  # (N,)
    return gather_sums(per_token, rows, input_ids.shape[0])


def gather_sums(per_token: torch.Tensor, rows: torch.Tensor, batch: int, counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter per-token log-probs back to their sequences: (B,) sums and (B,) counts. `counts` when the caller knows
    them (collate counts them on the host): bincount on CUDA reads the device (it sizes its output by the max)."""
    sums = per_token.new_zeros(batch).index_add(0, rows, per_token)
    return sums, counts if counts is not None else torch.bincount(rows, minlength=batch)
