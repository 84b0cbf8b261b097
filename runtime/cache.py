"""On-disk cache of compiled object code.

Codegen of a training step takes long enough that a rerun of the same script must not pay it
again. The compiler keys an entry by a hash of everything that determines the machine code
(optimized IR, host CPU, llvmlite version; see `make_key`), and this module stores the bytes.

Every entry is a header (magic, format version, payload length, sha256 of the payload)
followed by the payload. Machine code that is loaded and run is trusted completely, so a
damaged entry (truncated by a crash, flipped bits, another program's file) is detected
by the header, deleted, and reported as a miss: the caller rebuilds it. Entries are written
to a temporary file in the cache directory and renamed into place, which is atomic on POSIX,
so concurrent writers (threads or processes) never expose a partial entry;
the last rename wins, and every writer wrote the same bytes for the same key anyway.

A cache is an optimization: when its directory cannot be created or written, compilation
goes on without it after one warning; an entry that cannot be written is skipped, the others
are still cached.

Machine code loaded from here runs in this process, so whoever can write the directory or an
entry can run code here; the checksum guards against accidents, not attackers. The cache
therefore refuses (one warning per directory and reason, then compiling without it) a
directory owned by another user or writable by group or others, or reached through a
symbolic link another user owns, and reads an entry only if it is a regular file, owned by
the user, writable by no one else and not larger than `_MAX_ENTRY_BYTES` (a FIFO must not
block a compile, a link to /dev/zero must not be read). Every operation opens the directory,
checks the opened descriptor and works relative to it, so swapping the directory for another
after the check changes nothing. Directories the cache creates, missing parents included,
are mode 0700. POSIX only (descriptor-relative calls and user ids).
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import logging
import os
import re
import secrets
import stat
import struct
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
# Entries are kilobytes to megabytes; the bound is for a file that is not one of ours.
_MAX_ENTRY_BYTES = 256 << 20
# Never block (a FIFO), never follow a link (to /dev/zero, or to another user's file).
_ENTRY_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_TEMPORARY_OPEN_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFLNK: "a symbolic link",
               stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFSOCK: "a socket"}

# (directory, reason) pairs already warned about, so that each problem is reported once per
# process however many caches the compiler creates for it.
_warned: set[tuple[Path, str]] = set()
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
        """False once the directory could not be created or opened: the cache then stores
        nothing more. (A refused directory is checked again on every use.)"""
        return self._writable

    def path_for(self, key: str) -> Path:
        return self.directory / _entry_name(key)

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None on a miss (absent, unreadable, untrusted
        or damaged)."""
        name = _entry_name(key)
        directory = self._open_directory_to_read()
        if directory is None:
            self._count(misses=1)
            return None
        try:
            payload = self._load_entry(directory, name)
        finally:
            os.close(directory)
        self._count(hits=int(payload is not None), misses=int(payload is None))
        return payload

    def put(self, key: str, data: bytes) -> None:
        """Store `data` under `key`, atomically replacing any previous entry."""
        name = _entry_name(key)
        if not self._writable:
            return
        entry = _pack_entry(bytes(data))
        if len(entry) > _MAX_ENTRY_BYTES:
            self._warn_once("entry too large", f"graphc object cache: not storing {self.path_for(key)}: "
                            f"{len(entry)} bytes, more than the {_MAX_ENTRY_BYTES}-byte limit on what it reads back")
            return
        directory = self._open_directory_to_write()
        if directory is None:
            return
        try:
            _write_atomically(directory, name, entry)
        except OSError as error:
            # This entry only: a directory sitting at its path must not turn the cache off.
            self._warn_once(f"cannot write entry: {error.strerror}",
                            f"cannot write the graphc object cache entry {self.path_for(key)} ({error.strerror}); "
                            "that entry is not cached, others still are")
        finally:
            os.close(directory)

    def clear(self) -> None:
        """Delete every entry and any temporary file left by an interrupted writer."""
        try:
            directory = self._open_trusted_directory()
        except OSError:
            return
        if directory is None:
            return
        try:
            for name in os.listdir(directory):
                if name.endswith(_ENTRY_SUFFIX) or name.startswith(_TEMP_PREFIX):
                    try:
                        os.unlink(name, dir_fd=directory)
                    except OSError:  # already gone (a concurrent clear) or not ours to delete
                        pass
        finally:
            os.close(directory)

    def _open_directory_to_read(self) -> int | None:
        try:
            return self._open_trusted_directory()
        except (FileNotFoundError, NotADirectoryError):  # nothing cached yet
            return None
        except OSError as error:
            self._warn_once(f"cannot read: {error.strerror}",
                            f"cannot read the graphc object cache in {self.directory} ({error})")
            return None

    def _open_directory_to_write(self) -> int | None:
        try:
            _make_private_directories(self.directory)
            return self._open_trusted_directory()
        except OSError as error:
            self._writable = False
            self._warn_once("cannot write", f"cannot write the graphc object cache in {self.directory} "
                            f"({error}); compiled code will not be cached. "
                            "Set GRAPHC_CACHE_DIR to a writable directory.")
            return None

    def _open_trusted_directory(self) -> int | None:
        """A descriptor of the cache directory if only this user can write it, else None
        (after a warning). Raises OSError when it cannot be opened."""
        reason = _untrusted_link_reason(self.directory)
        if reason is None:
            # The opened descriptor is checked, not the path: whatever replaces the
            # directory after this check, reads and writes stay in the one checked.
            descriptor = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            reason = _writable_by_others_reason(os.fstat(descriptor))
            if reason is None:
                return descriptor
            os.close(descriptor)
        self._warn_once(reason, f"refusing the graphc object cache directory {self.directory}: {reason}, "
                        "and whoever can write there could run code in this process. Compiling without "
                        "the cache; make the directory yours with mode 0700, or set GRAPHC_CACHE_DIR.")
        return None

    def _load_entry(self, directory: int, name: str) -> bytes | None:
        """The payload of entry `name` in the open `directory`, or None."""
        read = self._read_trusted_entry(directory, name)
        if read is None:
            return None
        blob, identity = read
        payload = _unpack_entry(blob)
        if payload is None:
            _log.warning("graphc object cache: damaged entry %s deleted; it will be rebuilt", self.directory / name)
            _delete_if_unchanged(directory, name, identity)
            self._count(corrupt=1)
        return payload

    def _read_trusted_entry(self, directory: int, name: str) -> tuple[bytes, os.stat_result] | None:
        """The bytes of entry `name` and its identity, or None if it is absent or must not be read."""
        try:
            descriptor = os.open(name, _ENTRY_OPEN_FLAGS, dir_fd=directory)
        except FileNotFoundError:
            return None
        except OSError as error:
            self._skip_entry(name, "it is a symbolic link" if error.errno == errno.ELOOP else error.strerror)
            return None
        try:
            identity = os.fstat(descriptor)
            reason = _unreadable_entry_reason(identity)
            if reason is not None:
                self._skip_entry(name, reason)
                return None
            with open(descriptor, "rb", closefd=False) as stream:
                # No more than its size when opened: a file still growing is not ours.
                return stream.read(identity.st_size), identity
        except OSError as error:
            self._skip_entry(name, error.strerror)
            return None
        finally:
            os.close(descriptor)

    def _skip_entry(self, name: str, reason: str) -> None:
        self._warn_once(f"entry: {reason}", f"graphc object cache: ignoring entry {self.directory / name}: {reason}")

    def _count(self, hits: int = 0, misses: int = 0, corrupt: int = 0) -> None:
        with self._stats_lock:
            self.stats.hits += hits
            self.stats.misses += misses
            self.stats.corrupt += corrupt

    def _warn_once(self, reason: str, message: str) -> None:
        with _warned_lock:
            if (self.directory, reason) in _warned:
                return
            _warned.add((self.directory, reason))
        warnings.warn(message, RuntimeWarning, stacklevel=4)

    def __repr__(self) -> str:
        return f"ObjectCache({str(self.directory)!r}, {self.stats})"


def _entry_name(key: str) -> str:
    """The file name of `key`'s entry. A plain string: pathlib interns every part it parses,
    and each compile's key is new, so the interpreter's intern table would grow with them."""
    if not isinstance(key, str) or not _KEY_PATTERN.fullmatch(key):
        raise ValueError(f"cache key must be 1-128 characters of [0-9A-Za-z_-], got {key!r}")
    return key + _ENTRY_SUFFIX


def _make_private_directories(directory: Path) -> None:
    """Create `directory` and its missing parents, all mode 0700: Path.mkdir(parents=True)
    gives parents the umask's mode, and a parent others can write lets them swap the cache."""
    try:
        directory.mkdir(mode=0o700)
    except FileExistsError:  # a file there fails when opened as a directory
        pass
    except FileNotFoundError:
        if directory.parent == directory:
            raise
        _make_private_directories(directory.parent)
        directory.mkdir(mode=0o700, exist_ok=True)


def _untrusted_link_reason(directory: Path) -> str | None:
    """Why the cache directory path, if it is a symbolic link, is not to be trusted: whoever
    owns a link can point it elsewhere at any time. Raises OSError if the path is absent."""
    link = os.lstat(directory)
    if stat.S_ISLNK(link.st_mode) and link.st_uid not in (os.geteuid(), 0):
        return f"it is a symbolic link owned by uid {link.st_uid}, not by this user (uid {os.geteuid()})"
    return None


def _writable_by_others_reason(status: os.stat_result) -> str | None:
    """Why a file or directory with this status could have been written by another user, or None."""
    if status.st_uid != os.geteuid():
        return f"it is owned by uid {status.st_uid}, not by this user (uid {os.geteuid()})"
    mode = stat.S_IMODE(status.st_mode)
    if mode & stat.S_IWOTH:
        return f"it is world-writable (mode {mode:04o})"
    if mode & stat.S_IWGRP:
        return f"it is group-writable (mode {mode:04o})"
    return None


def _unreadable_entry_reason(status: os.stat_result) -> str | None:
    """Why an entry with this status must not be read, or None."""
    if not stat.S_ISREG(status.st_mode):
        kind = _FILE_KINDS.get(stat.S_IFMT(status.st_mode), "a special file")
        return f"it is {kind}, not a regular file"
    if status.st_size > _MAX_ENTRY_BYTES:
        return f"it is larger than the {_MAX_ENTRY_BYTES}-byte limit"
    return _writable_by_others_reason(status)


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


def _write_atomically(directory: int, name: str, entry: bytes) -> None:
    # The temporary file lives in the destination directory because a rename is atomic
    # only within one file system. No fsync: an entry torn by a power loss fails its
    # checksum and is rebuilt, which is cheaper than syncing every compile.
    temporary = _TEMP_PREFIX + secrets.token_hex(8)   # 64 random bits: no retry on a clash
    descriptor = os.open(temporary, _TEMPORARY_OPEN_FLAGS, 0o600, dir_fd=directory)
    try:
        with open(descriptor, "wb") as stream:
            stream.write(entry)
        os.replace(temporary, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        try:
            os.unlink(temporary, dir_fd=directory)
        except OSError:
            pass
        raise


def _delete_if_unchanged(directory: int, name: str, identity: os.stat_result) -> None:
    # Another process may have replaced the damaged entry with a good one since we read
    # it; deleting that would only cost a rebuild, but checking the file identity first
    # avoids it in the common case of parallel runs meeting the same damaged entry.
    try:
        current = os.stat(name, dir_fd=directory, follow_symlinks=False)
        if (current.st_ino, current.st_dev, current.st_mtime_ns) == (
            identity.st_ino, identity.st_dev, identity.st_mtime_ns
        ):
            os.unlink(name, dir_fd=directory)
    except OSError:
        pass
