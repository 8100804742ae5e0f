"""torch.profiler on dpo-ray's training step: what a step costs in operator calls, kernel launches, host syncs and host time.

The step is the Ray Train worker's own (`dpo_ray.train_loop.train_step`: collate, forward, loss, backward, clip, AdamW),
called directly, without a Ray runtime; its rows are read as the worker reads them (`dpo_ray.rows`: a Parquet cache in
row groups of 64, RowIndex / RowReader, the epoch's seeded permutation, a prefetch thread two steps ahead). The model is Qwen2.5-0.5B's shape with random
weights, built from a config in memory (nothing downloaded), on the `long` data of benchmarks/common.py (sequences near
1024 tokens), batch 8, max_length 1024, max_prompt_length 512: the benchmark's row.

    python benchmarks/profile_step.py --device cpu --out /tmp/prof            # the CPU proxies (2 layers by default)
    python benchmarks/profile_step.py --device cuda --out $OUT/profile        # on the GPU machine: 3 steps, 24 layers
    python benchmarks/profile_step.py --device cpu --compile --out /tmp/prof-c   # train.compile: the layers compiled

Writes <out>/summary.txt (printed too) and <out>/summary.json first, then <out>/trace.json.gz (the Chrome trace:
chrome://tracing or ui.perfetto.dev). Steps: warm-up (unprofiled; with --compile the compiling ones), timed
(unprofiled: the step time without the profiler's overhead), then profiled. Counts are per profiled step:

- aten calls: every `aten::` operator the profiler records (nested calls included: aten::linear and its aten::addmm).
- kernel calls: the CUDA-kernel proxy on any device: *leaf* aten calls (no aten call inside them) that are not views or
  metadata (NO_KERNEL: view/reshape/transpose/expand/slice/select/detach/empty/... and aten::to without a copy), nor
  sync reads (aten::_local_scalar_dense). On CUDA each such call launches at least one kernel (fused AdamW a few).
  With --compile, each call of an inductor kernel counts as one too (on CPU its C++ kernels are recorded by name:
  inductor's cpp.enable_kernel_profile), and the aten calls a compiled graph still makes (extern matmuls) as before.
  On CUDA the summary also counts the kernels the GPU ran and the launch calls the host made (cudaLaunchKernel & co.).
- host syncs: Python reads of tensor values (Tensor.item / tolist / __bool__ / __float__ / __int__ / numpy, and
  nonzero), counted by a TorchFunctionMode outside the read and the collate (whose tensors are host data), and the aten
  calls that wait for the device on CUDA (_local_scalar_dense, which .item() and repeat_interleave with tensor
  repeats run, nonzero, bincount, masked_select, unique; one inside another counted once); on CUDA also the
  runtime's synchronize calls.
- host time per phase: the `dpo_ray.*` record_function ranges of train_step (read, collate, attention masks,
  forward, backward, optimizer, metrics); on CUDA also the GPU time of the kernels, the GPU idle fraction of the
  profiled span, and the top kernels by GPU time.
On CPU the default is 2 of the 24 layers (same widths, full vocabulary: a 24-layer step at 1024 tokens takes minutes
on 2 cores); per-layer counts scale with the layers, and the summary gives both the measured counts and the per-layer
split (a second short run with 1 layer separates the per-layer from the fixed part: --layers-delta).
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

NO_KERNEL = {  # leaf aten calls that launch no kernel on CUDA: views, metadata, allocation
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::transpose",
    "aten::t", "aten::permute", "aten::expand", "aten::expand_as", "aten::unsqueeze", "aten::squeeze", "aten::select",
    "aten::slice", "aten::narrow", "aten::split", "aten::split_with_sizes", "aten::unbind", "aten::chunk", "aten::alias",
    "aten::detach", "aten::detach_", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::lift_fresh", "aten::unflatten", "aten::flatten", "aten::contiguous", "aten::to", "aten::set_",
    "aten::result_type", "aten::is_nonzero", "aten::numpy_T", "aten::view_as", "aten::_local_scalar_dense",
    "aten::item", "aten::is_same_size", "aten::size", "aten::stride", "aten::dim", "aten::_has_compatible_shallow_copy_type",
    "aten::requires_grad_", "aten::retain_grad", "aten::_version", "aten::output_nr", "aten::_nested_tensor_from_mask_left_aligned",
    "aten::_unsafe_split", "aten::movedim", "aten::swapaxes", "aten::_neg_view", "aten::_conj", "aten::resolve_conj",
    "aten::resolve_neg", "aten::record_stream", "aten::pin_memory", "aten::is_pinned", "aten::sym_size", "aten::sym_numel",
}
SYNC_OPS = ("aten::_local_scalar_dense", "aten::nonzero", "aten::bincount", "aten::masked_select", "aten::unique", "aten::_unique2",
            "aten::unique_consecutive")  # repeat_interleave with tensor repeats syncs through its _local_scalar_dense
SYNC_CALLS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero")
CUDA_SYNCS = ("cudaDeviceSynchronize", "cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaStreamWaitEvent")
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaLaunchCooperativeKernel")
TINY = (64, 2, 4, 2, 128)  # --model tiny: the dry run's shape (hidden, layers, heads, KV heads, MLP), same code
PHASES = ("dpo_ray.read", "dpo_ray.collate", "dpo_ray.attention_masks", "dpo_ray.forward", "dpo_ray.backward",
          "dpo_ray.optimizer", "dpo_ray.metrics")


class SyncCounter(torch.overrides.TorchFunctionMode):
    """Counts Python reads of tensor values (each one a host-device sync on CUDA) while `on`."""

    def __init__(self):
        super().__init__()
        self.on, self.calls = False, Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.on and name in SYNC_CALLS:
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def build(args, work: Path):
    """Model (random weights, from a config), tokenizer directory, and the worker's row index over a Parquet cache."""
    import pyarrow as pa
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from benchmarks.common import QWEN, model_dir, tokenized_pairs, write_long
    from dpo_ray.packing import pair_tokens
    from dpo_ray.rows import RowIndex

    tiny = model_dir(work, "tiny")  # the demo tokenizer (its ids are a subset of the Qwen vocabulary)
    hidden, layers, heads, kv_heads, mlp = QWEN[args.model] if args.model in QWEN else TINY
    config = Qwen2Config(vocab_size=args.vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=args.layers or layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768, rope_theta=1e6,
                         rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(args.device):  # built on the device: no host copy of 0.5B parameters to move
        model = Qwen2ForCausalLM(config)
    rows = tokenized_pairs(write_long(work / "data" / "long.jsonl"), tiny, args.max_length, args.max_prompt_length)
    n = args.batch * (args.warmup + args.timed + args.steps)
    rows = (rows * (n // len(rows) + 1))[:n]
    cols = {k: [r[k] for r in rows] for k in ("chosen_input_ids", "rejected_input_ids", "chosen_loss_mask", "rejected_loss_mask")}
    table = pa.table({"row_id": [f"{i:08d}" for i in range(n)], **cols, "ref_chosen_logps": np.zeros(n, np.float32),
                      "ref_rejected_logps": np.zeros(n, np.float32), "pair_tokens": np.asarray(pair_tokens(cols), np.int32)})
    path = work / "cache.parquet"
    pq.write_table(table, path, row_group_size=64)
    return model, config, RowIndex([(pafs.LocalFileSystem(), str(path))])


def events_summary(prof, steps: int, cuda: bool) -> dict:
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    aten = [e for e in evs if e.name.startswith("aten::")]
    below = {}  # id(event) -> whether a kernel call runs inside it

    def has_kernel(e) -> bool:
        if id(e) not in below:
            below[id(e)] = any(c.name.startswith("aten::") and (is_kernel(c) or has_kernel(c)) for c in e.cpu_children)
        return below[id(e)]

    def is_kernel(e) -> bool:  # the innermost aten call that does work: not a view/metadata call, no kernel call inside
        return e.name not in NO_KERNEL and not has_kernel(e)

    kernel_calls = Counter(e.name for e in aten if is_kernel(e))
    # a compiled graph's own kernels: inductor's C++ kernels on CPU (recorded by name with cpp.enable_kernel_profile),
    # its Triton kernels' host-side calls on CUDA
    kernel_calls.update(f"inductor::{e.name.split('_', 2)[-1] if e.name.startswith('graph_') else e.name}" for e in evs
                        if ("cpp_fused" in e.name or e.name.startswith("triton_")) and not e.name.startswith("aten::"))
    def cpu_only(e) -> bool:  # CPU's fused AdamW reads each parameter's step count (.item()); the CUDA kernel does not
        p = e.cpu_parent
        while p is not None:
            if p.name == "aten::_fused_adamw_":
                return True
            p = p.cpu_parent
        return False

    def inside_sync(e) -> bool:  # counted once: bincount's own _local_scalar_dense on CUDA is not a second sync
        p = e.cpu_parent
        while p is not None:
            if p.name in SYNC_OPS:
                return True
            p = p.cpu_parent
        return False

    sync_ops = Counter(e.name for e in aten if e.name in SYNC_OPS and not inside_sync(e) and not (not cuda and cpu_only(e)))
    sources = Counter()  # where the sync ops come from: the chain of enclosing calls, innermost first
    for e in aten:
        if e.name in SYNC_OPS:
            chain, p = [], e.cpu_parent
            while p is not None and len(chain) < 4:
                chain.append(p.name)
                p = p.cpu_parent
            sources[f"{e.name} <- " + " <- ".join(chain)] += 1
    phases = {}
    for p in PHASES:
        ranges = [e for e in evs if e.name == p]
        if ranges:
            phases[p.split(".")[1]] = {"host_ms": sum(e.time_range.elapsed_us() for e in ranges) / 1e3 / steps, "calls": len(ranges) / steps}
    out = {"aten_calls": len(aten) / steps, "kernel_calls": sum(kernel_calls.values()) / steps,
           "sync_ops": {k: v / steps for k, v in sync_ops.items()}, "sync_ops_total": sum(sync_ops.values()) / steps,
           "top_kernel_calls": {k: v / steps for k, v in kernel_calls.most_common(15)}, "phases": phases,
           "sync_sources": {k: v / steps for k, v in sources.most_common(12)}}
    if cuda:
        gpu = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in gpu if not getattr(e, "is_user_annotation", False)]
        runtime = Counter(e.name for e in evs if e.name.startswith(("cuda", "cu")))
        spans = sorted((e.time_range.start, e.time_range.end) for e in kernels)
        busy, cur = 0, None
        for s, t in spans:  # union of kernel intervals
            if cur is None or s > cur[1]:
                busy += (cur[1] - cur[0]) if cur else 0
                cur = [s, t]
            else:
                cur[1] = max(cur[1], t)
        busy += (cur[1] - cur[0]) if cur else 0
        steps_ev = [e for e in evs if e.name == "dpo_ray.step"]
        span = sum(e.time_range.elapsed_us() for e in steps_ev) or 1
        by_kernel = Counter()
        for e in kernels:
            by_kernel[e.name] += e.time_range.elapsed_us()
        annot = {}
        for p in PHASES:  # GPU spans of the phases (record_function ranges the profiler also records on the GPU)
            r = [e for e in gpu if e.name == p]
            if r:
                annot[p.split(".")[1]] = sum(e.time_range.elapsed_us() for e in r) / 1e3 / steps
        out.update(gpu_kernels=len(kernels) / steps, kernel_launch_calls=sum(runtime[k] for k in LAUNCHES) / steps,
                   runtime_syncs={k: runtime[k] / steps for k in CUDA_SYNCS if runtime[k]},
                   gpu_busy_ms=busy / 1e3 / steps, step_ms=span / 1e3 / steps, gpu_idle_fraction=1 - busy / span,
                   top_kernels_ms={k[:120]: v / 1e3 / steps for k, v in by_kernel.most_common(15)}, gpu_phase_ms=annot)
    return out


def text(r: dict) -> str:
    a = r["args"]
    lines = [f"dpo-ray training step under torch.profiler ({a['device']}, {a['model']} shape, {r['layers']} layers, vocab {a['vocab']}, "
             f"batch {a['batch']}, max_length {a['max_length']}, attention {a['attention']}{', compiled layers' if a.get('compile') else ''}, "
             f"{'bf16 autocast' if r['bf16'] else 'fp32'}; "
             f"{a['steps']} profiled steps after {a['warmup']} warm-up; per step)", "",
             f"- real tokens {r['tokens']:,.0f}, packed positions {r['positions']:,.0f}, micro-batches {r['micro_batches']}",
             f"- wall time {r['step_seconds']:.3f} s profiled; unprofiled: {r['timed_step_seconds'] or float('nan'):.3f} s a step "
             f"({r['tokens'] / r['timed_step_seconds'] if r.get('timed_step_seconds') else float('nan'):,.0f} tokens/s); warm-up steps "
             f"{r['warmup_seconds']:.3f} s" + (f"; compiled layers: {r['compile']['compile_graphs']} graphs in {r['compile']['compile_seconds']:.1f} s, "
                                                f"{r['compile']['recompiles']} recompiles after the warm-up" if r.get("compile") else ""),
             f"- aten calls {r['aten_calls']:,.0f}; kernel calls (leaf, not view/metadata) {r['kernel_calls']:,.0f}",
             f"- host syncs: Python reads {r['python_reads_total']:.0f} {r['python_reads']}; aten sync ops {r['sync_ops_total']:.0f} {r['sync_ops']} (not counted: CPU AdamW's own step reads)"]
    if "gpu_kernels" in r:
        lines += [f"- GPU: kernels run {r['gpu_kernels']:,.0f}, launch calls {r['kernel_launch_calls']:,.0f}, runtime syncs {r['runtime_syncs']}",
                  f"- GPU busy {r['gpu_busy_ms']:.1f} ms of a {r['step_ms']:.1f} ms step: idle fraction {r['gpu_idle_fraction']:.1%}",
                  "", "| top CUDA kernels | ms/step |", "|---|---:|"] + [f"| `{k}` | {v:.2f} |" for k, v in r["top_kernels_ms"].items()]
    lines += ["", "| phase | host ms/step | calls/step |" + (" GPU ms/step |" if "gpu_phase_ms" in r else ""),
              "|---|---:|---:|" + ("---:|" if "gpu_phase_ms" in r else "")]
    for k, v in r["phases"].items():
        lines.append(f"| {k} | {v['host_ms']:.1f} | {v['calls']:g} |" + (f" {r['gpu_phase_ms'].get(k, float('nan')):.1f} |" if "gpu_phase_ms" in r else ""))
    if r.get("per_layer"):
        pl = r["per_layer"]
        lines += ["", f"- per decoder layer: aten calls {pl['aten_calls']:,.0f}, kernel calls {pl['kernel_calls']:,.0f}; "
                      f"fixed (not per layer): aten {pl['fixed_aten_calls']:,.0f}, kernel {pl['fixed_kernel_calls']:,.0f}; "
                      f"so at {pl['full_layers']} layers: aten {pl['full_aten_calls']:,.0f}, kernel {pl['full_kernel_calls']:,.0f}"]
    lines += ["", "sync ops by caller (per step):"] + [f"  {v:g} x {k}" for k, v in r["sync_sources"].items()]
    lines += ["", "top kernel-call ops per step: " + ", ".join(f"{k.removeprefix('aten::')} {v:g}" for k, v in r["top_kernel_calls"].items())]
    return "\n".join(lines)


def profile(args, layers: int, work: Path):
    from torch.profiler import ProfilerActivity, record_function

    from dpo_ray import parallel
    from dpo_ray.config import TrainConfig
    from dpo_ray.forward import PolicyLogps, autocast, use_bf16
    from dpo_ray.rows import RowReader, prefetched, step_positions
    from dpo_ray.train_loop import micro_batches, train_step

    args.layers = layers
    device = torch.device(args.device)
    model, config, index = build(args, work)
    t = TrainConfig(batch_size_per_worker=args.batch, attention=args.attention, lr=1e-5, bf16=args.bf16)
    bf16 = use_bf16(t.bf16, device)
    wrapper = PolicyLogps(model, attention=args.attention).to(device)
    compiled = None
    if args.compile:  # train.compile's own code path (dpo_ray.compiling, as parallel.build_policy calls it)
        from dpo_ray.compiling import compile_layers

        if device.type == "cpu":
            import torch._inductor.config as inductor_config

            inductor_config.cpp.enable_kernel_profile = True  # each C++ kernel call recorded: counted as a kernel call
        compiled = compile_layers(parallel.decoder_layers(model), device)
    optimizer = parallel.make_optimizer(wrapper, t, device)
    precision = autocast(bf16, device)
    reader = RowReader(index)
    n_steps = args.warmup + args.timed + args.steps
    read = lambda step: reader.read(step_positions(len(index), 0, step, n_steps, 0, 1, args.batch, 1))  # noqa: E731
    batches = prefetched(read, range(n_steps), ahead=2)  # as the loop reads: a background thread, two steps ahead
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    counter = SyncCounter()
    collate = wrapper.collate

    def quiet_collate(*a, **k):  # host data: its tensors are built on the host, their reads are no syncs
        counter.on = False
        try:
            return collate(*a, **k)
        finally:
            counter.on = True

    wrapper.collate = quiet_collate
    wrapper.train()
    stats = {"tokens": 0, "positions": 0}

    def step(i):
        with record_function("dpo_ray.step"):
            with record_function("dpo_ray.read"):  # the wait for the prefetch thread
                table = next(batches)
            counter.on = True
            m, tokens = train_step(wrapper, wrapper, optimizer, table, t, 0, device, precision)
            counter.on = False
        return table, tokens

    # the read counter (a TorchFunctionMode) is on the mode stack from the first step: a compiled graph is guarded on
    # that stack, and would otherwise be compiled again for the profiled steps
    counter.__enter__()
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync()
    warm = (time.perf_counter() - t0) / max(args.warmup, 1)
    if compiled is not None:
        compiled.mark_warm()
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.timed):  # unprofiled, after the warm-up: the step's own time
        step(i)
    sync()
    timed = (time.perf_counter() - t0) / args.timed if args.timed else None
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    counter.calls.clear()  # the profiled steps' reads only
    with torch.profiler.profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for i in range(args.warmup + args.timed, n_steps):
            table, tokens = step(i)
            stats["tokens"] += tokens
            stats["positions"] += int(sum(table["pair_tokens"].to_pylist()))
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    counter.__exit__(None, None, None)
    r = events_summary(prof, args.steps, device.type == "cuda")
    r.update(layers=layers, bf16=bf16, step_seconds=wall, warmup_seconds=warm, timed_step_seconds=timed, tokens=stats["tokens"] / args.steps,
             positions=stats["positions"] / args.steps, micro_batches=len(micro_batches(table["pair_tokens"].to_pylist(), args.batch, None)),
             python_reads={k: v / args.steps for k, v in counter.calls.items()}, python_reads_total=sum(counter.calls.values()) / args.steps)
    if compiled is not None:
        r["compile"] = compiled.metrics()
    return r, prof


def write_trace(prof, trace: Path) -> None:
    raw = trace.with_suffix("")
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as f, gzip.open(trace, "wb") as g:
        shutil.copyfileobj(f, g)
    raw.unlink()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", default="qwen-0.5b", choices=("qwen-0.5b", "qwen-1.5b", "tiny"))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: all on CUDA, 2 on CPU)")
    ap.add_argument("--layers-delta", action="store_true", help="also profile 1 layer, to split per-layer from fixed counts")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--max-prompt-length", type=int, default=512)
    ap.add_argument("--attention", default="sdpa", choices=("sdpa", "flex", "varlen"))
    ap.add_argument("--bf16", default="auto", choices=("auto", "true", "false"))
    ap.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (default 2 on CUDA, 1 on CPU)")
    ap.add_argument("--steps", type=int, default=None, help="profiled steps (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--timed", type=int, default=None, help="unprofiled timed steps between warm-up and profile (default 3 on CUDA, 1 on CPU)")
    ap.add_argument("--compile", action="store_true", help="train.compile: each decoder layer compiled (dpo_ray.compiling)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--work", type=Path, default=None, help="tokenizer and data (default: a temporary directory)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.bf16 = {"auto": "auto", "true": True, "false": False}[args.bf16]
    args.warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)
    args.steps = args.steps or (3 if cuda else 1)
    args.timed = args.timed if args.timed is not None else (3 if cuda else 1)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = {"qwen-0.5b": 24, "qwen-1.5b": 28, "tiny": 2}[args.model]
    layers = args.layers or (full if cuda else 2)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.work or Path(tempfile.mkdtemp(prefix="dpo-ray-profile-"))
    print(f"profiling {args.steps} step(s) after {args.warmup} warm-up, {layers} layers on {args.device} ...", flush=True)
    t0 = time.time()
    r, prof = profile(args, layers, work)
    r["args"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    if args.layers_delta and layers > 1:
        print(f"  ({time.time() - t0:.0f} s) and with 1 layer, for the per-layer split ...", flush=True)
        one, _ = profile(args, 1, work)
        per = {k: (r[k] - one[k]) / (layers - 1) for k in ("aten_calls", "kernel_calls")}
        r["per_layer"] = {**per, "fixed_aten_calls": one["aten_calls"] - per["aten_calls"], "fixed_kernel_calls": one["kernel_calls"] - per["kernel_calls"],
                          "full_layers": full, "full_aten_calls": one["aten_calls"] + (full - 1) * per["aten_calls"],
                          "full_kernel_calls": one["kernel_calls"] + (full - 1) * per["kernel_calls"]}
        r["args"]["layers"] = layers
    r["seconds"] = time.time() - t0
    (args.out / "summary.json").write_text(json.dumps(r, indent=1))
    s = text(r)
    (args.out / "summary.txt").write_text(s + "\n")
    print(s, flush=True)
    write_trace(prof, args.out / "trace.json.gz")  # after the summary: a cut run still leaves the figures


if __name__ == "__main__":
    main()
