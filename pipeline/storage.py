"""Where the caches live: a local directory or a `pyarrow.fs` URI (file://, s3://, gs://, ...), as one small type.

`open_location(cache_dir)` calls `FileSystem.from_uri` once per URI; every cache read and write then goes through
the filesystem it returned (`Location.fs`, with `Location.path` in that filesystem's terms), including Ray Data's
`read_parquet`/`write_parquet(..., filesystem=...)`. Models are not cached there: a model must be a local directory
to load (see `model_root`).
"""
from __future__ import annotations

import functools
import posixpath
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from dpo_ray.errors import UserError


class StorageError(UserError, ValueError):
    """cache_dir names a filesystem pyarrow cannot open."""


@dataclass(frozen=True)
class Location:
    """A file or directory in a pyarrow filesystem. `str()` is a plain path for local files, else scheme://path."""

    fs: pafs.FileSystem
    path: str
    scheme: str = ""  # "" on the local filesystem

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> "Location":
        return Location(self.fs, posixpath.dirname(self.path), self.scheme)

    def __truediv__(self, name) -> "Location":
        return Location(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    def __str__(self) -> str:
        return self.path if self.is_local else f"{self.scheme}://{self.path}"

    def _type(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def is_file(self) -> bool:
        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._type() == pafs.FileType.Directory

    def children(self) -> list["Location"]:
        """Direct entries (none when the directory does not exist)."""
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return [Location(self.fs, i.path, self.scheme) for i in infos]

    def mkdir(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def remove(self) -> None:
        """Delete this file or directory tree; nothing if absent."""
        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        self.parent.mkdir()
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))


def local(path: str | Path) -> Location:
    return Location(pafs.LocalFileSystem(), str(Path(path).expanduser().resolve()))


def open_location(spec: str | Path) -> Location:
    """A local path (made absolute) or a pyarrow.fs URI: file:///abs, s3://bucket/prefix?endpoint_override=..., gs://..."""
    spec = str(spec)
    return _open_uri(spec) if "://" in spec else local(spec)


@functools.lru_cache(maxsize=16)
def _open_uri(uri: str) -> Location:
    try:
        fs, path = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowException, ValueError, OSError) as e:
        raise StorageError(f"cache_dir {redact(uri)} cannot be opened ({str(e).splitlines()[0][:200]}); give a local path "
                           f"or a pyarrow.fs URI such as s3://bucket/prefix or gs://bucket/prefix") from None
    if isinstance(fs, pafs.LocalFileSystem):
        return local(path)
    return Location(fs, path.rstrip("/"), uri.split("://", 1)[0])


def redact(uri: str) -> str:
    """A URI without user:password@ (pyarrow accepts access keys there; they must not reach logs)."""
    scheme, sep, rest = uri.partition("://")
    head, at, tail = rest.partition("@")
    return f"{scheme}{sep}***@{tail}" if at and "/" not in head else uri


def model_root(cache_dir: str, output_dir: str) -> Path:
    """The local directory for models (the demo model, registry downloads): cache_dir when it is local, else
    output_dir, since a model must be a local directory to load (and on a cluster output_dir is the shared mount)."""
    loc = open_location(cache_dir)
    return Path(loc.path) if loc.is_local else Path(output_dir).expanduser().resolve()
