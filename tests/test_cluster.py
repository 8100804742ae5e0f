"""The pipeline as a Ray job on a real two-node cluster started with `ray start` (token auth on, the default).

The cluster is this module's own: a head (2 CPUs) and a second node (1 CPU), each a `ray start --block`
in its own process group with its own ports and a short temp dir, stopped with killpg. Never `ray stop`:
it stops every Ray process of the user, including other test sessions' runtimes.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from conftest import ROOT, free_port, small_config

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT = 600


def free_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        if (p := free_port()) not in ports:
            ports.append(p)
    return ports


def proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, command line) for every process we can read."""
    table = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except (OSError, IndexError, ValueError):
            continue
        table[int(d.name)] = (ppid, cmd)
    return table


class LocalCluster:
    """A head and one more node on this machine. The dashboard binds 127.0.0.1; Ray 2.60 replaces a node IP of
    127.0.0.1 with the machine's address (and its GCS port listens on all interfaces): token auth guards it."""

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 1):
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # unix socket paths must stay short
        self.port, self.dashboard_port, self.client_port, agent_head, agent_worker = free_ports(5)
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.head_cpus, self.worker_cpus, self.agent_ports = head_cpus, worker_cpus, (agent_head, agent_worker)
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
        self.common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def start_head(self) -> None:
        # auth mode left to Ray's default (token); ports of its own, since another Ray runtime on this
        # machine may hold the defaults (52365 for the dashboard agent, 10001 for the client server)
        self._start("head", self.env, ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                                       "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                       f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}",
                                       f"--dashboard-agent-listen-port={self.agent_ports[0]}"] + self.common)

    def start_worker(self) -> None:
        # RAY_AUTH_MODE=token here too, or the head refuses the node (and `ray start` retries forever).
        # A temp dir of its own: nodes on one machine sharing one would share runtime_resources/, and the
        # second node unpacking a job's working_dir removes the directory the job is running in.
        self._start("worker", {**self.env, "RAY_AUTH_MODE": "token"},
                    [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}", f"--temp-dir={self.temp_dir}/w",
                     f"--dashboard-agent-listen-port={self.agent_ports[1]}"] + self.common)

    def _start(self, name: str, env: dict, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen([RAY, "start", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(self.temp_dir).glob("*.log")))

    def ray(self, *args: str, auth: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        if auth:
            env["RAY_AUTH_MODE"] = "token"  # the token itself is read from ~/.ray/auth_token
        return subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)

    def alive_nodes(self) -> int:
        try:
            out = self.ray("status", "--address", self.gcs_address, timeout=60).stdout
        except subprocess.TimeoutExpired:
            return 0
        active = out.split("Active:", 1)[-1].split("Pending:", 1)[0] if "Active:" in out else ""
        return len(re.findall(r"^\s*\d+ node_[0-9a-f]+", active, re.M))

    def wait_for_nodes(self, n: int, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                assert p.poll() is None, f"`ray start` exited with {p.returncode}\n{self.logs()}"
            if self.alive_nodes() >= n:
                return
            time.sleep(3)
        raise TimeoutError(f"the cluster did not show {n} nodes in {timeout:.0f} s\n{self.logs()}")

    def ours(self) -> dict[int, str]:
        """Processes this cluster started: descendants of its `ray start` processes, or naming its temp dir."""
        table = proc_table()
        found = {p.pid for p in self.procs if p.pid in table}
        grew = True
        while grew:
            new = {pid for pid, (ppid, _) in table.items() if ppid in found and pid not in found}
            found |= new
            grew = bool(new)
        found |= {pid for pid, (_, cmd) in table.items() if self.temp_dir in cmd}
        found.discard(os.getpid())
        return {pid: table[pid][1] for pid in found if table[pid][1]}  # zombies have no command line

    def stop(self, timeout: float = 60) -> dict[int, str]:
        """SIGKILL our process groups, then anything of ours that left them; returns what is still alive."""
        before = self.ours()
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid, cmd in before.items():  # e.g. workers in a group of their own; only if still the same process
            if proc_table().get(pid, (0, ""))[1] == cmd:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.time() + timeout
        while (left := self.ours()) and time.time() < deadline:
            time.sleep(1)
        return left


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(head_cpus=2, worker_cpus=1)
    try:
        c.start_head()
        c.wait_for_nodes(1)
        c.start_worker()
        c.wait_for_nodes(2)
        yield c
    finally:
        c.stop()
        shutil.rmtree(c.temp_dir, ignore_errors=True)


def test_job_client_without_token_mode_is_refused(cluster):
    listed = cluster.ray("job", "list", "--address", cluster.dashboard, auth=False)
    assert listed.returncode != 0 and "authentication" in (listed.stdout + listed.stderr).lower(), listed.stderr[-2000:]
    submitted = cluster.ray("job", "submit", "--address", cluster.dashboard, "--", "echo", "hi", auth=False)
    assert submitted.returncode != 0 and "authentication" in (submitted.stdout + submitted.stderr).lower(), submitted.stderr[-2000:]
    listed = cluster.ray("job", "list", "--address", cluster.dashboard)  # with RAY_AUTH_MODE=token: answers, nothing was submitted
    assert listed.returncode == 0 and "raysubmit_" not in listed.stdout + listed.stderr, listed.stderr[-2000:]


def test_pipeline_job_on_two_node_cluster(cluster, tmp_path, cache_dir, small_pairs, demo_model):
    from mlflow.tracking import MlflowClient

    assert cluster.alive_nodes() == 2
    # absolute paths: the job's cwd is a copy of the working dir in Ray's temp folder
    sets = small_config(tmp_path.resolve(), Path(cache_dir).resolve(), Path(small_pairs).resolve())
    out = tmp_path.resolve() / "out"
    sid = f"dpo-ray-test-{uuid.uuid4().hex[:8]}"
    # the venv's python: a job's PATH is the one `ray start` had, where `python` may not be this venv's
    entrypoint = [sys.executable, "-m", "pipeline.job", "run", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
    try:
        sub = cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", sid,
                          "--working-dir", str(ROOT), "--", *entrypoint, timeout=JOB_TIMEOUT)
        status = cluster.ray("job", "status", "--address", cluster.dashboard, sid)
        assert sub.returncode == 0 and f"Job '{sid}' succeeded" in status.stdout + status.stderr, (
            f"submit rc={sub.returncode}\n{sub.stderr[-3000:]}\nstatus: {status.stdout[-1000:]}{status.stderr[-1000:]}")
    except (AssertionError, subprocess.TimeoutExpired):
        logs = cluster.ray("job", "logs", "--address", cluster.dashboard, sid)
        print(f"=== ray job logs {sid}\n{logs.stdout[-20000:]}\n{logs.stderr[-3000:]}\n=== cluster\n{cluster.logs()}")
        raise

    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model" / "model.safetensors").is_file()
    assert summary["output_dir"] == str(out) and summary["train"]["steps"] == 6
    assert summary["tracking_uri"] == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6


def test_cli_beside_a_cluster_runs_locally_and_a_driver_without_token_mode_is_told(cluster, tmp_path, cache_dir, small_pairs):
    """No address: the CLI starts a runtime of its own, where a plain ray.init() would attach to this cluster (and
    fail on dpo-ray's num_cpus). The cluster's address without RAY_AUTH_MODE=token: one line naming what is missing."""
    # As after a plain `ray start --head`: the cluster's address in <default temp dir>/ray/ray_current_cluster,
    # which ray.init() without an address reads (RAY_TMPDIR moves that default; a short path for Ray's sockets).
    tmp_root = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    (Path(tmp_root) / "ray").mkdir()
    shutil.copy(Path(cluster.temp_dir) / "ray_current_cluster", Path(tmp_root) / "ray" / "ray_current_cluster")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")} | {"RAY_TMPDIR": tmp_root}
    sets = small_config(tmp_path.resolve(), Path(cache_dir).resolve(), Path(small_pairs).resolve())
    cmd = [str(Path(sys.executable).parent / "dpo-ray"), "prepare", "configs/demo.yaml", "--json"] + [a for s in sets for a in ("--set", s)]
    try:
        local = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
    assert local.returncode == 0, local.stderr[-3000:]
    assert "starting a local Ray runtime" in local.stderr and "Connecting to existing Ray cluster" not in local.stderr
    assert json.loads(local.stdout)["data"]["train_rows"] > 0
    assert cluster.alive_nodes() == 2

    refused = subprocess.run(cmd + ["--address", cluster.gcs_address], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1], refused.stderr[-3000:]


def test_cluster_stops_without_leftovers(cluster):
    assert cluster.ours(), "nothing of the cluster was found running before the stop"
    left = cluster.stop()
    assert not left, f"still running after the stop: {left}"
    assert all(p.poll() is not None for p in cluster.procs)
