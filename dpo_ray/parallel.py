"""How the policy sits on the workers: `ddp` (a full copy per worker) or `fsdp` (FSDP2: parameters, gradients and
optimizer state sharded), each with or without LoRA adapters (peft). The loop calls `build_policy` once, then
`sync_gradients` and `clip_gradients` in its step; the rest of the loop does not know which strategy runs.

fsdp follows torchtitan: `fully_shard` on each decoder layer (the model's `_no_split_modules` classes), then on the
root (here the PolicyLogps wrapper, whose forward also runs the LM head). Only rank 0 reads the weights: the other
ranks build the model on the meta device and receive their shards from rank 0 (`set_model_state_dict` with
`broadcast_from_rank0`), so host memory holds one full copy in the whole job, not one per worker.
"""
from __future__ import annotations

import torch
from torch import nn

from .compiling import compile_layers
from .forward import PolicyLogps
from .model import empty_model, enable_activation_checkpointing, load_model


def add_lora(model: nn.Module, lora) -> nn.Module:
    """peft LoRA adapters on `lora.target_modules`; the base weights are frozen. B starts at zero, so the adapted
    model computes what the base does until the first step (the cached reference stays the starting point)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP2 shards one by one: instances of the classes the model names in `_no_split_modules`."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"train.strategy=fsdp: {type(model).__name__} names no decoder layer class (_no_split_modules)")
    return layers


def shard(wrapper: nn.Module, bf16: bool, cpu_offload: bool) -> None:
    """FSDP2 in place: each decoder layer, then the root. bf16 computes with bf16 parameter copies and reduces
    gradients in fp32; the sharded master weights and the optimizer state stay fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    kwargs = {"mp_policy": mp, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy()}
    for layer in decoder_layers(wrapper.model):
        fully_shard(layer, **kwargs)
    fully_shard(wrapper, **kwargs)


def bf16_base(t, bf16: bool) -> bool:
    """LoRA with bf16 on ddp: the frozen base is loaded and kept in bf16 (it needs no fp32 master copy: it is never
    updated), the adapters in fp32 (peft upcasts them), computed in bf16 autocast. Half the base's memory; the
    reference and evaluation scorers then load the model in bf16 too (scoring_precision), so step 1 still reads ln 2.
    With fsdp the base stays fp32 and FSDP2 makes the bf16 compute copies (one dtype per sharded group)."""
    return bool(bf16) and t.lora is not None and t.strategy == "ddp"


def scores_in_bf16_weights(t, bf16: bool) -> bool:
    """Whether the policy computes with bf16 weights (fsdp's bf16 compute copies, or LoRA's bf16 base): the reference
    and evaluation scorers then load the model in bf16, to read the policy's own numbers at step 1."""
    return bool(bf16) and (t.strategy == "fsdp" or bf16_base(t, bf16))


def load_policy_model(cfg, policy_path: str, rank: int, bf16: bool) -> nn.Module:
    """The HF (or peft) model a worker trains, before wrapping: rank 0's weights (other fsdp ranks: meta), LoRA
    adapters (on a bf16 base when bf16_base), activation checkpointing."""
    t, m = cfg.train, cfg.model
    if t.strategy == "fsdp" and rank != 0:
        model = empty_model(policy_path, m.trust_remote_code, m.hf_token)  # a tied head is one parameter on every rank
    else:
        model = load_model(policy_path, m.trust_remote_code, token=m.hf_token, **({"dtype": torch.bfloat16} if bf16_base(t, bf16) else {}))
    if t.lora is not None:
        model = add_lora(model, t.lora)  # rank 0's adapters are the ones every rank gets (broadcast below); fp32
    if t.gradient_checkpointing:  # for long sequences: each decoder layer's activations recomputed in backward
        enable_activation_checkpointing(model)
    return model


def build_policy(cfg, policy_path: str, rank: int, world: int, device: torch.device, bf16: bool):
    """(policy, wrapper, model): `policy` is what the loop calls and steps, `wrapper` the PolicyLogps (its collate),
    `model` the HF (or peft) model inside, for checkpoints and export."""
    t = cfg.train
    fsdp = t.strategy == "fsdp"
    model = load_policy_model(cfg, policy_path, rank, bf16)
    wrapper = PolicyLogps(model, attention=t.attention)  # packed pairs (prompt once per pair, no padding) when the model allows
    # train.compile: each decoder layer's forward compiled (inside DDP's / FSDP2's hooks, which stay eager)
    wrapper.compile_stats = compile_layers(decoder_layers(model), device) if t.compile else None
    if not fsdp:
        import ray.train.torch

        return ray.train.torch.prepare_model(wrapper), wrapper, model  # DDP on >1 worker; moves to device

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if device.type == "cuda":
        torch.cuda.set_device(device.index or 0)
    full = model.state_dict() if rank == 0 else {}  # rank 0's tensors, the only full copy (no clone)
    buffers = {k: b.clone() for k, b in model.named_buffers()}
    shard(wrapper, bf16, t.cpu_offload)
    if rank != 0:  # meta parameters -> uninitialised memory on the device; buffers put back
        wrapper.to_empty(device="cpu" if t.cpu_offload else device)
        with torch.no_grad():
            for k, b in model.named_buffers():
                b.copy_(buffers[k])
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return wrapper, wrapper, model


def trainable(policy: nn.Module) -> list[nn.Parameter]:
    return [p for p in policy.parameters() if p.requires_grad]


def sync_gradients(policy: nn.Module, world: int, last_micro: bool):
    """A context for one micro-batch's backward: gradients are reduced across workers only on the step's last one."""
    from contextlib import nullcontext

    if world == 1 or last_micro:
        if hasattr(policy, "set_requires_gradient_sync"):
            policy.set_requires_gradient_sync(True)
        return nullcontext()
    if hasattr(policy, "set_requires_gradient_sync"):  # FSDP2
        policy.set_requires_gradient_sync(False)
        return nullcontext()
    return policy.no_sync()  # DDP


def clip_gradients(policy: nn.Module, max_norm: float) -> torch.Tensor:
    """The global gradient norm (over all workers' shards) before clipping; max_norm 0 only measures."""
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(policy), max_norm if max_norm > 0 else float("inf"))
    return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm


def make_optimizer(policy: nn.Module, t, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters. The fused kernel (one call updates every parameter; on a small model
    about twice as fast a step as foreach) for plain tensors on CPU/CUDA; foreach for FSDP2's DTensors on the CPU."""
    params = trainable(policy)
    sharded = any(hasattr(p, "full_tensor") for p in params)
    fused = device.type == "cuda" or (device.type == "cpu" and not sharded)
    return torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                             **({"fused": True} if fused else {"foreach": True}))
