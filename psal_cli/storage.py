"""Images in object storage: URLs (s3://, gs://, az://, ...) read and written through fsspec.

`location(spec)` turns what the user typed into a `pathlib.Path` (a local path, or a
file:// URL) or a `Remote`, which has the few `Path` operations batches use (name, parent,
`/`, exists, listing), so batch planning treats both alike. fsspec is an optional extra,
imported only when a URL is used: plain local runs never load it.

A Remote is written as local files are, atomically: the bytes go to a hidden temporary
key beside the output, which is then moved to the output's key, so an interrupted run or
a store that goes away mid-write never leaves a partial object under the output's name.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any

EXTRA = 'pip install "psal-cli[s3]"'
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class StorageError(OSError):
    """An object that cannot be read or written; the message names it and the problem."""


class Unreachable(StorageError):
    """The store itself cannot be reached (network, server down): no further object can be."""


def is_url(spec: str) -> bool:
    return bool(_URL.match(spec))


def location(spec: str | Path | Remote) -> Path | Remote:
    """A local path for a path or file:// URL; a Remote for any other URL."""
    if not isinstance(spec, str):
        return spec
    match = _URL.match(spec)
    if not match:
        return Path(spec)
    if match.group(1).lower() == "file":
        return Path(spec[len("file://"):] or "/")
    return Remote(spec)


class Remote:
    """An object (or a folder-like prefix) in an fsspec file system, named by its URL."""

    def __init__(self, url: str, kind: str | None = None) -> None:
        protocol, _, key = url.partition("://")
        self.protocol = protocol.lower()
        self.key = PurePosixPath(key)
        self._kind = kind  # "file" or "directory" when a listing said so: no request to ask

    def __str__(self) -> str:
        return f"{self.protocol}://{self.key}"

    def __repr__(self) -> str:
        return f"Remote({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Remote) and str(self) == str(other)

    def __lt__(self, other: Remote) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def _at(self, key: str | PurePosixPath, kind: str | None = None) -> Remote:
        return Remote(f"{self.protocol}://{PurePosixPath(key)}", kind)

    # -- the pure part of Path's interface --

    def __truediv__(self, other: str | PurePosixPath) -> Remote:
        return self._at(self.key / str(other))

    @property
    def name(self) -> str:
        return self.key.name

    @property
    def stem(self) -> str:
        return self.key.stem

    @property
    def suffix(self) -> str:
        return self.key.suffix

    @property
    def parts(self) -> tuple[str, ...]:
        return self.key.parts

    @property
    def bucket(self) -> Remote:
        """The URL's first component: the bucket (S3, GCS) or container (Azure)."""
        return self._at(self.key.parts[0]) if self.key.parts else self

    @property
    def parent(self) -> Remote:
        return self._at(self.key.parent)

    def with_suffix(self, suffix: str) -> Remote:
        return self._at(self.key.with_suffix(suffix))

    def relative_to(self, other: Remote) -> PurePosixPath:
        return self.key.relative_to(other.key)

    def resolve(self) -> Remote:
        return self

    # -- requests to the store --

    @property
    def fs(self) -> Any:
        """The fsspec file system (fsspec keeps one instance per protocol and options)."""
        from psal_cli.batch import UsageError

        try:
            import fsspec
        except ImportError:
            raise UsageError(f"{self}: URLs need fsspec: {EXTRA}") from None
        try:
            return fsspec.filesystem(self.protocol)
        except ImportError as e:  # e.g. s3fs for s3://, gcsfs for gs://
            if self.protocol in ("s3", "s3a"):
                raise UsageError(f"{self}: {self.protocol}:// needs s3fs: {EXTRA}") from None
            raise UsageError(f"{self}: {self.protocol}:// needs its fsspec back-end ({_first_line(e)})") from None
        except ValueError:
            raise UsageError(f"{self}: unknown storage protocol {self.protocol}://") from None

    @property
    def path(self) -> str:
        """The name the file system uses (the URL without its protocol)."""
        return self.fs._strip_protocol(str(self))

    def _call(self, what: str, fn: Any, *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except OSError as e:  # the store answered: this object's problem
            raise StorageError(f"{self}: cannot {what} ({_first_line(e)})") from None
        except Exception as e:  # noqa: BLE001 - transports raise their own (botocore, aiohttp...)
            raise Unreachable(f"{self}: cannot {what}: storage unreachable ({_first_line(e)})") from None

    def exists(self) -> bool:
        return self._kind is not None or self._call("look up", self.fs.exists, self.path)

    def is_dir(self) -> bool:
        if self._kind is not None:
            return self._kind == "directory"
        return self._call("look up", self.fs.isdir, self.path)

    def is_file(self) -> bool:
        if self._kind is not None:
            return self._kind == "file"
        return self._call("look up", self.fs.isfile, self.path)

    def iterdir(self) -> Iterator[Remote]:
        listing = self._call("list", self.fs.ls, self.path, detail=True)
        return (self._listed(info) for info in listing)

    def rglob(self, pattern: str) -> Iterator[Remote]:
        """Every object below this prefix (`pattern` must be "*", as batches use it)."""
        assert pattern == "*", pattern
        listing = self._call("list", self.fs.find, self.path, detail=True)
        return (self._listed(info) for info in listing.values())

    def glob(self) -> list[Remote]:
        """The objects this URL matches as a glob pattern."""
        listing = self._call("list", self.fs.glob, self.path, detail=True)
        return [self._listed(info) for info in listing.values()]

    def _listed(self, info: dict[str, Any]) -> Remote:
        name = self.fs.unstrip_protocol(info["name"])
        return Remote(name, "directory" if info.get("type") == "directory" else "file")

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: an object's key makes its prefix."""

    def check_writable(self) -> None:
        """Fail before any work if the bucket (the URL's first component) does not exist."""
        from psal_cli.batch import UsageError

        if not self.bucket.exists():
            raise UsageError(f"cannot write in {self.bucket}: no such bucket")

    def read_bytes(self) -> bytes:
        return self._call("read", self.fs.cat_file, self.path)

    @contextmanager
    def atomic_write(self, *, overwrite: bool = False) -> Iterator[io.BytesIO]:
        """Collect the bytes, put them under a hidden temporary key, then move them to this
        key: the output's name only ever holds a complete object. Without `overwrite` an
        existing object is refused (checked just before the move)."""
        buffer = io.BytesIO()
        yield buffer
        tmp = self.parent / f".{self.name}.{uuid.uuid4().hex[:12]}.psal-tmp"
        if not overwrite and self._call("look up", self.fs.exists, self.path):
            raise StorageError(f"{self}: already exists")
        try:
            self._call("write", self.fs.pipe_file, tmp.path, buffer.getvalue())
            self._call("write", self.fs.mv, tmp.path, self.path)
        except Unreachable:
            raise  # the hidden temporary key may stay: nothing can remove it now
        except BaseException:
            try:
                tmp.fs.rm_file(tmp.path)
            except Exception:  # noqa: BLE001 - never written, or the store just went away
                pass
            raise


def existing(paths: Iterable[Remote]) -> set[Remote]:
    """Which of these objects exist, from one listing of their common prefix (not one
    request per object: what makes --skip-existing cheap on a bucket of millions)."""
    paths = list(paths)
    if not paths:
        return set()
    found: set[Remote] = set()
    for protocol in {p.protocol for p in paths}:
        same = [p for p in paths if p.protocol == protocol]
        common = PurePosixPath(*_common_parts([p.key.parent.parts for p in same]))
        root = Remote(f"{protocol}://{common}")
        try:
            found |= set(root.rglob("*"))
        except FileNotFoundError:
            pass
    return {p for p in paths if p in found}


def _common_parts(parts: list[tuple[str, ...]]) -> tuple[str, ...]:
    first = parts[0]
    n = 0
    while n < len(first) and all(len(p) > n and p[n] == first[n] for p in parts):
        n += 1
    return first[:n]


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
