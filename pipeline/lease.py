"""Cache leases: when two runs want the same cache key at once, one computes it and the other waits and reads it.

A lease is a small JSON file next to the key's directory (`prepared/<key>.lease`, `reference/<key>/train.lease`,
`generations/<key>.lease`, `models/<name>.lease`) naming its owner (host, pid, run, a random id) and a heartbeat:
a background thread of the owner rewrites its timestamp every `heartbeat` seconds while the stage computes. A run
that wants the key and finds a live lease waits, polling, with a log line every 30 s naming the owner, then reads
the owner's completed result and says so in one line (`cache: waited 12 s for <what> (owner <host> pid <pid> ...)`).
An owner that fails releases its lease with nothing complete there: the waiting run then computes the key itself.
An owner that stops beating for STALE_BEATS intervals (killed, its machine lost) has its lease taken over.

The lease only saves work. Correctness comes from the cache's writes (pipeline/artifacts.py): two runs that both
compute a key both write whole copies and the first complete one is used. So each residual race below costs a
duplicate computation at worst, never a wrong or half-read result:
- local and mounted filesystems: a lease is created with O_CREAT|O_EXCL, so one of two claimants wins. A stale one
  is renamed aside and checked to be the lease judged stale; one that beat in between is put back.
- object stores have no exclusive create: a claimant writes its lease, waits `settle` seconds and reads it back; the
  last writer, whose claim everyone reads back, wins. Two claimants whose look and write are more than `settle`
  apart may both win; the one overwritten finds out at its next beat, stops beating and finishes its copy anyway.
- staleness is the lease's timestamp against this host's clock, or the lease not changing for as long while we
  watch: a host whose clock runs more than STALE_BEATS * heartbeat seconds ahead may take over a live lease.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

from .artifacts import completed
from .storage import Location, local

log = logging.getLogger("dpo_ray")
HEARTBEAT = 5.0  # seconds between an owner's beats
STALE_BEATS = 3  # a lease without a beat for this many intervals is taken over
SETTLE = 1.0  # object stores: seconds between writing a claim and reading back who won
POLL = 1.0  # seconds between a waiting run's looks at the lease and the result
REPORT = 30.0  # seconds between a waiting run's log lines
_run: dict = {"label": None}


@contextmanager
def naming_run(label: str | None):
    """What this process's leases call its run (its output_dir) while the block runs, for the runs that wait for it;
    the label before it is restored after (a second run in the same process is not named for the first)."""
    before, _run["label"] = _run["label"], label
    try:
        yield
    finally:
        _run["label"] = before


def lease_of(loc: Location) -> Location:
    """The lease of a cache directory: a file beside it."""
    return loc.parent / f"{loc.name}.lease"


def owner_record(what: str) -> dict:
    now = time.time()
    return {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pidns": pid_namespace(), "pid": os.getpid(),
            "run": _run["label"] or ray_job(), "what": what, "since": now, "beat": now}


def pid_namespace() -> str | None:
    """This process's PID namespace (Linux): pids are comparable only within one (containers sharing a host name)."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def owner_gone(rec: dict | None) -> bool:
    """Whether the lease's owner is a process of this machine (same host name and PID namespace) that has exited:
    a run killed here is taken over at once, not after STALE_BEATS missed beats."""
    if not rec or rec.get("host") != socket.gethostname() or rec.get("pidns") is None or rec.get("pidns") != pid_namespace():
        return False
    try:
        os.kill(int(rec["pid"]), 0)
    except ProcessLookupError:
        return True
    except (OSError, ValueError, TypeError, KeyError):  # another user's process (EPERM), or no usable pid
        return False
    return False


def ray_job() -> str | None:
    """The Ray job's submission id when this driver runs as one (`ray job submit` puts it in the job config)."""
    try:
        return json.loads(os.environ["RAY_JOB_CONFIG_JSON_ENV_VAR"])["metadata"]["job_submission_id"]
    except (KeyError, TypeError, ValueError):
        return None


def parse(text: str | None) -> dict | None:
    """A lease's record; None for no lease, an empty one (created, not yet written) or one that is not ours to read."""
    try:
        rec = json.loads(text) if text else None
    except ValueError:
        return None
    return rec if isinstance(rec, dict) and "id" in rec else None


def describe(rec: dict | None) -> str:
    if not rec:
        return "an unknown owner"
    return " ".join(str(x) for x in (rec.get("host"), "pid", rec.get("pid"), *(("run", rec["run"]) if rec.get("run") else ())))


def stale(rec: dict | None, now: float, unchanged_for: float, after: float, gone: bool = False) -> bool:
    """Whether a lease's owner has stopped: `gone` (it exited, `owner_gone`), or no beat for `after` seconds by its
    timestamp (against `now`, this host's clock) or by our watch (`unchanged_for`: seconds its text stayed the same)."""
    beat = rec.get("beat") if rec else None
    return gone or unchanged_for > after or (isinstance(beat, (int, float)) and now - beat > after)


def _read(at: Location) -> str | None:
    try:
        return at.read_text()
    except FileNotFoundError:
        return None


def _write(at: Location, text: str) -> None:
    """The whole lease at once: locally a rename over it, on object stores one object (seen whole or not at all)."""
    if at.is_local:
        tmp = f"{at.path}.{uuid.uuid4().hex[:8]}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, at.path)
    else:
        with at.fs.open_output_stream(at.path) as f:
            f.write(text.encode())


def _break_local(at: Location, seen: str) -> None:
    """Remove the stale lease whose text was `seen`: renamed aside first, so a lease another claimant created or its
    owner renewed meanwhile is not lost (it is linked back unless a newer one is in place)."""
    aside = f"{at.path}.{uuid.uuid4().hex[:8]}.stale"
    try:
        os.rename(at.path, aside)
    except FileNotFoundError:
        return
    with open(aside) as f:
        moved = f.read()
    if moved != seen:
        try:
            os.link(aside, at.path)
        except OSError:
            pass
    os.unlink(aside)


def take(at: Location, rec: dict, settle: float = SETTLE, stale_text: str | None = None) -> bool:
    """Try to make `rec` the lease at `at` (over the stale lease whose text was `stale_text`, if given): True if it is ours."""
    text = json.dumps(rec)
    if at.is_local:
        if stale_text is not None:
            _break_local(at, stale_text)
        os.makedirs(os.path.dirname(at.path), exist_ok=True)
        try:
            fd = os.open(at.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if _read(at) not in (None, stale_text):  # someone claimed it since we looked
        return False
    _write(at, text)
    time.sleep(settle)  # let a claimant that looked when we did write too: the last writer wins, everyone reads it back
    return (parse(_read(at)) or {}).get("id") == rec["id"]


class Lease:
    """A lease this run holds, renewed by a background thread until `release`."""

    def __init__(self, at: Location, rec: dict, heartbeat: float = HEARTBEAT):
        self.at, self.rec, self.heartbeat = at, rec, heartbeat
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beats, name=f"lease {at.name}", daemon=True)
        self._thread.start()

    def beat(self) -> bool:
        """Renew the timestamp if the lease is still ours; False once another run has it (it took it over)."""
        text = _read(self.at)
        if text is not None and parse(text) is None:
            return True  # being rewritten: look again at the next beat
        if (parse(text) or {}).get("id") != self.rec["id"]:
            return False
        self.rec["beat"] = time.time()
        _write(self.at, json.dumps(self.rec))
        return True

    def _beats(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat):
            try:
                if not self.beat():
                    self.lost = True
                    log.warning("cache: the lease on %s was taken over by %s; this run finishes its own copy (the first "
                                "complete one is used)", self.rec["what"], describe(parse(_read(self.at))))
                    return
                failing = False
            except Exception as e:  # noqa: BLE001  a storage hiccup: the next beat tries again (3 missed: taken over)
                if not failing:
                    log.warning("cache: cannot renew the lease %s (%s)", self.at, str(e).splitlines()[0][:200])
                failing = True

    def release(self) -> None:
        """Stop beating and remove the lease if it is still ours."""
        self._stop.set()
        self._thread.join()
        if (parse(_read(self.at)) or {}).get("id") == self.rec["id"]:
            try:
                self.at.fs.delete_file(self.at.path)
            except FileNotFoundError:
                pass


@dataclass
class Claim:
    """What `claim` found: `done`, the complete result to read; else `lease` (this run computes the key) or, with
    wait=False, `busy` (another live run computes it; `owner` names it)."""

    done: Location | None = None
    lease: Lease | None = None
    busy: bool = False
    owner: str | None = None  # the run waited for (or found busy)
    waited: float = 0.0  # seconds spent waiting for it


def claim(loc: Location, what: str, wait: bool = True, done: Callable[[Location], object] = completed,
          heartbeat: float = HEARTBEAT, settle: float = SETTLE, poll: float = POLL) -> Claim:
    """The result at `loc` when complete (now, or after waiting for the run computing it), else the lease to compute
    it under. `done(loc)` says whether loc is complete (default: its marker and manifest, `completed`). A plain cache
    hit neither reads nor writes a lease."""
    at, after = lease_of(loc), STALE_BEATS * heartbeat
    t0 = last_report = seen_at = time.monotonic()
    seen, holder = None, None
    while True:
        if (d := done(loc)) is not None:
            waited = time.monotonic() - t0
            if holder is not None:
                log.info("cache: waited %.0f s for %s (owner %s)", waited, what, describe(holder))
            return Claim(done=d, owner=describe(holder) if holder is not None else None, waited=waited)
        text, now = _read(at), time.monotonic()
        if text != seen:
            seen, seen_at = text, now
        rec = parse(text)
        gone = owner_gone(rec)
        if text is None or stale(rec, time.time(), now - seen_at, after, gone):
            if text is not None:
                beat = rec.get("beat") if rec else None
                quiet = time.time() - beat if isinstance(beat, (int, float)) else now - seen_at
                log.warning("cache: %s: the run holding its lease (%s) %s; this run takes the lease over and computes it", what,
                            describe(rec), "has exited" if gone else f"has not renewed it for {quiet:.0f} s")
            mine = owner_record(what)
            if take(at, mine, settle, stale_text=text):
                lease = Lease(at, mine, heartbeat)
                if (d := done(loc)) is not None:  # finished between our look and our claim
                    lease.release()
                    continue
                return Claim(lease=lease, owner=describe(holder) if holder is not None else None, waited=time.monotonic() - t0)
            continue  # another run claimed it first: look at its lease
        if not wait:
            return Claim(busy=True, owner=describe(rec))
        if holder is None:
            log.info("cache: %s is being computed by %s; this run waits for it", what, describe(rec))
        holder = rec or holder or {}
        if now - last_report >= REPORT:
            log.info("cache: still waiting for %s from %s (%.0f s so far)", what, describe(rec), now - t0)
            last_report = now
        time.sleep(poll)


@contextmanager
def cache_claim(loc: Location, what: str, **kwargs):
    """`claim` for one block: `with cache_claim(out, "the prepared data of a.jsonl") as c: if c.done: read it, else
    compute and write it (complete_dir)`; the lease, if this run got it, is released when the block ends."""
    c = claim(loc, what, **kwargs)
    try:
        yield c
    finally:
        if c.lease is not None:
            c.lease.release()


def model_dir_done(loc: Location) -> Location | None:
    """A model directory is complete when its config.json is there: it is renamed into place whole (no marker)."""
    return loc if (loc / "config.json").is_file() else None


def model_claim(out, what: str, **kwargs):
    """`cache_claim` for a local model directory (`out`, a path) under <cache>/models: dpo_ray.model.resolve_model's
    claim, so two runs needing the same demo model or registry version build or download it once."""
    return cache_claim(local(out), what, done=model_dir_done, **kwargs)
