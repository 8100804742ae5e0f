"""Checkpoint formats, written at the loop's checkpoint steps and read back on resume.

- ddp: rank 0 writes the model as a loadable HF directory (model.safetensors + config.json; with LoRA only the
  adapter, `adapter/`) and `optimizer.pt` (tensors only).
- fsdp: every rank writes its own shards with torch.distributed.checkpoint (`dcp/`, file names per rank), and
  every rank reports its directory to Ray Train, which gathers them into one checkpoint. `dcp.load` reshards, so a
  run resumes with another number of workers. With LoRA only the adapters and their optimizer state are saved.
- At the last step the checkpoint also holds what is exported: the full model in HF format (gathered to rank 0's
  host memory, one copy) or, with LoRA, the adapter (`adapter/`, loadable with PeftModel.from_pretrained).
Both formats keep `state.json` (step, first loss, ..., the strategy) and every rank's torch RNG state (rng_<rank>).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

ADAPTER = "adapter"
DCP = "dcp"


def _options(lora: bool, **kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=lora, **kw)  # LoRA: the frozen base is the input model, not state


def save(directory: Path, policy, model, optimizer, state: dict, rank: int, fsdp: bool, lora: bool, final: bool) -> None:
    """Writes this rank's part of a checkpoint into `directory` (every rank calls it; collectives inside for fsdp)."""
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(policy, optimizer, options=_options(lora))
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory / DCP))
        if final:
            export(directory, model, rank, lora)
    elif rank == 0:
        if lora:
            model.save_pretrained(directory / ADAPTER, safe_serialization=True)
        else:
            model.save_pretrained(directory, safe_serialization=True)
        torch.save(optimizer.state_dict(), directory / "optimizer.pt")
    save_file({"torch_rng": torch.get_rng_state()}, directory / f"rng_{rank}.safetensors")  # each rank its own (dropout)
    if rank == 0:
        (directory / "state.json").write_text(json.dumps({**state, "strategy": "fsdp" if fsdp else "ddp", "lora": lora}))


def mismatch(directory: Path, strategy: str, lora: bool) -> str | None:
    """Why a checkpoint cannot be resumed with this strategy and LoRA setting, or None (formats differ between them)."""
    state = directory / "state.json"
    if not state.is_file():
        return f"{directory} is not a dpo-ray checkpoint (no state.json)"
    written = json.loads(state.read_text())
    was = (written.get("strategy", "ddp"), bool(written.get("lora", (directory / ADAPTER).is_dir())))
    if was != (strategy, lora):
        return (f"checkpoint {directory} was written with train.strategy={was[0]}{' and LoRA' if was[1] else ''}; "
                f"resume it with the same strategy and LoRA setting (this run: {strategy}{' and LoRA' if lora else ''})")
    return None


def export(directory: Path, model, rank: int, lora: bool) -> None:
    """fsdp: the whole model (or the adapter) gathered into rank 0's host memory and written in HF format."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full = get_model_state_dict(model, options=_options(lora, full_state_dict=True, cpu_offload=True))
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # a tied head is saved once, as from_pretrained expects
        if first.setdefault(id(p), name) != name:
            full.pop(name, None)
    if rank == 0:
        model.save_pretrained(directory / ADAPTER if lora else directory, state_dict=full, safe_serialization=True)


def load(directory: Path, policy, model, optimizer, fsdp: bool, lora: bool) -> dict:
    """Restores model, optimizer and RNG from a checkpoint directory (every rank calls it); returns state.json."""
    problem = mismatch(directory, "fsdp" if fsdp else "ddp", lora)
    if problem:
        raise ValueError(problem)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(policy, optimizer, options=_options(lora))
        loaded = {"model": model_sd, "optim": optim_sd}
        dcp.load(loaded, checkpoint_id=str(directory / DCP))  # in place, resharded to this run's workers
        set_state_dict(policy, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"], options=_options(lora))
    else:
        if lora:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model, load_file(str(directory / ADAPTER / "adapter_model.safetensors")))
        else:
            model.load_state_dict(load_file(str(directory / "model.safetensors")), strict=False)  # tied weights are saved once
            model.tie_weights()
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    rng = directory / f"rng_{dist.get_rank() if dist.is_initialized() else 0}.safetensors"
    if rng.exists():  # a rank the checkpoint did not have (resumed with more workers) keeps its seeded generator
        torch.set_rng_state(load_file(str(rng))["torch_rng"])
    return json.loads((directory / "state.json").read_text())


def load_optimizer(directory: Path, policy, optimizer, fsdp: bool, lora: bool) -> int:
    """Only the optimizer state of a checkpoint (train.optimizer_from: the weights come from elsewhere, the step count
    stays 0); every rank calls it. Returns the checkpoint's step."""
    problem = mismatch(directory, "fsdp" if fsdp else "ddp", lora)
    if problem:
        raise ValueError(problem)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        loaded = {"optim": get_optimizer_state_dict(policy, optimizer, options=_options(lora))}
        dcp.load(loaded, checkpoint_id=str(directory / DCP))  # the optimizer's entries only, resharded to these workers
        set_optimizer_state_dict(policy, optimizer, optim_state_dict=loaded["optim"], options=_options(lora))
    else:
        optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
    return int(json.loads((directory / "state.json").read_text())["step"])

