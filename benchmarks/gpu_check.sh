#!/usr/bin/env bash
# The GPU check: everything dpo-ray's CUDA path must show, in two calls, logs in LOGDIR.
#
#   bash benchmarks/gpu_check.sh LOGDIR call1           # on the GPU machine (python3 there; wheels from .gpu_wheels/)
#   bash benchmarks/gpu_check.sh LOGDIR call2
#   PYTHON=.venv/bin/python bash benchmarks/gpu_check.sh --device cpu /tmp/gpucheck call1   # the dry run here, tiny sizes
#   LIMITS="e2e=200" bash benchmarks/gpu_check.sh LOGDIR wheels e2e   # some parts only, with other limits (seconds)
#
# call1 = wheels profile trl e2e (what matters most; ~7 min of limits on an H100, the table last):
#   wheels  install .gpu_wheels/*.whl (scripts/gpu_wheels.sh) into a temporary --target, put it on PYTHONPATH
#   profile torch.profiler on 3 steps of the Ray Train row's step (benchmarks/profile_step.py): LOGDIR/profile-<attention>/
#           summary.txt (top CUDA kernels, launches, syncs, GPU idle, phase times), summary.json, trace.json.gz
#   trl     TRL + precompute_ref_log_probs on the e2e's model, data, batch and lengths (and the matmul peak)
#   e2e     dpo-ray run on a Qwen2.5-0.5B-shaped model with the training row's settings: Ray Data, GPU reference actor,
#           TorchTrainer(use_gpu), evaluation, MLflow; passes only if it writes summary.json; its steps are the Ray Train row
# call2 = wheels tests parity maxlen bench:
#   tests   pytest -m gpu: every logps path on CUDA vs float64 (sdpa, varlen, flex), gradients, step-1 parity (tests/test_gpu.py)
#   parity  step-1 loss and margins, reference stage vs training forward, at ~1024 tokens (benchmarks/parity.py)
#   maxlen  the longest max_length whose training step fits at batch 1, dpo-ray (varlen, sdpa, flex) and TRL
#   bench   more training rows (BENCH_ROWS, default "dpo-ray-varlen dpo-ray-flex"), same model, data, batch, lengths
# Each part has a hard time limit and logs to LOGDIR/<part>.log; a failing part does not stop the next. Then the table
# (LOGDIR/table.txt, printed last) and every number (LOGDIR/results.json).
set -u
DEVICE=cuda
if [ "${1:-}" = "--device" ]; then DEVICE=$2; shift 2; fi
LOG=${1:?usage: bash benchmarks/gpu_check.sh [--device cpu] LOGDIR [PART ...]}
shift
ONLY=" ${*:-call1 call2} "
ONLY=${ONLY/ call1 / wheels profile trl e2e }
ONLY=${ONLY/ call2 / wheels tests parity maxlen bench }
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
# 2 evaluation passes of ~17 s); the dpo-ray bench row alone ~165 s. The e2e now doubles as the Ray Train row (10 steps,
# 2 of them warm-up, instead of 6), so call 1 needs no separate dpo-ray bench row: 40 + 70 + 80 + 240 = 430 s of limits.
declare -A LIMIT=([wheels]=40 [profile]=70 [trl]=80 [e2e]=240 [tests]=130 [parity]=75 [maxlen]=70 [bench]=240)
if [ "$DEVICE" = cpu ]; then LIMIT=([wheels]=60 [profile]=300 [trl]=300 [e2e]=300 [tests]=400 [parity]=300 [maxlen]=600 [bench]=600); fi
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
# A part killed at its limit can leave Ray's workers (own process groups) holding GPU memory. On the GPU machine
# (no one else's Ray there) they are stopped after each Ray part; never on a shared CPU box.
ray_stop() { if [ "$DEVICE" = cuda ]; then "$PY" -m ray.scripts.scripts stop --force >/dev/null 2>&1; fi; }
part profile "$PY" benchmarks/gpu_check.py profile --device "$DEVICE" --work "$WORK" --log "$LOG"
part trl "$PY" benchmarks/gpu_check.py trl --device "$DEVICE" --work "$WORK"
part e2e "$PY" benchmarks/gpu_check.py e2e --device "$DEVICE" --work "$WORK"; ray_stop
part tests "$PY" -m pytest -q -m gpu -p no:cacheprovider -s tests/test_gpu.py
part parity "$PY" benchmarks/gpu_check.py parity --device "$DEVICE" --work "$WORK"
part maxlen "$PY" benchmarks/gpu_check.py maxlen --device "$DEVICE" --work "$WORK"
part bench "$PY" benchmarks/gpu_check.py bench --device "$DEVICE" --work "$WORK"; ray_stop
echo
"$PY" benchmarks/gpu_check.py table --device "$DEVICE" --work "$WORK" --log "$LOG"
