"""Two runs, one cache (issue 34): two writers that finish the same key at once, and the leases with which the
second run waits for the first instead of computing the key again. Real files, threads and a real killed process,
on the local filesystem and on a real S3-protocol server (moto_server, as in test_storage); no Ray. Seconds. Last, two
real `dpo-ray run` processes on one fresh cache (slow: local Ray runtimes, about 2 minutes)."""
from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import S3Server, small_config
from dpo_ray.model import _build_once
from pipeline.artifacts import DONE, atomic_dir, complete_dir, completed, install, marker_text
from pipeline.lease import Lease, claim, cache_claim, describe, lease_of, model_claim, owner_gone, owner_record, parse, stale, take
from pipeline.storage import local

ROOT = Path(__file__).resolve().parent.parent
# short beats so that a test takes seconds; on moto (a Python server on 2 shared CPUs) a request can take 0.1 s
TIMING = {"local": {"heartbeat": 0.2, "settle": 0.1, "poll": 0.02}, "s3": {"heartbeat": 0.5, "settle": 0.5, "poll": 0.1}}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("s3") / "moto.log")
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """(a cache root Location, its timings) on the local filesystem and on S3."""
    if request.param == "local":
        return local(tmp_path / "cache"), TIMING["local"]
    return request.getfixturevalue("s3").loc(f"race/{request.node.name}"), TIMING["s3"]


def finished_copy(final: Path, text: str) -> Path:
    """A complete temporary sibling of `final`, as atomic_dir leaves it just before its rename."""
    tmp = final.parent / f".tmp-{final.name}-{text}"
    tmp.mkdir(parents=True)
    (tmp / "a.txt").write_text(text)
    (tmp / DONE).write_text(marker_text("ok", local(tmp)))
    return tmp


def once(fn):
    calls = []
    return lambda: None if calls else (calls.append(1), fn())


# ------------------------------------------------------------------ two writers of one key finishing at once


def test_a_writer_that_finishes_between_our_look_and_our_rename_is_a_hit(tmp_path):
    """The issue's crash: `os.replace` onto the directory the other run had just completed (ENOTEMPTY)."""
    final = tmp_path / "reference" / "k" / "eval"
    mine = finished_copy(final, "mine")

    def theirs():
        with atomic_dir(final) as t:
            (t / "a.txt").write_text("theirs")

    install(mine, final, window=once(theirs))  # we looked (nothing there), then the other run renamed first
    assert completed(final) is not None and (final / "a.txt").read_text() == "theirs"
    assert sorted(p.name for p in final.parent.iterdir()) == ["eval"]  # ours dropped, nothing left aside


def test_a_complete_copy_is_never_removed_when_the_old_one_was_damaged(tmp_path, caplog):
    """A damaged `final` is replaced, but the copy another writer put in place meanwhile is kept (same inode)."""
    final = tmp_path / "prepared" / "k"
    with atomic_dir(final) as t:
        (t / "a.txt").write_text("old")
    (final / "a.txt").write_text("damaged!")  # another size than the marker says
    seen = {}

    def theirs():
        with atomic_dir(final) as t:
            (t / "a.txt").write_text("theirs")
        seen["inode"] = final.stat().st_ino

    with caplog.at_level(logging.WARNING, "dpo_ray"):
        install(finished_copy(final, "mine"), final, window=once(theirs))
    assert (final / "a.txt").read_text() == "theirs" and final.stat().st_ino == seen["inode"]
    assert completed(final) is not None and sorted(p.name for p in final.parent.iterdir()) == [".tmp-k.clearing", "k"]
    assert f"cache: {final / 'a.txt'} is damaged" in caplog.text


def test_many_writers_at_once_all_succeed_and_one_copy_stays(tmp_path):
    """Real concurrency: 6 threads finish the same key at the same moment, 15 times; none fails."""
    errors, n = [], 6
    for rnd in range(15):
        final = tmp_path / f"k{rnd}"
        if rnd % 3 == 0:  # a damaged copy there first, a third of the time
            final.mkdir()
            (final / "a.txt").write_text("left by an old version")
        gate = threading.Barrier(n)

        def write(i):
            try:
                with atomic_dir(final) as t:
                    (t / "a.txt").write_text(f"writer {i}")
                    gate.wait()
                assert (final / "a.txt").read_text().startswith("writer ")
            except BaseException as e:  # noqa: BLE001  (reported below)
                errors.append(repr(e))

        threads = [threading.Thread(target=write, args=(i,)) for i in range(n)]
        [t.start() for t in threads]
        [t.join(30) for t in threads]
        assert completed(final) is not None
    assert errors == []
    # no writer's .tmp-* left; the damaged copies were cleared under a lock file, which stays (empty)
    left = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-"))
    assert all(re.fullmatch(r"\.tmp-k(0|3|6|9|12)\.clearing", n) for n in left), left
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-")) == sorted(f"k{r}" for r in range(15))


def test_the_writer_that_finishes_second_uses_the_first_copy(store, caplog):
    """Locally (atomic_dir) and on S3 (attempt-<id>/ + marker): the second to finish drops its copy, the first stays."""
    root, _ = store
    final = root / "reference" / "k" / "eval"
    with caplog.at_level(logging.INFO, "dpo_ray"):
        with complete_dir(final) as mine:
            (mine / "a.txt").write_text("mine!")
            with complete_dir(final) as theirs:
                (theirs / "a.txt").write_text("theirs")
            first = completed(final)
    data = completed(final)
    assert data == first and (data / "a.txt").read_text() == "theirs"
    assert not mine.is_dir()  # ours, named by no marker, is gone
    if not root.is_local:
        assert data.name == theirs.name and sorted(c.name for c in final.children()) == [DONE, theirs.name]
        assert "was completed by another run meanwhile; this run's copy is dropped" in caplog.text


# ------------------------------------------------------------------ leases


def test_pure_parts():
    rec = owner_record("the prepared data of a.jsonl")
    assert parse(json.dumps(rec)) == rec and parse("") is None and parse('{"half') is None and parse("[1]") is None
    assert describe(rec).startswith(f"{socket.gethostname()} pid {os.getpid()}") and describe(None) == "an unknown owner"
    now = time.time()
    assert not stale({**rec, "beat": now - 1}, now, 0.5, 15) and stale({**rec, "beat": now - 16}, now, 0.5, 15)
    assert stale({**rec, "beat": now + 3600}, now, 16, 15)  # a clock far ahead: unchanged under our watch for 16 s
    assert stale(None, now, 16, 15) and not stale(None, now, 1, 15) and stale(rec, now, 0, 15, gone=True)
    assert not owner_gone(rec)  # this process
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert owner_gone({**rec, "pid": dead.pid}) and not owner_gone({**rec, "pid": dead.pid, "host": "elsewhere"})
    assert not owner_gone({**rec, "pid": dead.pid, "pidns": "pid:[1]"})  # another container: its pids are not ours


def test_a_second_claimant_waits_for_the_live_owner_then_reads_its_result(store, caplog):
    root, t = store
    out = root / "prepared" / "k"
    got = {}
    with caplog.at_level(logging.INFO, "dpo_ray"):
        with cache_claim(out, "the prepared data of a.jsonl", **t) as first:
            assert first.lease is not None and first.done is None
            waiter = threading.Thread(target=lambda: got.update(c=claim(out, "the prepared data of a.jsonl", **t)))
            waiter.start()
            time.sleep(5 * t["heartbeat"])  # past 3 beats: a live owner's lease is not taken over
            assert waiter.is_alive() and parse(lease_of(out).read_text())["id"] == first.lease.rec["id"]
            with complete_dir(out) as d:
                (d / "stats.json").write_text("{}")
        waiter.join(30)
    c = got["c"]
    assert c.done == completed(out) and c.lease is None and c.waited >= 5 * t["heartbeat"]
    assert c.owner == describe(first.lease.rec)
    assert re.search(rf"cache: waited \d+ s for the prepared data of a.jsonl \(owner {re.escape(socket.gethostname())} pid {os.getpid()}\)",
                     caplog.text)
    assert "this run waits for it" in caplog.text and "takes the lease over" not in caplog.text
    assert not lease_of(out).is_file()  # released
    assert claim(out, "the prepared data of a.jsonl", **t).done == c.done  # a plain hit: no lease


def test_when_the_owner_fails_the_waiting_run_computes_it(tmp_path):
    out, t = local(tmp_path / "generations" / "k"), TIMING["local"]
    got, started = {}, threading.Event()
    with pytest.raises(RuntimeError):
        with cache_claim(out, "the reference's replies", **t):
            waiter = threading.Thread(target=lambda: (started.set(), got.update(c=claim(out, "the reference's replies", **t))))
            waiter.start()
            started.wait()
            time.sleep(0.3)
            raise RuntimeError("the owner's generation failed")
    waiter.join(10)
    assert got["c"].done is None and got["c"].lease is not None  # its turn
    got["c"].lease.release()


def test_an_owner_that_stopped_beating_is_taken_over(store, caplog):
    root, t = store
    out = root / "reference" / "k" / "train"
    lease_of(out).write_text(json.dumps({**owner_record("x"), "host": "node-7", "pid": 4242, "beat": time.time() - 60}))
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        with cache_claim(out, "the reference train split of a.jsonl", **t) as c:
            assert c.lease is not None and c.waited < 2 + t["settle"]  # at once: its last beat is a minute old
            assert parse(lease_of(out).read_text())["id"] == c.lease.rec["id"]
    assert re.search(r"the run holding its lease \(node-7 pid 4242\) has not renewed it for 6\d s; this run takes the lease over",
                     caplog.text)
    # a clock far ahead (a beat an hour in the future) that never changes: taken over after 3 beats under our watch
    lease_of(out).write_text(json.dumps({**owner_record("x"), "host": "node-8", "beat": time.time() + 3600}))
    with cache_claim(out, "the reference train split of a.jsonl", **t) as c:
        assert c.lease is not None and c.waited >= 3 * t["heartbeat"]


HOLDER = """
import sys, time
from pipeline.lease import claim
from pipeline.storage import local
c = claim(local(sys.argv[1]), "the demo thing", heartbeat=0.1)
print("holding" if c.lease else "not holding", flush=True)
time.sleep(120)
"""


def test_a_killed_owner_is_taken_over_at_once(tmp_path, caplog):
    """A real owner process, beating, killed with SIGKILL while another run waits for it: the waiting run takes over
    as soon as the owner is gone (same machine: its pid has exited), not after the missed beats."""
    out = local(tmp_path / "models" / "demo")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, out.path], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "holding"
        got = {}
        with caplog.at_level(logging.INFO, "dpo_ray"):
            waiter = threading.Thread(target=lambda: got.update(c=claim(out, "the demo thing", heartbeat=5.0, poll=0.02)))
            waiter.start()
            time.sleep(0.5)
            assert waiter.is_alive()  # the owner beats: waited for
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            killed = time.monotonic()
            waiter.join(10)
        assert got["c"].lease is not None and time.monotonic() - killed < 2  # not 3 x 5 s
        assert f"(pid {proc.pid}) has exited; this run takes the lease over" in caplog.text.replace(socket.gethostname() + " ", "")
        got["c"].lease.release()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_two_claimants_at_the_same_moment_one_wins(store):
    """Locally O_EXCL decides; on S3 (no exclusive create) both write, settle, read back: the last writer wins."""
    root, t = store
    out = root / "generations" / "k"
    gate, got = threading.Barrier(2), {}

    def go(i):
        gate.wait()
        got[i] = claim(out, "the reference's replies", wait=False, **t)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(2)]
    [th.start() for th in threads]
    [th.join(30) for th in threads]
    winners = [c for c in got.values() if c.lease is not None]
    assert len(winners) == 1 and [c.busy for c in got.values()].count(True) == 1
    assert parse(lease_of(out).read_text())["id"] == winners[0].lease.rec["id"]
    winners[0].lease.release()


def test_an_owner_whose_lease_was_taken_over_stops_beating_and_leaves_it(tmp_path, caplog):
    at, t = lease_of(local(tmp_path / "prepared" / "k")), TIMING["local"]
    mine = owner_record("the prepared data of a.jsonl")
    assert take(at, mine)
    with caplog.at_level(logging.WARNING, "dpo_ray"):
        lease = Lease(at, mine, t["heartbeat"])
        time.sleep(0.6)
        before = parse(at.read_text())["beat"]
        assert before > mine["since"] and not lease.lost  # beating
        other = {**owner_record("the prepared data of a.jsonl"), "host": "node-9"}
        at.write_text(json.dumps(other))  # a run that judged us stale
        time.sleep(0.6)
        lease.release()
    assert lease.lost and parse(at.read_text()) == other  # not overwritten, not removed
    assert "the lease on the prepared data of a.jsonl was taken over by node-9" in caplog.text


def test_two_runs_needing_one_demo_model_build_it_once(tmp_path, caplog):
    """dpo_ray.model._build_once with the driver's claim (pipeline.lease.model_claim): the second run waits."""
    out, t = tmp_path / "models" / "demo-tiny-llama-v1", TIMING["local"]
    builds, release = [], threading.Event()

    def build(tmp: Path):
        builds.append(threading.current_thread().name)
        release.wait(10)
        (tmp / "model.safetensors").write_bytes(b"0" * 100)
        (tmp / "config.json").write_text("{}")

    claim_fast = lambda o, what: model_claim(o, what, **t)  # noqa: E731
    with caplog.at_level(logging.INFO, "dpo_ray"):
        threads = [threading.Thread(target=_build_once, args=(out, build, "the demo model", claim_fast), name=f"run{i}") for i in range(2)]
        threads[0].start()
        while not builds:
            time.sleep(0.01)
        threads[1].start()
        time.sleep(0.5)
        release.set()
        [th.join(30) for th in threads]
    assert builds == ["run0"] and (out / "config.json").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo-tiny-llama-v1"]  # no lease, no .tmp-* left
    assert re.search(r"cache: waited \d+ s for the demo model \(owner ", caplog.text)


# ------------------------------------------------------------------ two real runs on one fresh cache


@pytest.mark.slow
def test_two_runs_on_one_fresh_cache_compute_each_part_once(tmp_path, small_pairs):
    """Two `dpo-ray run` processes a second apart, each with its own output_dir, MLflow store and local Ray runtime,
    on one fresh cache_dir: the demo model, the prepared data and each reference split are computed by one of them
    and waited for (or hit) by the other; nothing is computed twice, and both end with the same result."""
    cache = tmp_path / "cache"  # fresh: the demo model too is built (or waited for) in it
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    env["RAY_ENABLE_UV_RUN_RUNTIME_ENV"] = "0"
    procs, logs, started, walls = [], [], [], {}
    try:
        for i in range(2):
            run_dir = tmp_path / f"run{i}"
            run_dir.mkdir()
            sets = small_config(run_dir, cache, small_pairs)
            cmd = [sys.executable, "-m", "pipeline.cli", "run", "configs/demo.yaml"] + [a for s in sets for a in ("--set", s)]
            logs.append(run_dir / "console.log")
            with open(logs[-1], "w") as f:  # the child keeps its own descriptor
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
            started.append(time.monotonic())
            if i == 0:
                time.sleep(1.0)
        while len(walls) < 2 and time.monotonic() - started[0] < 420:
            for i, proc in enumerate(procs):
                if i not in walls and proc.poll() is not None:
                    walls[i] = time.monotonic() - started[i]
            time.sleep(0.2)
        assert len(walls) == 2, "a run was still going after 420 s"
    finally:
        for proc in procs:  # each CLI and the Ray runtime it started (its own session)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(30)
    text = [p.read_text(errors="replace") for p in logs]
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"run{i} exited {proc.returncode}:\n{text[i][-4000:]}"

    # each part of the cache computed by exactly one of the two runs
    scored = [re.findall(r"\((train|eval)\)", m) for t in text for m in re.findall(r"reference: scoring (.*) with ", t)]
    assert sorted(s for run in scored for s in run) == ["eval", "train"], scored
    assert sum(t.count("built the demo model and tokenizer in") for t in text) == 1
    assert sum(t.count("prepare: tokenizing") for t in text) == 1
    for t in text:  # no run took a live run's lease over, none computed a copy that was then dropped
        assert "takes the lease over" not in t and "copy is dropped" not in t and "was taken over" not in t
    waits = [re.findall(r"cache: waited (\d+) s for (.+?) \(owner ", t) for t in text]
    assert any(waits), "neither run waited for the other"
    scorer = next(i for i, t in enumerate(text) if "pairs scored in" in t)
    other = 1 - scorer
    if "pairs scored in" not in text[other]:  # the usual case: one run scored both splits; the other waited or hit
        assert waits[other] or "reference: cache hit" in text[other], text[other][-4000:]

    s = [json.loads((tmp_path / f"run{i}" / "out" / "summary.json").read_text()) for i in range(2)]
    assert s[0]["reference_cache"]["key"] == s[1]["reference_cache"]["key"]
    assert s[0]["reference_cache"]["path"] == s[1]["reference_cache"]["path"]
    assert s[0]["data"]["key"] == s[1]["data"]["key"] and s[0]["reference_model_dir"] == s[1]["reference_model_dir"]
    assert s[scorer]["reference_cache"]["hit"] is False
    if "pairs scored in" not in text[other]:
        assert s[other]["reference_cache"]["hit"] is True  # it ran the reference model for none of it
    # the same held-out result: one model, one data, one reference, the same seed
    assert s[0]["eval"]["rewards/accuracies"] == s[1]["eval"]["rewards/accuracies"]
    assert s[0]["eval"]["loss"] == pytest.approx(s[1]["eval"]["loss"], rel=1e-4)
    assert s[0]["eval_reference"] == s[1]["eval_reference"]
    # both released their leases, no writer left a .tmp-* copy behind
    assert not [str(p.relative_to(cache)) for p in cache.rglob("*") if p.name.endswith(".lease") or p.name.startswith(".tmp-")]
    print(f"two runs on one cache: run0 {walls[0]:.0f} s, run1 {walls[1]:.0f} s (started 1 s later); run{scorer} scored the "
          f"reference; waits: " + "; ".join(f"run{i} waited {n} s for {what}" for i in range(2) for n, what in waits[i]))
