#!/usr/bin/env bash
# The GPU check: everything dpo-ray's CUDA path must show, in calls of at most 420 s (call 1) and 300 s (the others).
#
#   bash benchmarks/gpu_check.sh LOGDIR call1           # on the GPU machine (python3 there; wheels from .gpu_wheels/)
#   bash benchmarks/gpu_check.sh LOGDIR call2           # then call3, call4 as device time allows
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu /tmp/gpucheck call1   # the dry run here, tiny sizes
#   LIMITS="e2e=200" bash benchmarks/gpu_check.sh LOGDIR wheels e2e   # some parts only, with other limits (seconds)
#
# call1 = wheels trl e2e profile (the answer: the Ray Train row beside TRL, and where the step's time goes; 420 s of limits):
#   wheels  install .gpu_wheels/*.whl (scripts/gpu_wheels.sh) into a temporary --target, put it on PYTHONPATH
#   trl     TRL + precompute_ref_log_probs on the e2e's model, data, batch and lengths (and the matmul peak)
#   e2e     dpo-ray run on benchmarks/gpu_check.yaml (plain DPO, no generations) on a Qwen2.5-0.5B-shaped model: Ray Data,
#           GPU reference actor, TorchTrainer(use_gpu), evaluation, MLflow; its steps are the Ray Train row, read from its
#           MLflow store even when the run is cut before summary.json
#   profile torch.profiler on the Ray Train row's step (benchmarks/profile_step.py) for sdpa, varlen and sdpa with the
#           layers compiled: unprofiled timed steps, then profiled ones; summary first, then the Chrome trace
# call2 = wheels tests parity (correctness on CUDA): pytest -m gpu (tests/test_gpu.py); step-1 parity (benchmarks/parity.py)
# call3 = wheels bench (more training rows: BENCH_ROWS, default "dpo-ray-varlen dpo-ray-flex")
# call4 = wheels maxlen (the longest max_length whose training step fits at batch 1, dpo-ray and TRL)
# Each part has a hard time limit; a failing part does not stop the next. After every part the table and every number
# are written (LOGDIR/table.txt, LOGDIR/results.json) and the logs, profiles and traces packed into LOGDIR/logs.tgz:
# three files come back, whatever is cut. The table prints last.
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
LOG=${1:?usage: bash benchmarks/gpu_check.sh [--device cpu] LOGDIR [PART ...]}
shift
ONLY=" ${*:-call1 call2} "
ONLY=${ONLY/ call1 / wheels trl e2e profile }
ONLY=${ONLY/ call2 / wheels tests parity }
ONLY=${ONLY/ call3 / wheels bench }
ONLY=${ONLY/ call4 / wheels maxlen }
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/dpo-ray-gpucheck}  # models, data, caches, MLflow store: outside LOGDIR
SITE=$WORK/site
PARTLOG=$WORK/log  # part logs, profiles and traces: packed into LOGDIR/logs.tgz after every part
rm -rf "$WORK/results" "$WORK/parts.txt" "$WORK/e2e" "$PARTLOG" && mkdir -p "$LOG" "$WORK" "$PARTLOG"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_TRACKING_URI=
export PYTHONPATH=$ROOT
# seconds per part. Measured on H100s, 2026-11-26: wheels ~25 s; tests 81-99 s (flex compiles); e2e ~240 s with
# generations and two evaluation passes (Ray start 5, prepare 27, reference 44, training 60 with the worker's start);
# benchmarks/gpu_check.yaml leaves the generations out. Call 1: 35 + 80 + 200 + 105 = 420 s.
declare -A LIMIT=([wheels]=35 [trl]=80 [e2e]=200 [profile]=105 [tests]=150 [parity]=100 [bench]=250 [maxlen]=150)
if [ "$DEVICE" = cpu ]; then LIMIT=([wheels]=60 [profile]=300 [trl]=300 [e2e]=300 [tests]=400 [parity]=300 [maxlen]=600 [bench]=600); fi
for kv in ${LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done

part() {  # part NAME CMD...: runs CMD under its time limit, logs to PARTLOG/NAME.log, records exit status and seconds
  local name=$1 start=$SECONDS rc; shift
  [[ $ONLY == *" $name "* ]] || return 0
  echo "== $name (limit ${LIMIT[$name]} s)"
  timeout -k 5 "${LIMIT[$name]}" "$@" >"$PARTLOG/$name.log" 2>&1; rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$WORK/parts.txt"
  echo "   exit $rc after $((SECONDS - start)) s; last lines:"; tail -n 3 "$PARTLOG/$name.log" | cut -c1-300 | sed 's/^/   /'
  pack
}

pack() {  # what the call has so far, in three files: LOGDIR/results.json, LOGDIR/table.txt, LOGDIR/logs.tgz
  "$PY" benchmarks/gpu_check.py table --device "$DEVICE" --work "$WORK" --log "$LOG" >/dev/null 2>&1
  tar -czf "$LOG/logs.tgz.tmp" -C "$WORK" log 2>/dev/null && mv "$LOG/logs.tgz.tmp" "$LOG/logs.tgz"
}

install_wheels() {  # the same command on both devices; cp312 wheels are importable only by the GPU machine's 3.12
  rm -rf "$SITE"
  if [ "$DEVICE" = cpu ] && ! ls "$ROOT"/.gpu_wheels/*.whl >/dev/null 2>&1; then
    echo "no .gpu_wheels here: skipped (the CPU dry run uses its own environment's packages)"; return 0
  fi
  "$PY" -m pip install --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any "$ROOT"/.gpu_wheels/*.whl || return 1
  "$PY" -c "import sys, torch, transformers; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
  if [ "$DEVICE" = cuda ]; then
    PYTHONPATH=$SITE:$ROOT "$PY" -c "import ray, mlflow, pydantic, trl, datasets, pyarrow; print('ray', ray.__version__, 'mlflow', mlflow.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__, 'pyarrow', pyarrow.__version__)" || return 1
    PYTHONPATH=$SITE:$ROOT "$PY" -m pip check || true  # version conflicts with the machine's own packages, for the record
  fi
}

export -f install_wheels && export PY SITE ROOT DEVICE
part wheels bash -c install_wheels
if [ "$DEVICE" = cuda ]; then export PYTHONPATH=$SITE:$ROOT; else export DPO_RAY_GPU_TESTS_ON_CPU=1; fi
# A part killed at its limit can leave Ray's workers (own process groups) holding GPU memory. On the GPU machine
# (no one else's Ray there) they are stopped after each Ray part; never on a shared CPU box.
ray_stop() { if [ "$DEVICE" = cuda ]; then "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1; fi; }
part trl "$PY" benchmarks/gpu_check.py trl --device "$DEVICE" --work "$WORK"
export E2E_SECONDS=$((LIMIT[e2e] - 25)); part e2e "$PY" benchmarks/gpu_check.py e2e --device "$DEVICE" --work "$WORK"; ray_stop
part profile "$PY" benchmarks/gpu_check.py profile --device "$DEVICE" --work "$WORK" --log "$PARTLOG"
part tests "$PY" -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py
part parity "$PY" benchmarks/gpu_check.py parity --device "$DEVICE" --work "$WORK"
part bench "$PY" benchmarks/gpu_check.py bench --device "$DEVICE" --work "$WORK"; ray_stop
part maxlen "$PY" benchmarks/gpu_check.py maxlen --device "$DEVICE" --work "$WORK"
echo
"$PY" benchmarks/gpu_check.py table --device "$DEVICE" --work "$WORK" --log "$LOG"
