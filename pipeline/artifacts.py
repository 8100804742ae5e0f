"""Fingerprints, input discovery, atomic directory writes and completion markers.

A cache directory is complete when its `_COMPLETE` marker exists; readers treat a directory without one as absent.
On the local filesystem the directory is filled aside and renamed into place (`atomic_dir`). Object stores have no
directory rename, so there it is filled in a fresh `attempt-<id>/` inside it and the marker, written last, names
that attempt: a single object written at once, so a reader sees either no marker or a whole attempt, and two runs
filling the same key at the same time cannot mix their files (the last marker wins; both attempts are whole).
`completed()` gives the directory that holds the data either way. A writer that finds the key completed by another
run when it is about to put its own copy in place drops its copy and uses theirs: a cache hit, never an error
(`install`). Two runs that want the same key at once compute it once: see pipeline/lease.py.

The marker also vouches for the files: its first line is "ok" or the attempt's name, the rest a JSON manifest of every
file written (relative name, size in bytes, and rows for Parquet). `completed()` checks the files against it (one
listing, no reads) and treats a directory whose file is missing or of another size as absent, after one warning line
naming the file: that part of the cache is then recomputed like any other miss. Markers without a manifest (written
before it existed) are taken as they are.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path

import pyarrow.fs as pafs

from dpo_ray.errors import UserError

from .storage import Location, local

log = logging.getLogger("dpo_ray")
DONE = "_COMPLETE"  # written last: locally inside the temporary directory before the rename; on object stores it names the attempt


class LockedError(UserError, RuntimeError):
    """Another dpo-ray process holds the output directory."""


@contextmanager
def exclusive(directory: Path):
    """Hold <directory>/.dpo-ray.lock (flock) for the duration; a second holder is refused at once.

    The kernel drops the lock when the process dies, so a crashed run never leaves a stale lock.
    """
    import fcntl
    import time

    directory.mkdir(parents=True, exist_ok=True)
    f = open(directory / ".dpo-ray.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown process"
        f.close()
        raise LockedError(f"{directory} is in use by another dpo-ray run ({holder}); this one exits and changes nothing") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


class DataError(UserError, ValueError):
    """Input data that cannot be used (missing file, too many bad rows)."""


def fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")


def resolve_data_files(specs: list[str]) -> list[Path]:
    """Data files from paths, directories (their .jsonl, .json, .parquet, .jsonl.gz, .json.gz files) and globs;
    demo:pairs is the bundled set."""
    files: list[Path] = []
    for spec in specs:
        if spec == "demo:pairs":
            from dpo_ray.demo import DEMO_DATA

            files.append(DEMO_DATA)
        elif any(c in spec for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
            if not found:
                raise DataError(f"data: no file matches {spec}")
            files += found
        elif Path(spec).expanduser().is_dir():
            found = sorted(p for p in Path(spec).expanduser().iterdir() if p.is_file() and p.name.lower().endswith(DATA_SUFFIXES))
            if not found:
                raise DataError(f"data: directory {spec} has no data files ({', '.join('*' + s for s in DATA_SUFFIXES)})")
            files += found
        elif Path(spec).expanduser().is_file():
            files.append(Path(spec).expanduser())
        else:
            raise DataError(f"data file {spec} not found (give a .jsonl, .json or .parquet file, a directory of them, or a glob)")
    return [f.resolve() for f in files]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


ATTEMPT = "attempt-"  # prefix of the per-attempt directories on object stores


def completed(loc: Location | Path) -> Location | None:
    """The directory holding the data of a complete `loc` (itself, or the attempt its marker names); None if not
    complete, or if a file its marker vouches for is missing or damaged (reported once, as one line naming the file)."""
    data, problem = check(loc if isinstance(loc, Location) else local(loc))
    if problem:
        if problem not in _reported:
            _reported.add(problem)
            log.warning("cache: %s; that part of the cache is recomputed", problem)
        return None
    return data


def check(loc: Location) -> tuple[Location | None, str | None]:
    """(the directory holding loc's data, None) when loc is complete; (None, what is wrong) when a file its marker
    vouches for is missing or damaged; (None, None) without a marker. Silent: `completed` reports."""
    try:
        first, _, rest = (loc / DONE).read_text().partition("\n")
    except FileNotFoundError:
        return None, None
    first = first.strip()
    data = loc / first if first.startswith(ATTEMPT) and "/" not in first else loc
    problem = damage(data, json.loads(rest)["files"]) if rest.strip() else None
    return (None, problem) if problem else (data, None)


_reported: set[str] = set()  # problems already reported by this process (completed() is asked more than once)


def manifest(d: Location) -> dict:
    """{relative name: {"size": bytes, "rows": Parquet rows}} of every file under d (the marker's list of what it vouches for)."""
    import pyarrow.parquet as pq

    out = {}
    for name, info in sorted(_files(d).items()):
        out[name] = {"size": info.size}
        if name.endswith(".parquet"):
            out[name]["rows"] = pq.ParquetFile(info.path, filesystem=d.fs).metadata.num_rows
    return out


def _files(d: Location) -> dict:
    """{name relative to d: FileInfo} of every file under d, from one recursive listing."""
    infos = d.fs.get_file_info(pafs.FileSelector(d.path, recursive=True, allow_not_found=True))
    return {i.path[len(d.path.rstrip("/")) + 1:]: i for i in infos if i.type == pafs.FileType.File}


def damage(d: Location, files: dict) -> str | None:
    """What is wrong with d's files against a manifest (the first problem, naming the file), or None."""
    sizes = {name: info.size for name, info in _files(d).items()}
    for name, entry in files.items():
        if name not in sizes:
            return f"{d / name} is missing"
        if sizes[name] != entry["size"]:
            return f"{d / name} is damaged ({sizes[name]} bytes, the cache wrote {entry['size']})"
    return None


def marker_text(first: str, d: Location) -> str:
    return f"{first}\n{json.dumps({'files': manifest(d)}, sort_keys=True)}\n"


def is_complete(path: Location | Path) -> bool:
    return completed(path) is not None


@contextmanager
def complete_dir(final: Location):
    """Yield a directory to fill; when the block ends without an error, `final` is complete.

    Local: `atomic_dir` (filled aside, renamed into place). Object stores: a fresh `final/attempt-<id>/`, then the
    marker naming it. Whatever an interrupted attempt left is never read (no marker names it) and is replaced by
    the next attempt; its files are not deleted here, since they may be another run's attempt still being written.
    """
    if final.is_local:
        with atomic_dir(Path(final.path)) as tmp:
            yield local(tmp)
        return
    attempt = final / f"{ATTEMPT}{uuid.uuid4().hex[:12]}"
    attempt.mkdir()
    yield attempt
    if completed(final) is not None:  # another run finished first: its whole attempt is the result, ours is named by no marker
        log.info("cache: %s was completed by another run meanwhile; this run's copy is dropped", final)
        attempt.remove()
        return
    (final / DONE).write_text(marker_text(attempt.name, attempt))  # both check at once: both write, the last marker wins


@contextmanager
def atomic_dir(final: Path):
    """Yield a temporary sibling directory; on success mark it complete and rename it to `final`.

    A crash leaves only a `.tmp-*` directory, which no reader mistakes for a finished artifact. Another writer of
    the same `final` that finishes first is a cache hit, never an error (`install`).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        (tmp / DONE).write_text(marker_text("ok", local(tmp)))
        install(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def install(tmp: Path, final: Path, tries: int = 5, window=None) -> None:
    """Rename the complete directory `tmp` to `final`. A complete `final` that is there first (another run won the
    race: before our look, or between it and the rename, which then fails with ENOTEMPTY/EEXIST) is the result: ours
    is dropped. An incomplete one is cleared first (`clear_incomplete`). `window()`, if given, runs between the look
    and the rename (tests let another writer finish there).
    """
    for _ in range(tries):
        if is_complete(final):
            shutil.rmtree(tmp)
            return
        if window:
            window()
        try:
            os.replace(tmp, final)
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if check(local(final))[0] is None:  # not another writer's finished copy
            clear_incomplete(final)
    raise LockedError(f"cache: {final} keeps changing under other writers ({tries} tries to put this run's copy in place); "
                      f"run again once they have finished")


def clear_incomplete(final: Path) -> None:
    """Remove `final` unless it is complete: renamed aside, then deleted. Under a lock beside it (.tmp-<name>.clearing,
    left in place), so that of writers clearing at once none takes away the copy another has put in place meanwhile:
    a complete directory, which another run may be reading, is never moved or deleted. Without the lock a writer's
    rename only succeeds onto an absent `final`, which only a clearer leaves, under the lock."""
    import fcntl

    with open(final.parent / f".tmp-{final.name}.clearing", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not final.exists() or check(local(final))[0] is not None:
            return
        aside = final.parent / f".tmp-{final.name}-old-{uuid.uuid4().hex[:8]}"
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)


def write_json_atomic(path: Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)


def keyed_state(path: Path, key: str, refuse) -> dict:
    """The state file of a driver that continues where it stopped (<output_dir>/sweep.json, iterate.json): read, its
    `key` (the config's fingerprint) checked against this one's (`refuse()`: the exception when another config made
    it), written back with the key. Returns the state."""
    state = json.loads(path.read_text()) if path.exists() else {}
    if state and state.get("key") != key:
        raise refuse()
    state["key"] = key
    write_json_atomic(path, state)
    return state

