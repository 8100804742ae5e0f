"""LogpsScorer: a Ray Data actor class that adds `<prefix>chosen_logps` / `<prefix>rejected_logps` columns, and their
LD-DPO shared parts `<prefix>chosen_shared_logps` / `<prefix>rejected_shared_logps` (the sums over the first
min(|chosen|, |rejected|) reply tokens: any train.ld_alpha reads them from one pass); with wpo=True also
`<prefix>chosen_wpo_logweight` / `<prefix>rejected_wpo_logweight` (the policy's WPO log-weights, for evaluation).

Used by the reference stage (prefix "ref_") and by evaluation (prefix "policy_"). The reference stage marks its eval rows
with a boolean `check` column: those are scored a second time, in the same forwards, into `check_*` columns, the
reference's own eval check from the same model load (pipeline/evaluate.py). The same forwards, because in bf16 other
micro-batches move a sum by up to 3e-3 of its size on this CPU (other packing, other accumulation order), a noise
that would read as accuracy; the check is of the cache's round trip and of the scorer's determinism. The model is loaded
once per actor and kept across batches; forward only, under inference_mode, in the policy's own numerics:
fp32 weights, and bf16 autocast where training uses it (train.bf16), through the same PolicyLogps forward; with
train.strategy=fsdp and bf16, bf16 weights, as FSDP2's mixed precision computes with bf16 copies of them; likewise
with LoRA and bf16, whose frozen base is kept in bf16 (dpo_ray.parallel.scores_in_bf16_weights).
So at step 1 the policy reads the reference's numbers up to batch-shape rounding: rewards and margins
start at zero and the loss at ln 2 (with bf16 weights instead, the two would differ by bf16 weight rounding).
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np
import pyarrow as pa
import torch

from .forward import PolicyLogps, autocast
from .model import load_model, load_tokenizer
from .packing import pair_tokens, token_budget_groups

log = logging.getLogger("dpo_ray")


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else "-"
    except Exception:  # outside Ray
        return "-"


def scoring_precision(bf16: bool, bf16_weights: bool = False) -> str:
    """Part of the reference cache key: log-probs computed one way are not reused for another."""
    return ("bf16-weights+bf16-autocast" if bf16_weights else "fp32-weights+bf16-autocast") if bf16 else "fp32"


class LogpsScorer:
    def __init__(self, model_path: str, tokenizer_path: str, prefix: str, trust_remote_code: bool = False, threads: int | None = None,
                 token: str | None = None, bf16: bool = False, attention: str = "sdpa", bf16_weights: bool = False,
                 max_tokens: int | None = None, wpo: bool = False):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")  # an actor's own process
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        split = torch.cuda.device_count() > 1  # reference.gpus_per_actor > 1: the layers spread over this actor's GPUs
        dtype = torch.bfloat16 if bf16 and bf16_weights else torch.float32  # bf16 weights: FSDP2's compute copies, LoRA's bf16 base
        model = load_model(model_path, trust_remote_code, dtype=dtype, token=token, **({"device_map": "auto"} if split else {}))
        if split:
            placed = sorted(set(str(v) for v in model.hf_device_map.values()))
            log.info("scoring %s: split over %d GPUs (%s) by device_map=auto", model_path, len(placed), ", ".join(placed))
        self.model = PolicyLogps(model, attention=attention).eval()
        if not split:
            self.model.to(self.device)
        self.precision = autocast(bf16, self.device)
        self.pad_id = load_tokenizer(tokenizer_path, trust_remote_code, token).pad_token_id
        self.prefix = prefix
        self.max_tokens = max_tokens  # packed tokens per forward; None: the whole block in one forward
        self.outputs = ("logps", "shared") + (("wpo",) if wpo else ())
        self.delay = float(os.environ.get("DPO_RAY_SCORE_DELAY_S", 0))  # fault tests only: paces the blocks
        log.info("scoring actor for %s (%s) on node %s", model_path, prefix.rstrip("_"), _node_id())
        self.names = {"logps": "logps", "shared": "shared_logps", "wpo": "wpo_logweight"}
        self.check_outputs = ("logps", "shared", "wpo")  # the check scores what evaluation of any loss reads


    def logps(self, cols: dict, extras: tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
        """{output: (2B,) float32 on the CPU, order [chosen; rejected]}, from rows of token ids and loss masks."""
        extras = self.outputs[1:] if extras is None else extras
        with torch.inference_mode(), self.precision:
            logps, _, extras = self.model(self.model.collate(cols, self.pad_id, self.device, extras=extras))
        return {"logps": logps.float().cpu(), **{k: v.float().cpu() for k, v in extras.items()}}

    def __call__(self, table: pa.Table) -> pa.Table:
        """The block's pairs sorted by length and scored in forwards of at most max_tokens packed tokens each (a longer
        pair alone); the log-probs are put back in the block's row order. Rows with `check` true are scored again, in
        the same forwards, into check_* columns (NaN on the other rows)."""
        n = table.num_rows
        if self.delay:
            time.sleep(self.delay)
        tokens = pair_tokens(table)
        groups = token_budget_groups(tokens, self.max_tokens) if self.max_tokens else [list(range(n))]
        table = self._append(table, self.prefix, self._score(table, groups, self.outputs), self.outputs)
        if "check" in table.column_names:  # the same forwards again (those holding a checked row), kept for checked rows
            check = np.array(table["check"].to_pylist(), dtype=bool)
            values = self._score(table, [g for g in groups if check[g].any()], self.check_outputs)
            for v in values.values():
                v[~np.concatenate([check, check])] = np.nan
            table = self._append(table, "check_", values, self.check_outputs)
        return table

    def _score(self, table: pa.Table, groups: list[list[int]], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        """{output: (2n,) float32, [chosen; rejected] in row order}; rows in no group stay NaN."""
        n = table.num_rows
        values = {k: np.full(2 * n, np.nan, dtype=np.float32) for k in outputs}
        for idx in groups:
            part = table.take(pa.array(idx, type=pa.int64()))
            cols = {k: part.column(k).to_pylist() for k in ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")}
            for k, out in self.logps(cols, outputs[1:]).items():
                out = out.numpy().astype(np.float32)
                values[k][idx], values[k][[n + i for i in idx]] = out[: len(idx)], out[len(idx):]
        return values

    def _append(self, table: pa.Table, prefix: str, values: dict, outputs: tuple[str, ...]) -> pa.Table:
        n = table.num_rows
        for k in outputs:
            table = table.append_column(f"{prefix}chosen_{self.names[k]}", pa.array(values[k][:n], type=pa.float32()))
            table = table.append_column(f"{prefix}rejected_{self.names[k]}", pa.array(values[k][n:], type=pa.float32()))
        return table
