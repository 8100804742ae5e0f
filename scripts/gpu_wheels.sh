#!/usr/bin/env bash
# The wheels dpo-ray needs that the GPU machine lacks (it has Python 3.12, torch 2.11, transformers 5.17, accelerate,
# numpy, pandas, pyarrow, safetensors, tokenizers, pytest, ... and no network), written to one folder for
# benchmarks/gpu_check.sh, which installs them with `pip install --no-index --no-deps --target`.
#
#   bash scripts/gpu_wheels.sh [DIR]     # default .gpu_wheels/ (gitignored); prints the total size
#
# Runs here, with pip (PyPI). cp312 manylinux x86_64 wheels, no dependency resolution on the GPU machine: the list
# below is the resolved closure of ray[train,data], mlflow-skinny, pydantic, trl and datasets minus what the GPU
# image already has (/work/.library/device/KINDS.md), pinned to constraints.txt where it pins them.
# - mlflow-skinny instead of mlflow: dpo-ray uses MlflowClient, entities, exceptions and artifacts on a sqlite store,
#   which need sqlalchemy, alembic and cryptography (the registry tables) but none of mlflow's server and UI.
#   google-auth and pyasn1 (databricks-sdk's) are left out: not imported on this path.
# - Ray is repacked without ray/jars/ray_dist.jar (Java, 32 MB; a Python job never loads it), without the
#   dashboard's web client (ray/dashboard/client/build; dpo-ray starts Ray with include_dashboard=False), and with
#   its three large binaries (_raylet.so, raylet, gcs_server) stripped of their symbol tables (`strip
#   --strip-unneeded`: the dynamic symbols stay; only native stack traces lose names). 79 MB -> about 33 MB.
# A device call carries the tree and this folder together: at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.gpu_wheels}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=(
  ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  tensorboardx==2.6.5
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  mlflow-skinny==3.17.2 cachetools==7.3.3 databricks-sdk==0.162.0 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0
  gitpython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib-metadata==9.1.0 opentelemetry-api==1.45.2
  opentelemetry-proto==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-semantic-conventions==0.66b2
  python-dotenv==1.2.4 sqlparse==0.6.1 alembic==1.20.1 mako==1.4.3
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
rm -rf "$DIR" && mkdir -p "$DIR/.raw"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${PLATFORMS[@]}" -d "$DIR/.raw" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither" >&2)
# sqlalchemy's pure-Python wheel (its C speed-ups are optional): 2 MB instead of 4.7
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$DIR/.raw" sqlalchemy==2.1.9 2> >(grep -v "is ignored: it is neither" >&2)
"$PY" - "$DIR" <<'EOF'
import glob, os, shutil, subprocess, sys, tempfile, zipfile

out = sys.argv[1]
drop = ("ray/jars/", "ray/dashboard/client/build/")
for src in sorted(glob.glob(f"{out}/.raw/*.whl")):
    dst = os.path.join(out, os.path.basename(src))
    if not os.path.basename(src).startswith("ray-"):
        shutil.move(src, dst)
        continue
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
        for item in zin.infolist():
            if item.filename.startswith(drop):
                continue
            data = zin.read(item)
            if data[:4] == b"\x7fELF" and len(data) > 8 * 2**20 and shutil.which("strip"):
                with tempfile.NamedTemporaryFile() as f:
                    f.write(data), f.flush()
                    subprocess.run(["strip", "--strip-unneeded", f.name], check=True)
                    data = open(f.name, "rb").read()
            if item.filename.endswith(".dist-info/RECORD"):  # the dropped files leave the record too
                data = b"".join(l for l in data.splitlines(keepends=True) if not l.decode().startswith(drop))
            zout.writestr(item, data)
    print(f"repacked {os.path.basename(src)}: {os.path.getsize(src) / 2**20:.1f} MiB -> {os.path.getsize(dst) / 2**20:.1f} MiB")
shutil.rmtree(f"{out}/.raw")
wheels = glob.glob(f"{out}/*.whl")
print(f"{len(wheels)} wheels in {out}: {sum(map(os.path.getsize, wheels)) / 2**20:.1f} MiB")
EOF
