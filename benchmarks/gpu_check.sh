#!/usr/bin/env bash
# The GPU check: everything dpo-ray's CUDA path must show, in two calls of under 7 minutes on one H100, logs in LOGDIR.
#
#   bash benchmarks/gpu_check.sh LOGDIR [PART ...]      # on the GPU machine (python3 there; wheels from .gpu_wheels/)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu /tmp/gpucheck   # the dry run here, tiny sizes
#   LIMITS="e2e=200" bash benchmarks/gpu_check.sh LOGDIR wheels e2e   # some parts only, with other limits (seconds)
#
# Parts, each with a hard time limit, each logging to LOGDIR/<part>.log; a failing part does not stop the next:
#   wheels  install .gpu_wheels/*.whl (scripts/gpu_wheels.sh) into a temporary --target, put it on PYTHONPATH
#   tests   pytest -m gpu: every logps path on CUDA vs float64, gradients, step-1 parity (tests/test_gpu.py)
#   e2e     dpo-ray run on a Qwen2.5-0.5B-shaped model: Ray Data, GPU reference actor, TorchTrainer(use_gpu), MLflow
#   parity  step-1 loss and margins, reference stage vs training forward, at ~1024 tokens (benchmarks/parity.py)
#   bench   tokens/s, MFU, peak GPU memory: dpo-ray (sdpa, flex) vs TRL with and without precompute_ref_log_probs
#   maxlen  the longest max_length whose training step fits at batch 1, dpo-ray and TRL
# Then the table (LOGDIR/table.txt, printed last) and every number (LOGDIR/results.json). LOGDIR ends up with 8 files.
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
LOG=${1:?usage: bash benchmarks/gpu_check.sh [--device cpu] LOGDIR [PART ...]}
shift
ONLY=" ${*:-wheels tests e2e parity bench maxlen} "
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
WORK=${GPU_CHECK_WORK:-/tmp/dpo-ray-gpucheck}  # models, data, caches, MLflow store: outside LOGDIR
SITE=$WORK/site
rm -rf "$WORK/results" "$WORK/parts.txt" "$WORK/e2e" && mkdir -p "$LOG" "$WORK"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 RAY_USAGE_STATS_ENABLED=0 MLFLOW_TRACKING_URI=
export PYTHONPATH=$ROOT
# seconds per part. Measured on H100s, 2026-11-26: wheels ~25 s; tests 81-99 s (flex compiles); e2e needed ~240 s (Ray
# start 5, prepare 27, reference 44 with an actor start and model load per split, training 60 with the worker start,
# 2 evaluation passes of ~17 s); the dpo-ray bench row alone ~165 s. All six no longer fit one 10-minute call: run
#   call 1: bash benchmarks/gpu_check.sh LOGDIR wheels tests e2e      (400 s of limits)
#   call 2: bash benchmarks/gpu_check.sh LOGDIR wheels parity bench   (355 s), maxlen when device time is left
declare -A LIMIT=([wheels]=40 [tests]=120 [e2e]=240 [parity]=75 [bench]=240 [maxlen]=60)
if [ "$DEVICE" = cpu ]; then LIMIT=([wheels]=60 [tests]=300 [e2e]=300 [parity]=300 [bench]=600 [maxlen]=600); fi
for kv in ${LIMITS:-}; do LIMIT[${kv%%=*}]=${kv#*=}; done

part() {  # part NAME CMD...: runs CMD under its time limit, logs to LOGDIR/NAME.log, records exit status and seconds
  local name=$1 start=$SECONDS rc; shift
  [[ $ONLY == *" $name "* ]] || return 0
  echo "== $name (limit ${LIMIT[$name]} s)"
  timeout -k 10 "${LIMIT[$name]}" "$@" >"$LOG/$name.log" 2>&1; rc=$?
  echo "$name $rc $((SECONDS - start))" >>"$WORK/parts.txt"
  echo "   exit $rc after $((SECONDS - start)) s; last lines:"; tail -n 3 "$LOG/$name.log" | cut -c1-300 | sed 's/^/   /'
}

install_wheels() {  # the same command on both devices; cp312 wheels are importable only by the GPU machine's 3.12
  rm -rf "$SITE"
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
part tests "$PY" -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py
# A part killed at its limit can leave Ray's workers (own process groups) holding GPU memory. On the GPU machine
# (no one else's Ray there) they are stopped after each Ray part; never on a shared CPU box.
ray_stop() { if [ "$DEVICE" = cuda ]; then "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1; fi; }
part e2e "$PY" benchmarks/gpu_check.py e2e --device "$DEVICE" --work "$WORK"; ray_stop
part parity "$PY" benchmarks/gpu_check.py parity --device "$DEVICE" --work "$WORK"
part bench "$PY" benchmarks/gpu_check.py bench --device "$DEVICE" --work "$WORK"; ray_stop
part maxlen "$PY" benchmarks/gpu_check.py maxlen --device "$DEVICE" --work "$WORK"
echo
"$PY" benchmarks/gpu_check.py table --device "$DEVICE" --work "$WORK" --log "$LOG"
