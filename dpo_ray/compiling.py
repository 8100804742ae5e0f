"""train.compile: regional torch.compile of the decoder layers, as torchtitan does, with what it costs counted.

Each decoder layer's `forward` is compiled (the module's hooks stay eager around it: DDP's, FSDP2's all-gathers and
peft's wrappers work unchanged). Every layer has the same code, so one compiled graph serves them all
(dynamo's inlined nn.Modules take the parameters as inputs). The packed attention is a graph break
(packing.packed_attention runs eagerly with its own kernels: SDPA per block, varlen flash, FlexAttention), and the
layers see tensors only (the packed layout rides on the placeholder mask), so what is fused are the norms, rotary,
activations and residuals around the matmuls. Packed rows change length every step: the sequence dimension is
dynamic from the first compile (`dynamic=True`), so the graphs are compiled once, not per length.

No compiler for inductor's kernels (a C++ compiler on CPU, a C compiler for Triton's launcher on CUDA), or an error
while compiling: one warning line, and the layers run eagerly from then on. Pure torch: no Ray, no MLflow.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import time

import torch
from torch import nn

log = logging.getLogger("dpo_ray")


def compiler_missing(device) -> str | None:
    """Why inductor cannot build kernels on `device` here (None when it can)."""
    cuda = torch.device(device).type == "cuda"
    names = [os.environ.get("CC" if cuda else "CXX"), *(("cc", "gcc", "clang") if cuda else ("g++", "c++", "clang++"))]
    if any(n and shutil.which(n) for n in names):
        return None
    return f"no {'C compiler (cc, gcc or clang) for Triton' if cuda else 'C++ compiler (g++, c++ or clang++) for inductor'} on PATH"


class CompileStats:
    """Graphs compiled and seconds spent compiling in this process, from dynamo's compile callbacks (forward graphs and
    lazily compiled backward graphs alike). `recompiles`: graphs compiled after `mark_warm()` (the first step's end)."""

    def __init__(self):
        self.graphs, self.seconds, self.after_warm = 0, 0.0, None
        self._depth, self._t0, self._lock = 0, 0.0, threading.Lock()
        from torch._dynamo.callback import callback_handler

        callback_handler.register_start_callback(self._start)
        callback_handler.register_end_callback(self._end)

    def _start(self, *args) -> None:
        with self._lock:
            self.graphs += 1
            if self._depth == 0:
                self._t0 = time.perf_counter()
            self._depth += 1

    def _end(self, *args) -> None:
        with self._lock:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self.seconds += time.perf_counter() - self._t0

    def mark_warm(self) -> None:
        if self.after_warm is None:
            self.after_warm = self.graphs

    @property
    def recompiles(self) -> int:
        return 0 if self.after_warm is None else self.graphs - self.after_warm

    def metrics(self) -> dict:
        return {"compile_graphs": self.graphs, "compile_seconds": round(self.seconds, 3), "recompiles": self.recompiles}


class _Fallback:
    """The compiled forward; on an error raised while compiling, one warning and the eager forward from then on (for
    every layer: they share `state`)."""

    def __init__(self, eager, compiled, state: dict):
        self.eager, self.compiled, self.state = eager, compiled, state

    def __call__(self, *args, **kwargs):
        if self.state.get("failed"):
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except compile_errors() as e:
            self.state["failed"] = first_line(e)
            log.warning("train.compile: compiling a decoder layer failed (%s); the step runs eagerly", self.state["failed"])
            return self.eager(*args, **kwargs)


def compile_errors() -> tuple[type[BaseException], ...]:
    """What torch raises when a graph cannot be traced or its kernels cannot be built (not errors of the model itself)."""
    from torch._dynamo import exc

    errors = [exc.BackendCompilerFailed, exc.InternalTorchDynamoError, exc.Unsupported]
    try:
        from torch._inductor.exc import InductorError

        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


def first_line(e: BaseException) -> str:
    """The innermost cause's first line (dynamo wraps a backend's error: BackendCompilerFailed from RuntimeError ...)."""
    while (inner := getattr(e, "inner_exception", None) or e.__cause__) is not None:
        e = inner
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def compile_layers(layers: list[nn.Module], device, backend: str = "inductor") -> CompileStats | None:
    """Compile each layer's forward in place (regional compile); returns the stats to log, or None (one warning)
    when this machine cannot compile, the layers left eager."""
    why = compiler_missing(device) if backend == "inductor" else None
    if why:
        log.warning("train.compile: %s; the step runs eagerly", why)
        return None
    stats, state = CompileStats(), {}
    for layer in layers:
        compiled = torch.compile(layer.forward, backend=backend, dynamic=True)
        layer.forward = _Fallback(layer.forward, compiled, state)
    log.info("train.compile: %d decoder layers compiled (%s, dynamic sequence length)", len(layers), backend)
    return stats
