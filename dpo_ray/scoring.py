"""LogpsScorer: a Ray Data actor class that adds `<prefix>chosen_logps` / `<prefix>rejected_logps` columns.

Used by the reference stage (prefix "ref_") and by evaluation (prefix "policy_"). The model is loaded
once per actor and kept across batches; forward only, under inference_mode; bf16 on GPU, fp32 on CPU.
"""
from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import torch

from .forward import PolicyLogps
from .model import load_model, load_tokenizer


def scoring_dtype(use_gpu: bool) -> torch.dtype:
    return torch.bfloat16 if use_gpu else torch.float32


class LogpsScorer:
    def __init__(self, model_path: str, tokenizer_path: str, prefix: str, trust_remote_code: bool = False, threads: int | None = None,
                 token: str | None = None):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(threads or os.cpu_count() or 1)
        dtype = scoring_dtype(self.device.type == "cuda")
        self.model = PolicyLogps(load_model(model_path, trust_remote_code, dtype=dtype, token=token)).to(self.device).eval()
        self.pad_id = load_tokenizer(tokenizer_path, trust_remote_code, token).pad_token_id
        self.prefix = prefix

    def __call__(self, table: pa.Table) -> pa.Table:
        cols = {k: table.column(k).to_pylist() for k in ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")}
        with torch.inference_mode():
            logps, _ = self.model(self.model.collate(cols, self.pad_id, self.device))
        logps = logps.float().cpu().numpy().astype(np.float32)
        n = table.num_rows
        table = table.append_column(f"{self.prefix}chosen_logps", pa.array(logps[:n], type=pa.float32()))
        return table.append_column(f"{self.prefix}rejected_logps", pa.array(logps[n:], type=pa.float32()))
