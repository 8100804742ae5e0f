"""Model FLOPs of a training step, counted as torchtitan and Megatron count them, and MFU against the datasheet peak.

`mfu` = the model FLOPs a step actually executes / (seconds x the GPU's datasheet dense bf16 peak): matmuls over the
positions the model runs (a packed pair's prompt once), the LM head only where it runs (the reply-only head: the
scored positions), attention over the query-key pairs its mask allows (causal per sequence; a rejected tail sees the
shared prompt and itself). Training is 3x the forward (forward, activation and weight gradients); with LoRA's frozen
base 2x for the base (no weight gradients) and 3x for the adapters. Recomputation (activation checkpointing) is not
model FLOPs and is not counted. Padding is not counted.

`mfu_effective` (the benchmarks' older figure, kept beside it): real tokens (prompt counted in both sequences) x
PaLM's 6N + 12 L H T per token / the matmul peak measured on the machine; it credits the prompt twice and the LM head
on every position, so it reads higher than `mfu` for packed pairs.
Pure torch/Python: no Ray, no MLflow.
"""
from __future__ import annotations

from dataclasses import dataclass

# dense bf16 tensor-core peaks from the datasheets (FLOP/s, without sparsity), by a substring of the device name
DATASHEET_BF16 = (("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("H800", 989e12), ("GH200", 989e12),
                  ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10G", 70e12),
                  ("A10", 125e12))


def datasheet_peak(device_name: str | None) -> float | None:
    """The datasheet's dense bf16 peak of a GPU by its name (torch.cuda.get_device_name), None when not listed."""
    for key, peak in DATASHEET_BF16:
        if device_name and key in device_name:
            return peak
    return None


@dataclass(frozen=True)
class ModelFlops:
    """What FLOPs per position depend on: the matmul parameters of the decoder (every weight but the embedding and the
    LM head), of which trainable, the LM head's size, the layers and the attention width (heads x head_dim)."""

    body_params: int
    body_trainable: int
    head_params: int
    head_trainable: bool
    layers: int
    attn_dim: int

    @classmethod
    def of(cls, model) -> "ModelFlops":
        """From a Hugging Face causal LM (or a peft model around one)."""
        cfg = model.config
        emb = model.get_input_embeddings().weight
        head = model.get_output_embeddings().weight
        seen, body, trainable = {id(emb), id(head)}, 0, 0
        for p in model.parameters():
            if id(p) in seen or p.dim() < 2:  # norms and biases: not matmul FLOPs
                continue
            seen.add(id(p))
            body += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(body, trainable, head.numel(), head.requires_grad, cfg.num_hidden_layers, heads * head_dim)

    def forward(self, positions: int, head_positions: int, attn_pairs: int) -> float:
        return self._matmuls(positions, head_positions) + self._attention(attn_pairs)

    def train(self, positions: int, head_positions: int, attn_pairs: int) -> float:
        """Forward + backward: the matmuls' forward and activation gradients (2x), their weight gradients where trainable,
        attention's forward and its backward (3x: no weights, two products back for each one forward)."""
        weight_grads = 2 * self.body_trainable * positions + (2 * self.head_params * head_positions if self.head_trainable else 0)
        return 2 * self._matmuls(positions, head_positions) + weight_grads + 3 * self._attention(attn_pairs)

    def _matmuls(self, positions: int, head_positions: int) -> float:
        return 2 * self.body_params * positions + 2 * self.head_params * head_positions

    def _attention(self, attn_pairs: int) -> float:
        return 4 * self.layers * self.attn_dim * attn_pairs  # QK^T and PV: 2 x attn_dim FLOPs each per query-key pair


def batch_flops(mf: ModelFlops, batch: dict, reply_only_head: bool) -> float:
    """The training FLOPs of one collated batch (packing.pack_pairs / pad_pairs: model_positions, attn_pairs; the LM
    head on the scored positions with the reply-only head, else on every position the model runs)."""
    head = len(batch["score_pos"]) if reply_only_head else batch["model_positions"]
    return mf.train(batch["model_positions"], head, batch["attn_pairs"])
