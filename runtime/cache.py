"""On-disk cache of compiled object code.

Codegen of a training step takes long enough that a rerun of the same script must not pay it
again. The compiler keys an entry by a hash of everything that determines the machine code
(optimized IR, host CPU, llvmlite version; see `make_key`), and this module stores the bytes.

Every entry is a header (magic, format version, payload length, sha256 of the payload)
followed by the payload. Machine code that is loaded and run is trusted completely, so a
damaged entry (truncated by a crash, flipped bits, another program's file) is detected
by the header, deleted, and reported as a miss: the caller rebuilds it. Entries are written
to a temporary file in the cache directory and renamed into place, which is atomic on POSIX
and Windows, so concurrent writers (threads or processes) never expose a partial entry;
the last rename wins, and every writer wrote the same bytes for the same key anyway.

A cache is an optimization: when its directory cannot be created or written, compilation
goes on without it after one warning per directory. The checksum guards against accidents,
not attackers: the directory must be writable only by the user (it is created mode 0700).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import struct
import tempfile
import threading
import warnings
from pathlib import Path

__all__ = ["ObjectCache", "CacheStats", "default_cache_directory", "make_key"]

_log = logging.getLogger(__name__)

_MAGIC = b"GRAPHCOB"
_FORMAT_VERSION = 1
# magic, format version, payload length, sha256(payload); little-endian, no padding.
_HEADER = struct.Struct("<8sIQ32s")
_ENTRY_SUFFIX = ".gcobj"
_TEMP_PREFIX = ".incoming-"
# Keys become file names: allow nothing that could climb out of the directory.
_KEY_PATTERN = re.compile(r"[0-9A-Za-z_-]{1,128}")

# Directories already warned about, so that each problem is reported once per process
# however many caches the compiler creates for it.
_warned_directories: set[Path] = set()
_warned_lock = threading.Lock()


def make_key(*parts: str) -> str:
    """sha256 hex digest identifying `parts` as a sequence.

    Each part is length-prefixed so that ("ab", "c") and ("a", "bc") get different keys.
    """
    digest = hashlib.sha256()
    for part in parts:
        if not isinstance(part, str):
            raise TypeError(f"cache key parts must be str, got {type(part).__name__}")
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def default_cache_directory() -> Path:
    """$GRAPHC_CACHE_DIR, else $XDG_CACHE_HOME/graphc, else ~/.cache/graphc."""
    explicit = os.environ.get("GRAPHC_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):  # the XDG spec says relative values are to be ignored
        return Path(xdg) / "graphc"
    return Path.home() / ".cache" / "graphc"


@dataclasses.dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0  # entries found damaged (each also counts as a miss)


class ObjectCache:
    """Maps string keys to bytes, persistently, in one directory."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else default_cache_directory()
        self.stats = CacheStats()
        self._stats_lock = threading.Lock()
        self._writable = True

    @property
    def enabled(self) -> bool:
        """False once writing failed: the cache then stores nothing more."""
        return self._writable

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
            raise ValueError(f"cache key must be 1-128 characters of [0-9A-Za-z_-], got {key!r}")
        return self.directory / (key + _ENTRY_SUFFIX)

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None on a miss (absent, unreadable or damaged)."""
        path = self.path_for(key)
        try:
            with open(path, "rb") as entry:
                identity = os.fstat(entry.fileno())
                blob = entry.read()
        except FileNotFoundError:
            self._count(misses=1)
            return None
        except OSError as error:
            self._warn_once(f"cannot read the graphc object cache entry {path} ({error})")
            self._count(misses=1)
            return None
        payload = _unpack_entry(blob)
        if payload is None:
            _log.warning("graphc object cache: damaged entry %s deleted; it will be rebuilt", path)
            _delete_if_unchanged(path, identity)
            self._count(misses=1, corrupt=1)
            return None
        self._count(hits=1)
        return payload

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically replacing any previous entry."""
        path = self.path_for(key)
        if not self._writable:
            return
        entry = _pack_entry(bytes(data))
        try:
            # Private to the user: whoever can write here can run code in our process.
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_atomically(path, entry)
        except OSError as error:
            self._writable = False
            self._warn_once(
                f"cannot write the graphc object cache in {self.directory} ({error}); "
                "compiled code will not be cached. Set GRAPHC_CACHE_DIR to a writable directory."
            )

    def clear(self) -> None:
        """Delete every entry and any temporary file left by an interrupted writer."""
        if not self.directory.is_dir():
            return
        for path in self.directory.iterdir():
            if path.name.endswith(_ENTRY_SUFFIX) or path.name.startswith(_TEMP_PREFIX):
                try:
                    path.unlink()
                except OSError:  # already gone (a concurrent clear) or not ours to delete
                    pass

    def _count(self, hits: int = 0, misses: int = 0, corrupt: int = 0) -> None:
        with self._stats_lock:
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.corrupt += corrupt

    def _warn_once(self, message: str) -> None:
        with _warned_lock:
            if self.directory in _warned_directories:
                return
            _warned_directories.add(self.directory)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def __repr__(self) -> str:
        return f"ObjectCache({str(self.directory)!r}, {self.stats})"


def _pack_entry(payload: bytes) -> bytes:
    header = _HEADER.pack(_MAGIC, _FORMAT_VERSION, len(payload), hashlib.sha256(payload).digest())
    return header + payload


def _unpack_entry(blob: bytes) -> bytes | None:
    """The payload of a stored entry, or None if anything about it is wrong."""
    if len(blob) < _HEADER.size:
        return None
    magic, version, length, digest = _HEADER.unpack_from(blob)
    payload = blob[_HEADER.size:]
    if magic != _MAGIC or version != _FORMAT_VERSION or length != len(payload):
        return None
    if hashlib.sha256(payload).digest() != digest:
        return None
    return payload


def _write_atomically(path: Path, entry: bytes) -> None:
    # The temporary file lives in the destination directory because a rename is atomic
    # only within one file system. No fsync: an entry torn by a power loss fails its
    # checksum and is rebuilt, which is cheaper than syncing every compile.
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(entry)
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _delete_if_unchanged(path: Path, identity: os.stat_result) -> None:
    # Another process may have replaced the damaged entry with a good one since we read
    # it; deleting that would only cost a rebuild, but checking the file identity first
    # avoids it in the common case of parallel runs meeting the same damaged entry.
    try:
        current = os.stat(path)
        if (current.st_ino, current.st_dev, current.st_mtime_ns) == (
            identity.st_ino, identity.st_dev, identity.st_mtime_ns
        ):
            os.unlink(path)
    except OSError:
        pass
