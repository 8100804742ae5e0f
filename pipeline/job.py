"""Entry point for `ray job submit`: the dpo-ray CLI, run as a Ray job that joins the cluster.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \
        -- python -m pipeline.job run configs/demo.yaml --set output_dir=/shared/runs/demo --set cache_dir=/shared/cache

Inside a job Ray sets RAY_ADDRESS, so `pipeline.runtime.start_ray` joins the cluster instead of starting a
local runtime. Arguments are those of `dpo-ray` (see `dpo-ray --help`); the exit status is the CLI's.
Paths in the config are resolved in the job's working directory (a copy of --working-dir in Ray's temp
folder): give output_dir, cache_dir and a sqlite mlflow.tracking_uri as absolute, shared paths (cache_dir and
train.storage_path may instead be object-store URIs such as s3://bucket/prefix).
"""
from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
