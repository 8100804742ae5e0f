"""The policy forward used by training, reference scoring and evaluation: (B, T) ids -> (B,) logps.

The LM head runs only on positions that predict a reply token: for DPO data most positions are
prompt, so this skips most of the (T x hidden x vocab) head and never builds full (B, T, V) logits.
Models whose head is more than a Linear (logit soft-capping, scaling) take the plain full-logits path.
"""
from __future__ import annotations

import torch
from torch import nn

from .logps import gather_sums, reply_positions, sequence_logps, token_logps


def _head_is_plain_linear(model) -> bool:
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return False
    try:
        return isinstance(model.get_output_embeddings(), nn.Linear) and model.get_decoder() is not None
    except (AttributeError, NotImplementedError):
        return False


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that DDP/FSDP see one forward: (input_ids, attention_mask, loss_mask) -> (logps, counts)."""

    def __init__(self, model: nn.Module, reply_only_head: bool = True):
        super().__init__()
        self.model = model
        self.reply_only_head = reply_only_head and _head_is_plain_linear(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor):
        if not self.reply_only_head:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
            return sequence_logps(logits, input_ids, loss_mask)
        hidden = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, H)
        rows, cols = reply_positions(loss_mask)
        logits = self.model.get_output_embeddings()(hidden[rows, cols])  # (N, V) for the N scored tokens only
        return gather_sums(token_logps(logits, input_ids[rows, cols + 1]), rows, input_ids.shape[0])


def pad_pairs(batch: dict, pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Rows of ragged chosen/rejected lists -> one right-padded (2B, T) batch, order [chosen; rejected].

    T is the longest sequence in this batch (not a global max_length).
    """
    seqs = list(batch["chosen_input_ids"]) + list(batch["rejected_input_ids"])
    masks = list(batch["chosen_loss_mask"]) + list(batch["rejected_loss_mask"])
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), T), dtype=torch.long)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
        loss_mask[i, : len(m)] = torch.as_tensor(m, dtype=torch.long)
    out = {"input_ids": ids, "attention_mask": attn, "loss_mask": loss_mask}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in batch:
            out[k] = torch.as_tensor(batch[k], dtype=torch.float32)
    return {k: v.to(device) for k, v in out.items()} if device is not None else out
