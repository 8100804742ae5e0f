"""Resolve, load and fingerprint models and tokenizers (local HF directory, hub id, or the demo model)."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

log = logging.getLogger("dpo_ray")

DEMO_PREFIX = "demo:"
DEMO_MODELS = ("demo:tiny-llama", "demo:tiny-llama-sft")  # random weights; the same after a supervised pass (dpo_ray.demo)


class ModelError(UserError, ValueError):
    """A model or tokenizer the user named cannot be used."""


def resolve_model(name: str, cache_dir: str | Path, claim=None) -> str:
    """A local directory (absolute path), a hub id (unchanged), or a demo model (DEMO_MODELS, built once under
    <cache_dir>/models; demo:tiny-llama-sft from demo:tiny-llama's directory, which it builds first if need be).

    `cache_dir` here is a local directory (a model must be one to load): the driver passes config cache_dir when it
    is local, else output_dir (pipeline.storage.model_root). `claim` (pipeline.lease.model_claim): see _build_once."""
    if "://" in str(cache_dir):
        raise ModelError(f"models are built and downloaded into a local directory, not {cache_dir}")
    if name.startswith(DEMO_PREFIX):
        if name not in DEMO_MODELS:
            raise ModelError(f"unknown demo model {name!r}; the demo models are {', '.join(DEMO_MODELS)}")
        from .demo import DEMO_MODEL_VERSION, DEMO_SFT_VERSION, build_demo_model, build_demo_sft_model

        models = Path(cache_dir).resolve() / "models"
        base = _build_once(models / f"demo-tiny-llama-{DEMO_MODEL_VERSION}", build_demo_model, "the demo model and tokenizer", claim)
        if name == "demo:tiny-llama":
            return str(base)
        return str(_build_once(models / f"demo-tiny-llama-sft-{DEMO_MODEL_VERSION}-{DEMO_SFT_VERSION}",
                               lambda tmp: build_demo_sft_model(tmp, base), "the demo SFT model", claim))
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            raise ModelError(f"{name} is not a Hugging Face model directory (no config.json or tokenizer_config.json)")
        return str(path.resolve())
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name:
        raise ModelError(f"model path {name} does not exist; give a local Hugging Face directory or a hub id like org/name")
    return name  # a hub id: transformers resolves it (from its local cache when offline)


def _build_once(out: Path, build, what: str, claim=None) -> Path:
    """out, built by build(tmp_dir) into a temporary sibling and renamed, unless it is there already (config.json: it
    only ever appears with the whole directory). A concurrent builder that renames first wins; the other's copy is
    dropped. With `claim(out, what)`, a context manager (pipeline.lease.model_claim), a run that finds another
    building the same model waits for it instead of building it too."""
    if (out / "config.json").exists():
        return out
    with claim(out, what) if claim else contextlib.nullcontext():
        if (out / "config.json").exists():  # built by the run we waited for
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
        try:
            build(tmp)
            try:
                tmp.rename(out)
                log.info("built %s in %s", what, out)
            except OSError as e:  # ENOTEMPTY/EEXIST: a concurrent builder renamed first, a hit; else out is not a model
                if not (out / "config.json").exists():
                    raise ModelError(f"cannot put {what} in place at {out} ({e.strerror or e}); remove {out} and run again") from None
                log.info("%s was built by another run meanwhile (%s); this run's copy is dropped", what, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(name: str, trust_remote_code: bool = False, token: str | None = None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code, token=token)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer {name}: {str(e).splitlines()[0]}") from e
    if not tok.chat_template:
        raise ModelError(f"tokenizer {name} has no chat template; use the SFT model's tokenizer (model.tokenizer) or add chat_template to its tokenizer_config.json")
    if tok.eos_token_id is None:
        raise ModelError(f"tokenizer {name} has no eos_token; set eos_token in its tokenizer_config.json")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # padding is masked out; any id will do
    return tok


def load_model(name: str, trust_remote_code: bool = False, dtype=None, token: str | None = None, **kwargs):
    """A causal LM from a local directory or hub id; a LoRA adapter directory (adapter_config.json, as exported with
    train.lora.merge=false) loads its base and merges the adapter in."""
    import torch
    from transformers import AutoModelForCausalLM

    if (Path(name) / "adapter_config.json").is_file():
        import json

        base = json.loads((Path(name) / "adapter_config.json").read_text())["base_model_name_or_path"]
        return merge_adapter(base, name, trust_remote_code, token, dtype, **kwargs)
    try:
        return AutoModelForCausalLM.from_pretrained(name, dtype=dtype or torch.float32, trust_remote_code=trust_remote_code,
                                                    token=token, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {name}: {str(e).splitlines()[0]}") from e


def empty_model(name: str, trust_remote_code: bool = False, token: str | None = None):
    """The model's modules from its config.json alone: parameters on the meta device (no memory, no weights read),
    buffers real (rotary tables are not in the state dict); a tied head tied, as from_pretrained does."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code, token=token)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config of model {name}: {str(e).splitlines()[0]}") from e
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    model.tie_weights()
    return model


def merge_adapter(base: str, adapter: str | Path, trust_remote_code: bool = False, token: str | None = None, dtype=None, **kwargs):
    """The base model with a peft LoRA adapter merged into its weights: a plain transformers model (W + B A alpha/r)."""
    from peft import PeftModel

    model = load_model(base, trust_remote_code, dtype, token, **kwargs)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def enable_activation_checkpointing(model) -> None:
    """Each decoder layer's activations recomputed in backward (non-reentrant torch checkpoint): less memory for
    long sequences, the layers' forward run twice. transformers 5 names it activation checkpointing, 4 gradient."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def _hash_file(h, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)


def fingerprint_model(name: str) -> str:
    """Content hash of a local model's config and weights; for a hub id, of the id and its cached commit."""
    h = hashlib.sha256()
    path = Path(name)
    if path.is_dir():
        for f in sorted(path.iterdir()):
            if f.name == "config.json" or f.suffix in (".safetensors", ".bin", ".pt") or f.name.endswith(".index.json"):
                h.update(f.name.encode())
                _hash_file(h, f)
    else:
        h.update(f"hub:{name}".encode())
        try:
            from huggingface_hub import snapshot_download

            h.update(Path(snapshot_download(name, local_files_only=True)).name.encode())  # the commit hash
        except Exception:  # not in the local cache: the id alone keys it
            log.warning("reference cache key for %s uses the hub id only (no local snapshot to hash)", name)
    return h.hexdigest()[:16]


def fingerprint_tokenizer(tok) -> str:
    """Hash of what changes token ids: the vocabulary/merges, special tokens and the chat template."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update(backend.to_str().encode() if backend is not None else repr(sorted(tok.get_vocab().items())).encode())
    h.update(repr((tok.chat_template, tok.eos_token, tok.pad_token, tok.bos_token)).encode())
    return h.hexdigest()[:16]
