"""The pipeline as a Ray job on a real three-node cluster started with `ray start` (token auth on, the default).

The cluster is this module's own: a head (2 CPUs) and two worker nodes, node_a and node_b (1 CPU and one `trainer`
resource each, so the train workers spread one per worker node), each a `ray start --block` in its own process
group with its own ports and a short temp dir, stopped with killpg. Never `ray stop`: it stops every Ray process of
the user, including other test sessions' runtimes. A node is lost by SIGKILL of its raylet and every process it
started, and comes back with a fresh `ray start`. The cache and the checkpoints live on S3 (moto_server), the runs
on a real `mlflow server`: nothing leans on a path only one node has.
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, MlflowServer, S3Server, free_port, small_config
from pipeline.reference import part_complete, split_dir

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")
JOB_TIMEOUT = 600
# a resource naming each node; train workers need a `trainer`, the reference test's scoring actors a `scorer`
DRAIN_S = 10  # a preempted node's notice: seconds between the SIGTERM and the node's end
NODES = {"node_a": {"node_a": 1, "trainer": 1, "scorer": 1}, "node_b": {"node_b": 1, "trainer": 1, "scorer": 1}}


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
    """A head and named worker nodes on this machine. The dashboard binds 127.0.0.1; Ray 2.60 replaces a node IP of
    127.0.0.1 with the machine's address (and its GCS port listens on all interfaces): token auth guards it.
    FAST_FAILURE: a lost node is declared dead after ~3 s of failed health checks (Ray's default ~30 s), and Ray
    Train gives up a try to place its workers after 10 s (default 60 s), so the tests see what users see, sooner."""

    FAST_FAILURE = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                    "RAY_health_check_failure_threshold": "3", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "10",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": str(DRAIN_S)}  # a SIGTERM'd node drains this long, then goes

    def __init__(self, head_cpus: int = 2, worker_cpus: int = 1):
        self.temp_dir = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # unix socket paths must stay short
        self.port, self.dashboard_port, self.client_port, agent_head = free_ports(4)
        self.gcs_address = f"127.0.0.1:{self.port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[str, subprocess.Popen] = {}  # worker nodes by name: their `ray start` process
        self.head_cpus, self.worker_cpus, self.agent_head = head_cpus, worker_cpus, agent_head
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "MLFLOW_TRACKING_URI")}
        self.env.update(self.FAST_FAILURE)
        self.common = ["--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]

    def start_head(self) -> None:
        # auth mode left to Ray's default (token); ports of its own, since another Ray runtime on this
        # machine may hold the defaults (52365 for the dashboard agent, 10001 for the client server)
        self._start("head", self.env, ["--head", f"--port={self.port}", f"--num-cpus={self.head_cpus}",
                                       "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                                       f"--ray-client-server-port={self.client_port}", f"--temp-dir={self.temp_dir}",
                                       f"--dashboard-agent-listen-port={self.agent_head}"] + self.common)

    def start_worker(self, name: str = "w", resources: dict | None = None) -> None:
        # RAY_AUTH_MODE=token here too, or the head refuses the node (and `ray start` retries forever).
        # A temp dir of its own: nodes on one machine sharing one would share runtime_resources/, and the
        # second node unpacking a job's working_dir removes the directory the job is running in.
        args = [f"--address={self.gcs_address}", f"--num-cpus={self.worker_cpus}", f"--temp-dir={self.temp_dir}/{name}",
                f"--dashboard-agent-listen-port={free_ports(1)[0]}"]
        if resources:
            args.append(f"--resources={json.dumps(resources)}")
        self.nodes[name] = self._start(name, {**self.env, "RAY_AUTH_MODE": "token"}, args + self.common)

    def kill_node(self, name: str) -> float:
        """SIGKILL a worker node: its raylet and every process it started (as a lost machine); returns the time."""
        proc = self.nodes.pop(name)
        table = proc_table()
        doomed, grew = {proc.pid}, True
        while grew:
            new = {pid for pid, (ppid, _) in table.items() if ppid in doomed and pid not in doomed}
            doomed |= new
            grew = bool(new)
        doomed |= {pid for pid, (_, cmd) in table.items() if f"{self.temp_dir}/{name}/" in cmd or cmd.endswith(f"{self.temp_dir}/{name}")}
        at = time.time()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in doomed - {os.getpid()}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        return at

    def preempt_node(self, name: str) -> float:
        """SIGTERM a worker node's `ray start` (what a spot node's shutdown or a pod deletion sends): Ray drains the
        node for RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S, then stops it for good. Returns the time."""
        at = time.time()
        os.kill(self.nodes[name].pid, signal.SIGTERM)  # the process, not its group: the group would skip the drain
        return at

    def _start(self, name: str, env: dict, args: list[str]) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "ab")
        self.procs.append(subprocess.Popen([RAY, "start", *args], stdout=log, stderr=subprocess.STDOUT, env=env,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()
        return self.procs[-1]

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(Path(self.temp_dir).glob("*.log")))

    def ray(self, *args: str, auth: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
        if auth:
            env["RAY_AUTH_MODE"] = "token"  # the token itself is read from ~/.ray/auth_token
        return subprocess.run([RAY, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)

    @functools.cached_property
    def token(self) -> str:
        """The cluster's auth token, read once: `ray start --head` (token mode) writes it to ~/.ray/auth_token."""
        return (Path.home() / ".ray" / "auth_token").read_text().strip()

    def api(self, path: str, timeout: float = 30):
        """GET the dashboard's REST API in this process, with the cluster's token: the polls of a test cost a request,
        not a `ray` CLI process (a second of CPU each, on a machine whose 2 cores the cluster shares)."""
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def alive_nodes(self) -> int:
        """Nodes the GCS holds alive (Ray's state API; a lost node is DEAD once its health checks have failed)."""
        try:
            nodes = self.api("/api/v0/nodes?limit=100&detail=false")["data"]["result"]["result"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(n["state"] == "ALIVE" for n in nodes)

    def wait_for_nodes(self, n: int, timeout: float = 300, poll: float = 3) -> float:
        """Until the state API shows exactly n nodes alive (more or fewer: a node joining or one declared dead); the time."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in [self.procs[0], *self.nodes.values()]:
                assert p.poll() is None, f"`ray start` exited with {p.returncode}\n{self.logs()}"
            if self.alive_nodes() == n:
                return time.time()
            time.sleep(poll)
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
        for name in NODES:
            c.start_worker(name, NODES[name])
        c.wait_for_nodes(3)
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


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    """The S3 server (cache and checkpoints) and the MLflow server the jobs write to; every node reaches both."""
    root = tmp_path_factory.mktemp("services")
    s3 = S3Server(root / "moto.log")
    mlflow_server = MlflowServer(root).start()
    yield s3, mlflow_server
    mlflow_server.stop()
    s3.stop()


STEPS, CHECKPOINT_EVERY = 40, 4


def elastic_sets(tmp_path: Path, s3, mlflow_uri: str, small_pairs, name: str, **extra) -> list[str]:
    """Two train workers at most, one per worker node (each has one `trainer`), 4 pairs a step at any size; fp32 so
    that runs of other world sizes agree to rounding; cache and checkpoints on S3, the run on the MLflow server."""
    return small_config(tmp_path.resolve(), s3.uri("cache"), Path(small_pairs).resolve(), **{
        "train.num_workers": "[1, 2]", "train.worker_resources": '{"trainer": 1}', "train.cpus_per_worker": "1",
        "train.batch_size_per_worker": "2", "train.pairs_per_step": "4", "train.strategy": "ddp", "train.max_steps": str(STEPS), "train.checkpoint_every": str(CHECKPOINT_EVERY),
        "train.max_failures": "3", "train.resize_interval_s": "5", "train.bf16": "false", "train.lr": "1e-3",
        "train.storage_path": s3.uri(f"ray/{name}"), "mlflow.tracking_uri": mlflow_uri, "mlflow.run_name": name,
        "mlflow.system_metrics": "false", "reference.num_actors": "2",
        "data.eval_fraction": "0", **extra})  # no eval split: evaluate's actor pool is the reference's Ray Data path, tested here


def submit(cluster, sid: str, sets: list[str], env: dict, wait: bool = True, stage: str = "run") -> subprocess.CompletedProcess:
    """deploy/kuberay/rayjob.yaml's entrypoint, `python -m pipeline.job run configs/cluster.yaml`, with this machine's
    paths and the tiny model set over it (stage "train": the same without evaluate). The venv's python: a job's PATH
    is the one `ray start` had."""
    entrypoint = [sys.executable, "-m", "pipeline.job", stage, "configs/cluster.yaml"] + [a for s in sets for a in ("--set", s)]
    return cluster.ray("job", "submit", "--address", cluster.dashboard, "--submission-id", sid, "--working-dir", str(ROOT),
                       "--runtime-env-json", json.dumps({"env_vars": env}), *([] if wait else ["--no-wait"]), "--", *entrypoint,
                       timeout=JOB_TIMEOUT)


def job_status(cluster, sid: str) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED (what `ray job status` prints, from the same REST API)."""
    return cluster.api(f"/api/jobs/{sid}")["status"]


def job_logs(cluster, sid: str) -> str:
    return cluster.api(f"/api/jobs/{sid}/logs")["logs"]


def wait_job(cluster, sid: str, timeout: float = JOB_TIMEOUT) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = job_status(cluster, sid)
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(2)
    raise TimeoutError(f"job {sid} did not end in {timeout:.0f} s")


def explain(cluster, sid: str) -> str:
    return f"=== ray job logs {sid}\n{job_logs(cluster, sid)[-20000:]}\n=== cluster\n{cluster.logs()}"


def history(client, run_id: str, key: str) -> dict[int, tuple[float, int]]:
    """{step: (value, timestamp ms)} of a metric: the last value logged at each step (a step redone after a restart
    is logged again)."""
    out = {}
    for m in sorted(client.get_metric_history(run_id, key), key=lambda m: (m.timestamp, m.step)):
        out[m.step] = (m.value, m.timestamp)
    return out


def past_a_checkpoint_at_two(sizes: dict[int, tuple[float, int]], registered: int | None) -> bool:
    """Two workers since step s2, the first checkpoint at or after it registered by Ray Train's controller, and two
    steps past it. An elastic run can start with one worker, when the cluster's last job still held a `trainer` as it
    began, and grow to two later. Registered, not only reported: the controller collects the workers' reports when it
    polls them (every 2 s), so a node lost between a report and that poll takes the report with it."""
    last = s2 = max(sizes)
    while s2 - 1 in sizes and sizes[s2 - 1][0] == 2.0:
        s2 -= 1
    checkpoint = -(-s2 // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    return sizes[last][0] == 2.0 and registered is not None and registered >= checkpoint and last >= checkpoint + 2


def wait_past_a_checkpoint_at_two(cluster, client, s3, sid: str, timeout: float = 300):
    """(the job's MLflow run, the deadline) once it is past a checkpoint taken and registered with two workers."""
    deadline, run, sizes = time.time() + timeout, None, {}
    while time.time() < deadline:
        run = run or run_named(client, sid)
        sizes = history(client, run.info.run_id, "train/world_size") if run else {}
        if sizes and past_a_checkpoint_at_two(sizes, registered_step(s3, sid)):
            return run, deadline
        assert job_status(cluster, sid) != "FAILED", explain(cluster, sid)
        time.sleep(0.5)
    raise TimeoutError(f"the run did not pass a checkpoint with two workers in {timeout:.0f} s: {sizes}")


def registered_step(s3, sid: str) -> int | None:
    """The step of the latest checkpoint Ray Train's controller has registered: its checkpoint manager's snapshot
    in the run's storage (what a restart resumes from)."""
    for path in s3.listing(f"ray/{sid}"):
        if path.endswith("/checkpoint_manager_snapshot.json"):
            with s3.fs.open_input_stream(path) as f:
                latest = json.loads(f.read()).get("latest_checkpoint_result")
            return latest and latest["metrics"].get("step")
    return None


def run_named(client, name: str):
    for exp in client.search_experiments():
        runs = client.search_runs([exp.experiment_id], f"tags.mlflow.runName = '{name}'")
        if runs:
            return runs[0]
    return None


@pytest.fixture(scope="module")
def full_run(cluster, services, tmp_path_factory, small_pairs, demo_model):
    """`dpo-ray run` as a Ray job on the 3-node cluster, elastic [1, 2] with nothing lost: the uninterrupted run the
    elastic test compares with."""
    s3, mlflow_server = services
    tmp = tmp_path_factory.mktemp("full")
    (tmp / "out" / "models").mkdir(parents=True)  # the demo model, built once for the session (an S3 cache keeps models here)
    os.symlink(demo_model, tmp / "out" / "models" / Path(demo_model).name)
    sid = f"dpo-ray-full-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    sub = submit(cluster, sid, elastic_sets(tmp, s3, mlflow_server.uri, small_pairs, sid), s3.env)
    status = job_status(cluster, sid)
    assert sub.returncode == 0 and status == "SUCCEEDED", f"submit rc={sub.returncode}\n{sub.stderr[-3000:]}\n{explain(cluster, sid)}"
    return tmp / "out", sid, job_logs(cluster, sid), time.time() - t0


def test_pipeline_job_on_three_node_cluster(cluster, services, full_run):
    from mlflow.tracking import MlflowClient

    s3, mlflow_server = services
    out, sid, logs, _ = full_run
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "model" / "model.safetensors").is_file() and summary["train"]["steps"] == STEPS
    assert summary["tracking_uri"] == mlflow_server.uri and summary["reference_cache"]["path"].startswith("s3://")
    # the two train workers ran on two nodes, neither the head (only node_a and node_b have a `trainer`)
    nodes = dict(re.findall(r"train: rank (\d) of 2 on node ([0-9a-f]+)", logs))
    head = cluster.ray("status", "--address", cluster.gcs_address).stdout
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], logs[-5000:]
    assert s3.listing(f"ray/{sid}"), "no checkpoint on S3"
    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    sizes = history(client, run.info.run_id, "train/world_size")
    assert sorted(sizes) == list(range(1, STEPS + 1)) and {v for v, _ in sizes.values()} == {2.0}, head


def test_elastic_run_survives_a_lost_node_and_grows_back(cluster, services, full_run, tmp_path, small_pairs, demo_model):
    """Kill node_a (its raylet and processes) after the first checkpoint: the run goes on with one worker from that
    checkpoint, grows back to two when node_a returns, and finishes. Every step trained the same pairs as the
    uninterrupted run, and its loss agrees to fp32 rounding."""
    from mlflow.tracking import MlflowClient

    s3, mlflow_server = services
    full_out, full_sid, _, full_seconds = full_run
    client = MlflowClient(mlflow_server.uri)
    (tmp_path / "out" / "models").mkdir(parents=True)
    os.symlink(demo_model, tmp_path / "out" / "models" / Path(demo_model).name)
    sid = f"dpo-ray-elastic-{uuid.uuid4().hex[:8]}"
    # steps of ~1.3 s: after the restart on one worker (~20 s after the kill) the run must outlast node_a's return, the
    # 5 s resize check and a restart at two (~25 s more); at 0.5 s a step it once finished first, still on one worker
    sub = submit(cluster, sid, elastic_sets(tmp_path, s3, mlflow_server.uri, small_pairs, sid), {**s3.env, "DPO_RAY_STEP_DELAY_S": "1.0"}, wait=False,
                 stage="train")  # what a lost node changes: training (the evaluation is the uninterrupted run's)
    assert sub.returncode == 0, sub.stderr[-3000:]
    try:
        run, deadline = wait_past_a_checkpoint_at_two(cluster, client, s3, sid)
        before = history(client, run.info.run_id, "train/world_size")
        killed = cluster.kill_node("node_a")
        dead = cluster.wait_for_nodes(2, timeout=120, poll=0.5)
        while True:  # the run goes on with one worker (steps logged after the kill: it may have started with one)
            sizes = history(client, run.info.run_id, "train/world_size")
            resumed = [(ts, step) for step, (v, ts) in sizes.items() if v == 1.0 and ts / 1000 > killed]
            if resumed:
                break
            assert job_status(cluster, sid) != "FAILED" and time.time() < deadline + 300, explain(cluster, sid)
            time.sleep(0.5)
        first_ts, first_step = min(resumed)
        cluster.start_worker("node_a", NODES["node_a"])
        back = cluster.wait_for_nodes(3, timeout=120, poll=0.5)
        status = wait_job(cluster, sid)
        assert status == "SUCCEEDED", explain(cluster, sid)
    except BaseException:
        print(explain(cluster, sid))
        raise

    sizes = history(client, run.info.run_id, "train/world_size")
    assert sorted(sizes) == list(range(1, STEPS + 1))
    order = [v for _, (v, _) in sorted(sizes.items())]
    assert first_step > 1 and 1.0 in order[first_step - 1:] and order[-1] == 2.0, (first_step, order)  # from a checkpoint; one after the loss, two again
    last_before = max(before)
    redone = last_before - (first_step - 1)  # steps trained before the loss and again after it
    tags = client.get_run(run.info.run_id).data.tags
    assert sum(k.startswith("restart.") for k in tags) >= 2, tags  # the shrink and the growth
    # the same pairs at every step, and the same losses as the uninterrupted run
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["train"]["steps"] == STEPS
    full_run_id = json.loads((full_out / "summary.json").read_text())["mlflow_run_id"]
    for key, rel_tol in (("train/pairs_digest", 0.0), ("train/loss", 1e-5)):
        a, b = history(client, run.info.run_id, key), history(client, full_run_id, key)
        assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
        for step in a:
            assert abs(a[step][0] - b[step][0]) <= rel_tol * abs(b[step][0]) + 1e-7, (key, step, a[step][0], b[step][0])
    cost = {"detect_s": round(dead - killed, 1), "restart_s": round(first_ts / 1000 - killed, 1), "steps_redone": redone,
            "node_back_s": round(back - killed, 1), "uninterrupted_job_s": round(full_seconds, 1), "started_with_workers": before[1][0]}
    print(f"node-loss cost: {json.dumps(cost)}")
    (Path(os.environ.get("DPO_RAY_RESULTS", tmp_path)) / "node_loss.json").write_text(json.dumps(cost) + "\n")


def test_fixed_workers_with_a_lost_node_stop_with_one_line(cluster, services, tmp_path, small_pairs, demo_model):
    """num_workers 2 (fixed), one restart allowed: after node_b is lost the restart cannot place 2 workers; after
    train.placement_timeout_s the job fails with one line naming what is missing, and nothing hangs."""
    s3, mlflow_server = services
    (tmp_path / "out" / "models").mkdir(parents=True)
    os.symlink(demo_model, tmp_path / "out" / "models" / Path(demo_model).name)
    sid = f"dpo-ray-fixed-{uuid.uuid4().hex[:8]}"
    sets = elastic_sets(tmp_path, s3, mlflow_server.uri, small_pairs, sid, **{
        "train.num_workers": "2", "train.strategy": "fsdp", "train.max_failures": "1", "train.placement_timeout_s": "15"})
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.uri)
    sub = submit(cluster, sid, sets, {**s3.env, "DPO_RAY_STEP_DELAY_S": "0.5"}, wait=False, stage="train")
    assert sub.returncode == 0, sub.stderr[-3000:]
    try:
        deadline, run = time.time() + 300, None
        while time.time() < deadline:
            run = run or run_named(client, sid)
            if run and max(history(client, run.info.run_id, "train/world_size") or [0]) >= 2:
                break
            assert job_status(cluster, sid) != "FAILED", explain(cluster, sid)
            time.sleep(0.5)
        killed = cluster.kill_node("node_b")
        status = wait_job(cluster, sid, timeout=240)
        ended = time.time()
    finally:
        if "node_b" not in cluster.nodes:
            cluster.start_worker("node_b", NODES["node_b"])
    logs = job_logs(cluster, sid)
    assert status == "FAILED", logs[-5000:]
    errors = [line for line in logs.splitlines() if line.startswith("dpo-ray: error:")]
    assert len(errors) == 1, logs[-5000:]
    assert "2 worker(s) of {CPU: 1, trainer: 1} could not be placed within train.placement_timeout_s=15 s" in errors[0], errors[0]
    assert ended - killed < 180, ended - killed
    cluster.wait_for_nodes(3, timeout=120)


def test_reference_pass_survives_losing_an_actors_node(cluster, services, full_run, tmp_path, small_pairs, demo_model):
    """Two scoring actors, one per worker node (each has one `scorer`); node_a is killed mid-pass and does not come
    back while the job runs (a node lost for good): the pass ends on the one node left, the cache is complete, and its
    log-probs equal the uninterrupted pass's (the full run's). node_a is started again afterwards for the next tests."""
    s3, mlflow_server = services
    full_out = full_run[0]
    key_dir = s3.at(json.loads((full_out / "summary.json").read_text())["reference_cache"]["path"])
    want = {"train": read_split(key_dir, "train")}  # the cluster runs have no eval split
    s3.fs.delete_dir(key_dir.path)  # the next pass scores it again
    (tmp_path / "out" / "models").mkdir(parents=True)
    os.symlink(demo_model, tmp_path / "out" / "models" / Path(demo_model).name)
    sid = f"dpo-ray-reference-{uuid.uuid4().hex[:8]}"
    sets = elastic_sets(tmp_path, s3, mlflow_server.uri, small_pairs, sid, **{
        "reference.num_actors": "2", "reference.min_actors": "2", "reference.actor_resources": '{"scorer": 1}',
        "reference.batch_size": "8"})
    sub = submit(cluster, sid, sets, {**s3.env, "DPO_RAY_SCORE_DELAY_S": "0.5"}, wait=False, stage="reference")
    assert sub.returncode == 0, sub.stderr[-3000:]
    try:
        deadline = time.time() + 300
        while len(re.findall(r"scoring actor for .* \(ref\) on node", job_logs(cluster, sid))) < 2:  # both actors scoring
            assert time.time() < deadline and job_status(cluster, sid) != "FAILED", explain(cluster, sid)
            time.sleep(0.5)
        time.sleep(2)
        cluster.kill_node("node_a")
        cluster.wait_for_nodes(2, timeout=120, poll=0.5)
        status = wait_job(cluster, sid)  # on what is left: one scorer node, fewer actors than reference.min_actors
        assert status == "SUCCEEDED", explain(cluster, sid)
    except BaseException:
        print(explain(cluster, sid))
        raise
    finally:
        if "node_a" not in cluster.nodes:
            cluster.start_worker("node_a", NODES["node_a"])
    cluster.wait_for_nodes(3, timeout=120)
    assert part_complete(key_dir)
    for split, table in want.items():
        got = read_split(key_dir, split)
        assert got["row_id"].to_pylist() == table["row_id"].to_pylist()  # every pair once: none lost, none twice
        for col in [c for c in table.column_names if c.startswith(("ref_", "check_"))]:
            a, b = got[col].to_numpy(zero_copy_only=False), table[col].to_numpy(zero_copy_only=False)
            assert np.allclose(a, b, rtol=1e-5, atol=1e-5, equal_nan=True), col


def read_split(loc, split: str):
    import pyarrow.parquet as pq

    d = split_dir(loc, split)
    return pq.read_table(d.path, filesystem=d.fs).sort_by("row_id")


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
    assert cluster.alive_nodes() == 3

    refused = subprocess.run(cmd + ["--address", cluster.gcs_address], capture_output=True, text=True, env=env,
                             cwd=ROOT, timeout=300)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr.splitlines()[-1], refused.stderr[-3000:]


def test_preempted_node_that_never_returns(cluster, services, full_run, tmp_path, small_pairs, demo_model):
    """A spot node's notice: node_a's `ray start` gets SIGTERM (Ray drains it for DRAIN_S, then it is gone for good).
    The workers checkpoint at the first step after the notice; at the drain's end Ray Train restarts them on what is
    left from that step (nothing trained twice), without using train.max_failures (0 here); the job then evaluates on
    the two nodes left and SUCCEEDS, the world size 2 -> 1 in MLflow. Runs last: node_a does not come back."""
    from mlflow.tracking import MlflowClient

    s3, mlflow_server = services
    client = MlflowClient(mlflow_server.uri)
    (tmp_path / "out" / "models").mkdir(parents=True)
    os.symlink(demo_model, tmp_path / "out" / "models" / Path(demo_model).name)
    sid = f"dpo-ray-preempt-{uuid.uuid4().hex[:8]}"
    sets = elastic_sets(tmp_path, s3, mlflow_server.uri, small_pairs, sid, **{"train.max_failures": "0"})
    # steps of ~0.85 s: the run outlasts the notice (a run that ends before the node does ends as any other)
    sub = submit(cluster, sid, sets, {**s3.env, "DPO_RAY_STEP_DELAY_S": "0.8"}, wait=False)
    assert sub.returncode == 0, sub.stderr[-3000:]
    try:
        run, _ = wait_past_a_checkpoint_at_two(cluster, client, s3, sid)  # the notice then arrives mid-interval
        noticed = cluster.preempt_node("node_a")
        cluster.nodes.pop("node_a").wait(timeout=DRAIN_S + 60)  # the node drains, then stops for good
        gone = time.time()
        status = wait_job(cluster, sid)
        logs = job_logs(cluster, sid)
        assert status == "SUCCEEDED", explain(cluster, sid)
    except BaseException:
        print(explain(cluster, sid))
        raise
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["train"]["steps"] == STEPS and "eval" in summary, summary  # evaluate ran on what was left
    tags = client.get_run(run.info.run_id).data.tags
    saved = sorted(int(k.split("_")[-1]) for k in tags if k.startswith("preempted.step_"))
    resumed = sorted(int(k.split("_")[-1]) for k in tags if k.startswith("restart.step_"))
    assert len(saved) == 1 and saved[0] in resumed, (tags, logs[-5000:])  # restarted from the notice's own checkpoint
    sizes = history(client, run.info.run_id, "train/world_size")
    order = [v for _, (v, _) in sorted(sizes.items())]
    assert sorted(sizes) == list(range(1, STEPS + 1)) and order[saved[0] - 1] == 2.0 and set(order[saved[0]:]) == {1.0}, order
    steps = history(client, run.info.run_id, "train/loss")
    notice_step = min(step for step, (_, ts) in steps.items() if ts / 1000 > noticed)
    first_after = min(ts for step, (_, ts) in sizes.items() if step > saved[0]) / 1000
    cost = {"notice_to_checkpoint_steps": saved[0] - notice_step + 1, "steps_redone": 0, "drain_s": round(gone - noticed, 1),
            "notice_to_resumed_s": round(first_after - noticed, 1), "max_failures": 0}
    print(f"preemption cost: {json.dumps(cost)}")
    (Path(os.environ.get("DPO_RAY_RESULTS", tmp_path)) / "preemption.json").write_text(json.dumps(cost) + "\n")


def test_cluster_stops_without_leftovers(cluster):
    assert cluster.ours(), "nothing of the cluster was found running before the stop"
    left = cluster.stop()
    assert not left, f"still running after the stop: {left}"
    assert all(p.poll() is not None for p in cluster.procs)
