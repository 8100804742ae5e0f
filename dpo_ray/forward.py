"""The policy forward used by training, reference scoring and evaluation: a pair batch -> per-sequence logps.

Two costs of the plain computation are removed here:
- padding: pairs are packed into one row (packing.pack_pairs), the prompt computed once per pair;
  models that cannot take the packed attention get length-padded batches (packing.pad_pairs);
- the LM head: it runs only on the positions that predict a reply token, so most of the
  (T x hidden x vocab) head is skipped and no full (B, T, V) logits are built; it runs a chunk of positions at a
  time (logps.linear_logps), so not even the (N, V) logits of the reply positions exist at once.
Models whose head is more than a Linear (logit soft-capping, scaling) take the full-logits path.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from . import packing
from .logps import gather_sums, linear_logps, split_sums, token_logps, wpo_log_weights


def use_bf16(setting, device) -> bool:
    """train.bf16 -> whether the policy computes in bf16 autocast (over fp32 weights). The reference and evaluation
    scorers follow the same setting, so that the reference reads the policy's own numbers at step 1."""
    if setting != "auto":
        return bool(setting)
    return torch.device(device).type == "cuda" or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(bf16: bool, device):
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16) if bf16 else nullcontext()


def _head_is_plain_linear(model) -> bool:
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1.0):
        return False
    try:
        return isinstance(model.get_output_embeddings(), nn.Linear) and model.get_decoder() is not None
    except (AttributeError, NotImplementedError):
        return False


def supports_packing(model) -> bool:
    """Models built on transformers' attention interface, without sliding windows or attention soft-capping."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", True)
    sliding = bool(window) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
    return bool(getattr(model, "_supports_attention_backend", False)) and not sliding and not getattr(cfg, "attn_logit_softcapping", None)


class PolicyLogps(nn.Module):
    """Wraps a causal LM so that DDP/FSDP see one forward: a batch from `collate` -> (logps (2B,), counts (2B,))."""

    compile_stats = None  # train.compile: dpo_ray.compiling.CompileStats, set by parallel.build_policy
    _flops = None

    def flops(self):
        """The model's dpo_ray.flops.ModelFlops (for a batch's model FLOPs: flops.batch_flops), counted once."""
        if self._flops is None:
            from .flops import ModelFlops

            self._flops = ModelFlops.of(self.model)
        return self._flops

    def __init__(self, model: nn.Module, reply_only_head: bool = True, packed: bool = True, attention: str = "sdpa"):
        super().__init__()
        self.model = model
        self.reply_only_head = reply_only_head and _head_is_plain_linear(model)
        self.packed = packed and supports_packing(model)
        if attention not in packing.ATTENTIONS:
            raise ValueError(f"train.attention {attention!r}: choose one of {packing.ATTENTIONS}")
        self.attention = attention  # packed kernel: "sdpa" (a dense mask per block of pairs), "flex" (FlexAttention), "varlen"
        if self.packed:
            model.set_attn_implementation(packing.register())  # plain SDPA for any call that is not a packed batch

    def collate(self, rows: dict, pad_id: int, device=None, extras: tuple[str, ...] = ()) -> dict:
        """A batch for forward(); with extras ("shared" and/or "wpo") forward also returns a dict of (2B,) tensors: the
        LD-DPO shared-part sums and the WPO log-weights of each sequence."""
        on_gpu = device is not None and torch.device(device).type != "cpu"  # sdpa's block masks built there, not copied
        batch = packing.pack_pairs(rows, self.attention, mask_device=device if on_gpu else None) if self.packed else packing.pad_pairs(rows, pad_id)
        batch["extras"] = tuple(extras)
        return packing.to_device(batch, device) if device is not None else batch

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        kwargs = {"input_ids": ids, "position_ids": batch["position_ids"], "use_cache": False}
        # a packed row's layout rides on a placeholder mask (packing.placeholder_mask): the layers see tensors only
        if batch["attn_blocks"] is not None:
            kwargs["attention_mask"] = packing.placeholder_mask(ids.device, attn_blocks=batch["attn_blocks"])
        elif batch.get("varlen") is not None:  # index tensors built once per batch in collate, shared by every layer
            kwargs["attention_mask"] = packing.placeholder_mask(ids.device, varlen=batch["varlen"])
        elif batch.get("flex_index") is not None:  # one block mask per batch, shared by every layer
            kwargs["attention_mask"] = packing.placeholder_mask(ids.device, flex_mask=packing.flex_block_mask(batch["flex_index"]))
        else:
            kwargs["attention_mask"] = batch["attention_mask"]
        extras = batch.get("extras") or ()  # "shared": LD-DPO split sums; "wpo": WPO log-weights
        wpo = "wpo" in extras
        if self.reply_only_head:
            hidden = self.model.get_decoder()(**kwargs).last_hidden_state  # (R, T, H)
            head = self.model.get_output_embeddings()
            if hidden.device != head.weight.device:  # a model split over GPUs (device_map): the head's GPU does it
                hidden, batch = hidden.to(head.weight.device), packing.to_device(batch, head.weight.device)
            per_token = linear_logps(hidden.flatten(0, 1)[batch["score_pos"]], head.weight, head.bias, batch["score_target"], sum_sq=wpo)
        else:
            logits = self.model(**kwargs).logits.flatten(0, 1)[batch["score_pos"]]
            per_token = token_logps(logits, batch["score_target"], sum_sq=wpo)
        per_token, log_sum_sq = per_token if wpo else (per_token, None)
        sums, counts = gather_sums(per_token, batch["score_seq"], batch["n_seqs"], batch.get("score_counts"))
        if not extras:
            return sums, counts
        out = {}
        if "shared" in extras:
            out["shared"] = split_sums(per_token, batch["score_seq"], batch["score_rank"], counts)
        if wpo:
            out["wpo"] = wpo_log_weights(per_token, log_sum_sq, batch["score_seq"], counts)
        return sums, counts, out
