"""Benchmark row: TRL's `DPOTrainer` (trl 1.16) on one model, data set and batch.

    python benchmarks/trl_row.py '<spec as JSON>'   -> prints the result dict as one JSON line

`run(spec)` trains a causal LM with `trl.DPOTrainer` for `warmup_steps + steps` optimizer steps and
measures the last `steps`. What TRL 1.16 does, read from its installed source, and how this row uses it:

* Config. `DPOConfig` extends TRL's `_BaseConfig`, whose defaults differ from `TrainingArguments`:
  `gradient_checkpointing=True` and `bf16=True` unless `fp16` is set: gradient checkpointing is switched
  off here, and bf16 follows the spec (off on CPU; on CUDA autocast over fp32 weights, as in the other rows). The optimizer is its default under torch >= 2.8, `adamw_torch_fused` (`torch.optim.AdamW(fused=True)`,
  betas 0.9/0.999, eps 1e-8: the kernel the project's own loop and the seed loop row use), asked for by name,
  weight_decay 0, `lr_scheduler_type="constant"` (no warmup, no decay), grad accumulation 1,
  max_grad_norm 1.0 (TRL's default and the project's), `loss_type=["sigmoid"]`, the given `beta`.
* Truncation. `DPOConfig` has `max_length` (prompt + reply, default 1024) and `truncation_mode`
  (only `"keep_start"` is supported; `"keep_end"` is deprecated), applied per sequence by the collator:
  `(prompt + reply)[:max_length]`. There is no `max_prompt_length` any more (nor
  `max_completion_length`). To honour the spec's `max_prompt_length` this row overrides
  `_prepare_dataset`: when a pair's prompt + longer reply exceeds `max_length`, the prompt is cut from
  the left to `max_prompt_length` tokens (the old TRL rule, and the project's `dpo_ray.data.truncate`);
  the collator then cuts the reply from the right. TRL's own filter (drop pairs whose prompt alone
  fills `max_length`) is applied after that cut rather than before.
* Tokenisation (`_prepare_dataset`): the MiniMind chat rows are conversational, so `extract_prompt`
  takes the longest common prefix of turns as the prompt; the prompt is rendered with
  `add_generation_prompt=True`, prompt+reply without it, and the reply ids are the tail after the
  common token prefix (so the template's `<|im_end|>\\n` after the reply is part of the reply; no EOS is
  appended for conversational data).
* Padding. `DataCollatorForPreference` stacks [chosen..., rejected...] into one batch of 2*B rows and
  right-pads to the longest row in that batch (dynamic padding, not to `max_length`);
  `pad_to_multiple_of="auto"` means no rounding except on Neuron. `padding_free` exists in the config
  but is disabled in 1.16 ("temporarily unavailable since the DPO refactor": it warns and falls back
  to padding, on every device, CPU included), so it is left False.
* Reference model. With `ref_model=None` and no precompute, TRL reloads the model from
  `model.config._name_or_path` (the same local dir, same dtype and attention implementation), i.e. a
  frozen copy of the starting policy, and runs it under `no_grad` inside every training step (that
  forward is inside the measured time). With `precompute_ref_log_probs=True` it keeps no reference
  model: `DPOTrainer.__init__` calls `self._precompute_ref_logps(train_dataset, "train", bs)`, which
  runs the *policy* (not yet trained) over the whole train dataset with batch size
  `precompute_ref_batch_size or per_device_train_batch_size` and concatenates the log-probs as columns.
  TRL caches that result in the dataset's cache dir keyed by (data fingerprint, model hash); the data
  set here is built in memory (`Dataset.from_list`), so the cache lands in a per-process temp dir and
  every run really recomputes.
* Data. The train set is exactly the pairs the run needs, (warmup_steps + steps) * batch_size pairs
  drawn from the JSONL file by a shuffle seeded with `seed` (cycled if the file is shorter), so the
  reference pre-pass covers the pairs trained on and nothing more; TRL's sampler then shuffles them.
"""
from __future__ import annotations

import json
import logging
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference pre-pass bar reads this
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.common import peak_gpu_mb, peak_rss_mb  # noqa: E402

# Filled by run(): per-step records and the pairs used, for tests that check the counts independently.
_LAST: dict = {}


def _quiet() -> None:
    warnings.filterwarnings("ignore")
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    for name in ("trl", "accelerate", "datasets", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _load_pairs(path: str, n: int, seed: int) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                obj = json.loads(line)
                rows.append({"chosen": obj["chosen"], "rejected": obj["rejected"]})
    if not rows:
        raise ValueError(f"no pairs in {path}")
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[order[i % len(order)]] for i in range(n)]


def run(spec: dict) -> dict:
    _quiet()
    import torch

    torch.set_num_threads(int(spec["threads"]))

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    bs = int(spec["batch_size"])
    warmup = int(spec["warmup_steps"])
    steps = int(spec["steps"])
    max_length = int(spec["max_length"])
    max_prompt_length = int(spec["max_prompt_length"])
    precompute = bool(spec.get("precompute_ref", False))
    seed = int(spec.get("seed", 0))
    total_steps = warmup + steps

    records: list[dict] = []  # one per training_step call (grad accumulation is 1: one per optimizer step)
    step_seconds: dict[int, float] = {}  # global step (1-based) -> seconds from on_step_begin to on_step_end
    window: dict = {}
    ref: dict = {"seconds": 0.0, "forward_seconds": 0.0, "tokens": 0, "positions": 0, "pairs": 0, "calls": 0, "call_seconds": []}

    class _StepTimer(TrainerCallback):
        # on_step_begin fires after the Trainer has fetched and collated the step's batch and before
        # training_step; on_step_end fires after backward, grad clipping, optimizer.step, scheduler step and
        # zero_grad, before logging/saving. So the per-step time is forward + backward + optimizer step.
        def on_step_begin(self, args, state, control, **kw):
            self._t0 = time.perf_counter()
            if state.global_step == warmup:
                window["start"] = self._t0

        def on_step_end(self, args, state, control, **kw):
            t1 = time.perf_counter()
            step_seconds[state.global_step] = t1 - self._t0
            if state.global_step == total_steps:
                window["end"] = t1

    class _Trainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            # Tokenise with TRL's own code but without its max_length filter (args.max_length is read only
            # by that filter here; the collator already holds its own copy), then cut prompts to
            # max_prompt_length and apply the filter ourselves.
            saved = args.max_length
            args.max_length = None
            try:
                dataset = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
            finally:
                args.max_length = saved

            def cut_prompt(ex):
                p = ex["prompt_ids"]
                longest = max(len(ex["chosen_ids"]), len(ex["rejected_ids"]))
                if len(p) + longest > max_length and len(p) > max_prompt_length:
                    p = p[-max_prompt_length:]
                return {"prompt_ids": p}

            dataset = dataset.map(cut_prompt)
            return dataset.filter(lambda ex: len(ex["prompt_ids"]) < max_length)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            # TRL's whole reference pre-pass (called from DPOTrainer.__init__): building the DataLoader, the
            # collation, the no-grad forwards (compute_ref_log_probs), and writing the log-probs to an Arrow
            # cache file and concatenating them to the data set. Timed around the call with perf_counter.
            t0 = time.perf_counter()
            out = super()._precompute_ref_logps(dataset, name, batch_size)
            ref["seconds"] += time.perf_counter() - t0
            return out

        def compute_ref_log_probs(self, model, inputs):
            # Called only by the pre-pass, once per reference batch: the forward alone, and its tokens.
            t0 = time.perf_counter()
            out = super().compute_ref_log_probs(model, inputs)
            dt = time.perf_counter() - t0
            ref["forward_seconds"] += dt
            ref["call_seconds"].append(dt)
            ref["tokens"] += int(inputs["attention_mask"].sum())
            ref["positions"] += int(inputs["input_ids"].numel())
            ref["pairs"] += int(inputs["input_ids"].shape[0]) // 2
            ref["calls"] += 1
            return out

        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            mask = inputs["attention_mask"]
            records.append({
                "step": self.state.global_step + 1,  # the optimizer step this batch belongs to (1-based)
                "tokens": int(mask.sum()),  # chosen + rejected rows, real tokens
                "positions": int(inputs["input_ids"].numel()),  # padding included
                "pairs": int(inputs["input_ids"].shape[0]) // 2,
                "loss": float(loss.detach()),
                "input_ids": inputs["input_ids"].tolist() if spec.get("_keep_batches") else None,
                "attention_mask": mask.tolist() if spec.get("_keep_batches") else None,
            })
            return loss

    pairs = _load_pairs(spec["data"], total_steps * bs, seed)
    train_dataset = Dataset.from_list(pairs)
    tokenizer = AutoTokenizer.from_pretrained(spec["tokenizer_dir"])

    with tempfile.TemporaryDirectory(prefix="trl_row_") as out_dir:
        config = DPOConfig(
            output_dir=out_dir,
            # precision / memory
            bf16=bool(spec.get("bf16", False)),  # on CUDA: autocast over fp32 weights, as the other rows
            fp16=False,
            gradient_checkpointing=False,
            use_cpu=spec.get("device", "cpu") == "cpu",
            model_init_kwargs={"dtype": torch.float32},
            # optimisation
            optim="adamw_torch_fused",
            learning_rate=float(spec["lr"]),
            weight_decay=0.0,
            adam_beta1=0.9,
            adam_beta2=0.999,
            adam_epsilon=1e-8,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_grad_norm=float(spec.get("max_grad_norm", 1.0)),
            per_device_train_batch_size=bs,
            gradient_accumulation_steps=1,
            max_steps=total_steps,
            seed=seed,
            # DPO
            loss_type=["sigmoid"],
            beta=float(spec["beta"]),
            max_length=max_length,
            truncation_mode="keep_start",
            padding_free=False,
            precompute_ref_log_probs=precompute,
            # no eval, no checkpoints, no trackers, no bars
            eval_strategy="no",
            save_strategy="no",
            logging_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            dataloader_pin_memory=False,
        )
        trainer = _Trainer(
            model=spec["model_dir"],
            ref_model=None,
            args=config,
            train_dataset=train_dataset,
            processing_class=tokenizer,
            callbacks=[_StepTimer()],
        )
        # With disable_tqdm the Trainer installs PrinterCallback, which prints the end-of-training summary.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        trainer.train()
        ref_model_kept = trainer.ref_model is not None
        facts = {
            "optimizer": type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer).__name__,
            "param_groups": [{k: g[k] for k in ("lr", "betas", "eps", "weight_decay", "fused", "foreach") if k in g} | {"n": len(g["params"])} for g in trainer.optimizer.param_groups],
            "lr_scheduler": type(trainer.lr_scheduler).__name__,
            "last_lr": trainer.lr_scheduler.get_last_lr(),
            "policy_dtype": str(trainer.model.dtype),
            "ref_dtype": str(trainer.ref_model.dtype) if ref_model_kept else None,
            "ref_requires_grad": any(p.requires_grad for p in trainer.ref_model.parameters()) if ref_model_kept else None,
            "ref_training": trainer.ref_model.training if ref_model_kept else None,
            "gradient_checkpointing": trainer.model.is_gradient_checkpointing,
            "device": str(trainer.args.device),
            "loss_type": trainer.loss_types,
            "beta": trainer.beta,
        }

    measured = [r for r in records if warmup < r["step"] <= total_steps]
    seconds = sum(step_seconds[s] for s in range(warmup + 1, total_steps + 1))
    tokens = sum(r["tokens"] for r in measured)
    positions = sum(r["positions"] for r in measured)
    n_pairs = sum(r["pairs"] for r in measured)
    name = "TRL DPOTrainer" + (" + precompute_ref_log_probs" if precompute else "")
    result = {
        "name": name,
        "steps": len(measured),
        "pairs": n_pairs,
        "tokens": tokens,
        "positions": positions,
        "padding_fraction": 1.0 - tokens / positions if positions else 0.0,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "pairs_per_s": n_pairs / seconds if seconds else 0.0,
        # Wall time from the first measured on_step_begin to the last on_step_end: also counts batch
        # fetching/collation and the Trainer's between-step bookkeeping. For information only.
        "window_seconds": window["end"] - window["start"] if "start" in window and "end" in window else None,
        "first_loss": records[0]["loss"] if records else None,
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak_gpu_mb(),
    }
    if precompute:
        result["ref_seconds"] = ref["seconds"]
        result["ref_tokens"] = ref["tokens"]
        result["ref_tokens_per_s"] = ref["tokens"] / ref["seconds"] if ref["seconds"] else 0.0
        result["ref_forward_seconds"] = ref["forward_seconds"]  # the forwards alone, without loader and cache
        result["ref_pairs"] = ref["pairs"]
    _LAST.clear()
    _LAST.update(records=records, step_seconds=step_seconds, ref=ref, pairs=pairs, ref_model_kept=ref_model_kept, facts=facts)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python benchmarks/trl_row.py '<spec as JSON>'")
    print(json.dumps(run(json.loads(sys.argv[1]))), flush=True)
