"""The trained model out of Ray Train's final checkpoint: <output_dir>/model (Hugging Face files and the tokenizer)
and, with LoRA, <output_dir>/adapter; each written aside and swapped in whole."""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from dpo_ray.checkpoint import ADAPTER
from dpo_ray.config import Config
from dpo_ray.model import merge_adapter

from .artifacts import atomic_dir

log = logging.getLogger("dpo_ray")


def replace_dir(out: Path, fill) -> Path:
    """fill(tmp) writes a directory aside; it then replaces `out` (the old one kept until the new one is in place)."""
    new = out.parent / (out.name + ".new")
    with atomic_dir(new) as tmp:
        fill(tmp)
    (new / "_COMPLETE").unlink()
    old = out.parent / (out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def export_model(checkpoint, tokenizer, out_dir: Path, cfg: Config, policy_path: str) -> Path:
    """The final checkpoint -> <output_dir>/model (HF files + tokenizer) and, with LoRA, <output_dir>/adapter (loads
    with PeftModel.from_pretrained on the base). The merged LoRA model is built here, in this one process: the base
    from disk plus the adapter, merged (one full copy of the weights). Returns the directory to evaluate and log."""
    lora = cfg.train.lora
    with checkpoint.as_directory() as d:
        d = Path(d)
        if lora is None:
            copy = lambda tmp: [shutil.copy2(f, tmp / f.name) for f in d.iterdir()  # noqa: E731
                                if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors" and not f.name.startswith("rng")]
            return replace_dir(out_dir / "model", lambda tmp: (copy(tmp), tokenizer.save_pretrained(tmp)))
        adapter = replace_dir(out_dir / "adapter", lambda tmp: (shutil.copytree(d / ADAPTER, tmp, dirs_exist_ok=True), tokenizer.save_pretrained(tmp)))
    if not lora.merge:
        return adapter

    def merged(tmp: Path) -> None:
        model = merge_adapter(policy_path, adapter, cfg.model.trust_remote_code, cfg.model.hf_token)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    log.info("export: merging the LoRA adapter into %s -> %s", policy_path, out_dir / "model")
    return replace_dir(out_dir / "model", merged)
