"""The README and docs/ say what the code does: the marked commands run as written, the links lead somewhere, and
docs/config.md is generated from the config models, every key described. Cheap: seconds, no Ray runtime."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"<!-- runnable -->\s*\n```(?:bash|sh)\n(.*?)```", re.S)
# pages other branches write (issue 22: losses, issue 20: sweeps); linked from the README before they land
PENDING: set[str] = set()  # pages linked before they are written


def runnable_blocks() -> list[tuple[str, str]]:
    return [(f"{p.relative_to(ROOT)}:{p.read_text()[:m.start()].count(chr(10)) + 1}", m.group(1))
            for p in PAGES for m in RUNNABLE.finditer(p.read_text())]


def test_the_readme_is_a_short_entry_point_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 200
    assert "bash scripts/install.sh && .venv/bin/dpo-ray run configs/demo.yaml" in text
    assert "bash scripts/install.sh && .venv/bin/python -m pytest -q tests" in text  # what .ci/run runs
    assert len(runnable_blocks()) >= 2


@pytest.mark.parametrize("where,block", runnable_blocks(), ids=[w for w, _ in runnable_blocks()])
def test_a_runnable_block_runs_as_written(where, block, tmp_path):
    """`.venv/bin/` is this test's interpreter's bin directory (the repository's .venv in CI)."""
    script = "set -euo pipefail\n" + block.replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)} | {
        "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{where}:\n{block}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr


def test_relative_links_lead_to_files():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" in target or target.startswith("mailto:"):
                continue
            path = (page.parent / target).resolve()
            if not path.exists() and str(path.relative_to(ROOT)) not in PENDING:
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing


def test_every_config_key_has_a_description():
    from pipeline.config_docs import missing_descriptions, rows

    assert len(rows()) > 50  # every key of the tree, nested sections included
    assert missing_descriptions() == []


def test_docs_config_md_is_what_the_generator_writes():
    from pipeline.config_docs import DOC, render

    assert DOC.read_text() == render(), "docs/config.md is out of date: run `python -m pipeline.config_docs > docs/config.md`"


def test_docs_losses_md_table_is_what_the_registry_makes():
    from dpo_ray.loss_names import DOC, LOSS_TYPES, render

    text = DOC.read_text()
    assert render(text) == text, "docs/losses.md's table is out of date: run `python -m dpo_ray.loss_names --write`"
    assert all(f"| `{name}` |" in text for name in LOSS_TYPES)
    stale = text.replace("`relu(1 - β d)`", "`relu(1 - d)`")  # a hand edit in the table: the generator puts it back
    assert stale != text and render(stale) == text


def test_doctor_says_pass_or_fail_per_check_and_its_exit_status_follows(tmp_path):
    """Real checks: a writable tmp output_dir and cache_dir pass; an unwritable output_dir, an MLflow server and a Ray
    address nobody answers fail, each on its own line; the exit status is 1 then."""
    dpo_ray = [sys.executable, "-m", "pipeline.cli", "doctor", "configs/demo.yaml"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")} | {"PYTHONPATH": str(ROOT)}
    ok = subprocess.run(dpo_ray + ["--set", f"output_dir={tmp_path}/out", "--set", f"cache_dir={tmp_path}/cache",
                                   "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/mlflow.db"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    lines = {line.split()[1]: line.split()[0] for line in ok.stdout.splitlines()[:-1]}
    assert list(lines) == ["python", "torch", "ray", "output_dir", "cache_dir", "mlflow", "gpu"]
    assert lines["output_dir"] == lines["cache_dir"] == lines["mlflow"] == "pass"
    import torch

    assert lines["gpu"] == ("pass" if torch.cuda.is_available() else "skip")
    bad = subprocess.run(dpo_ray + ["--set", "output_dir=/proc/no/such", "--set", f"cache_dir={tmp_path}/cache",
                                    "--set", "mlflow.tracking_uri=http://127.0.0.1:9", "--address", "127.0.0.1:9"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    failed = [line.split()[1] for line in bad.stdout.splitlines() if line.startswith("FAIL")]
    assert failed == ["ray", "output_dir", "mlflow"] and "Traceback" not in bad.stderr
    assert "doctor: 3 check(s) failed" in bad.stdout


def test_the_kuberay_rayjob_runs_the_tested_entrypoint_with_the_configs_worker_range():
    """deploy/kuberay/rayjob.yaml submits what tests/test_cluster.py submits (configs/cluster.yaml through
    pipeline.job), and its GPU worker group spans the config's elastic num_workers [min, max]."""
    import yaml

    from dpo_ray.config import load_config

    job = yaml.safe_load((ROOT / "deploy" / "kuberay" / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["entrypoint"] == "python -m pipeline.job run configs/cluster.yaml"
    assert 'entrypoint = [sys.executable, "-m", "pipeline.job", stage, "configs/cluster.yaml"]' in (ROOT / "tests" / "test_cluster.py").read_text()
    assert 'stage: str = "run"' in (ROOT / "tests" / "test_cluster.py").read_text()
    assert "working_dir" in yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    (group,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    train = load_config(str(ROOT / "configs" / "cluster.yaml"), []).train
    assert (group["minReplicas"], group["maxReplicas"], group["replicas"]) == (train.min_workers, train.max_workers, train.max_workers)
    assert group["rayStartParams"]["num-gpus"] == "1"


def test_the_file_tree_in_performance_md_is_the_code_as_it_is():
    """docs/performance.md's "Where the code is": every module of dpo_ray/ and pipeline/ has its line, and every path
    it names exists (the tree was once stale: a driver missing, "5 losses")."""
    text = (ROOT / "docs" / "performance.md").read_text()
    tree = text[text.index("## Where the code is"):]
    tree = tree[tree.index("```") + 3:]
    tree = tree[:tree.index("```")]
    listed = {ln.split()[0] for ln in tree.splitlines() if ln.strip() and not ln.startswith(" ")}
    modules = {str(p.relative_to(ROOT)) for d in ("dpo_ray", "pipeline") for p in (ROOT / d).glob("*.py") if p.name != "__init__.py"}
    assert not modules - listed, f"modules missing from docs/performance.md's tree: {sorted(modules - listed)}"
    assert not [p for p in listed if not (ROOT / p).exists()], [p for p in listed if not (ROOT / p).exists()]
