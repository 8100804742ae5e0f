"""The memory plan: what one GPU (or, on CPU, one worker) holds for a strategy, computed before any model is loaded.

Parameters are counted on the meta device from the model's config.json (no weights read). Bytes per parameter:
fp32 master weights 4 (LoRA with bf16 on ddp: the frozen base 2, as it is kept in bf16; the adapters 4), fp32 gradients 4 (trainable ones only), AdamW's two fp32 moments 8 (trainable ones only);
fsdp divides all three by the workers, and cpu_offload moves them to host memory, leaving on the GPU the bf16 (or
fp32) compute copies of the layers being gathered (two decoder layers: the current one and the prefetched next).
Activations are an estimate for one micro-batch of batch_size_per_worker pairs at data.max_length (both sequences,
no prompt sharing counted: an upper bound), per decoder layer 34 bytes x tokens x hidden in bf16 (Korthikanti et al.
2022, "Reducing Activation Recomputation", with the attention scores term dropped: SDPA/flash never store them),
twice that in fp32; with activation checkpointing, each layer's input (2 bytes x tokens x hidden) plus one layer's.
"""
from __future__ import annotations

from dataclasses import dataclass

GB = 1024**3


@dataclass
class ModelSize:
    params: int  # all parameters (LoRA adapters included when counted with lora)
    trainable: int  # those the optimizer steps
    layers: int  # decoder layers
    hidden: int


def model_size(path: str, trust_remote_code: bool = False, token: str | None = None, lora=None) -> ModelSize:
    """Counts parameters of the model at `path` (a directory or hub id with config.json) on the meta device."""
    from accelerate import init_empty_weights

    from .model import empty_model

    model = empty_model(path, trust_remote_code, token)
    if lora is not None:
        from .parallel import add_lora

        with init_empty_weights():  # the adapters on the meta device too
            model = add_lora(model, lora)
    params = {id(p): p for p in model.parameters()}.values()  # a tied head counted once
    config = model.config
    text = getattr(config, "get_text_config", lambda: config)()
    return ModelSize(params=sum(p.numel() for p in params), trainable=sum(p.numel() for p in params if p.requires_grad),
                     layers=int(getattr(text, "num_hidden_layers", 1)), hidden=int(getattr(text, "hidden_size", 0)))


def plan(size: ModelSize, strategy: str, workers: int, cpu_offload: bool, bf16: bool, checkpointing: bool,
         pairs: int, max_length: int) -> dict:
    """Bytes per GPU (per worker on CPU): parameters, gradients, optimizer state, gathered layers, activations."""
    shards = workers if strategy == "fsdp" else 1
    on_gpu = 0 if cpu_offload else 1
    compute = 2 if bf16 else 4
    base = 2 if bf16 and strategy == "ddp" and size.trainable < size.params else 4  # LoRA's frozen base in bf16 (parallel.bf16_base)
    tokens = 2 * pairs * max_length
    per_layer = 34 * tokens * size.hidden * (1 if bf16 else 2)
    activations = (size.layers * 2 * tokens * size.hidden + per_layer) if checkpointing else size.layers * per_layer
    out = {
        "parameters": on_gpu * (4 * size.trainable + base * (size.params - size.trainable)) // shards,
        "gradients": on_gpu * 4 * size.trainable // shards,
        "optimizer": on_gpu * 8 * size.trainable // shards,
        "gathered_layers": 2 * compute * size.params // max(size.layers, 1) if strategy == "fsdp" else 0,
        "activations": activations,
    }
    out["total"] = sum(out.values())
    out["host_offloaded"] = (1 - on_gpu) * 16 * size.trainable // shards + (1 - on_gpu) * 4 * (size.params - size.trainable) // shards
    return out


def human(n: float) -> str:
    return f"{n / GB:.2f} GB" if n >= GB / 10 else f"{n / 2**20:.1f} MB"


def describe(p: dict) -> str:
    return ", ".join(f"{k.replace('_', ' ')} {human(p[k])}" for k in
                     ("parameters", "gradients", "optimizer", "gathered_layers", "activations", "total")) + (
        f" (host: {human(p['host_offloaded'])} offloaded)" if p["host_offloaded"] else "")


def fits(p: dict, gpu_bytes: float) -> bool:
    """The refusal rule: parameters + optimizer state alone (what no batch size changes) must fit."""
    return p["parameters"] + p["optimizer"] < gpu_bytes


def alternatives(size: ModelSize, lora_size: ModelSize | None, gpu_bytes: float, bf16: bool, max_workers: int = 512) -> list[str]:
    """The options that would fit: fsdp over the fewest workers, LoRA, fsdp with cpu_offload."""
    out = []
    args = dict(cpu_offload=False, bf16=bf16, checkpointing=False, pairs=1, max_length=1)
    n = next((n for n in range(2, max_workers + 1) if fits(plan(size, "fsdp", n, **args), gpu_bytes)), None)
    if n:
        out.append(f"train.strategy=fsdp with train.num_workers>={n}")
    if lora_size is not None and fits(plan(lora_size, "ddp", 1, **args), gpu_bytes):
        out.append("train.lora (e.g. --set train.lora.r=16)")
    if plan(size, "fsdp", 1, **{**args, "cpu_offload": True})["gathered_layers"] < gpu_bytes:
        out.append("train.strategy=fsdp with train.cpu_offload=true (slower; needs the state in host memory)")
    return out
