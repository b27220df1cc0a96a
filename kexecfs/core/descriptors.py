"""The daemon's descriptors of stored preserved files: a few at a time, fetched on demand.

A preserved file's descriptor lives in the descriptor store (keepers, see
``kexecfs.fs.fdstore``), not in the daemon: one process may hold no more descriptors
than its RLIMIT_NOFILE (20,000 here, and only CAP_SYS_RESOURCE raises the hard limit),
and a machine may preserve many more files than that. The daemon needs a file's
descriptor only while it works on it (preserve's duplicate check, prepare and freeze
reading it, a restore's reopen, ``fd_preserve``'s sizes), so it asks the store for a copy
then and keeps the copies it used last in a bounded cache.

A descriptor is used inside ``with cache.use(name) as fd``: the entry is pinned until
the block ends, so that a fetch in another thread (prepare's worker while the FUSE
thread lists sizes) can never close it under its user. Eviction closes the least
recently used unpinned entry; only pinned entries (one per thread at work) may take
the cache past its bound.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol, TypeVar

T = TypeVar("T")

#: Copies the daemon keeps at most (besides pinned ones): small against any descriptor limit.
DEFAULT_SIZE = 256


def warmed(items: Iterable[T], file: Callable[[T], Any] = lambda x: x) -> Iterator[T]:
    """``items`` in order, the stored descriptors of each batch's files (``file(item)``, a
    PreservedFile) prefetched first: for code that uses the descriptor of every file in turn."""
    batch: list[T] = []
    room = 1
    for item in items:
        if not batch:
            cache = file(item).cache
            room = cache.size // 2 if cache is not None else 1
        batch.append(item)
        if len(batch) >= room:
            prefetch([file(i) for i in batch])
            yield from batch
            batch = []
    prefetch([file(i) for i in batch])
    yield from batch


def prefetch(files: list[Any]) -> None:
    """Fetch the stored descriptors of ``files`` (PreservedFile) that the cache lacks, in one go."""
    stored = [pf for pf in files if pf.fd < 0 and pf.stored is not None and pf.cache is not None]
    if stored:
        cache = stored[0].cache
        cache.prefetch(pf.stored for pf in stored if pf.cache is cache)


class _Use:
    """One use of a cached descriptor (:meth:`DescriptorCache.use`). A class rather than a
    generator context manager: a walk over every file (prepare, freeze) takes it once per
    file, and the generator's frames cost more than the lookup itself."""

    __slots__ = ("cache", "name")

    def __init__(self, cache: DescriptorCache, name: str) -> None:
        self.cache, self.name = cache, name

    def __enter__(self) -> int:
        fd = self.cache._pin(self.name)
        if fd is None:
            try:
                fd = self.cache._fetch(self.name)
            except BaseException:
                self.cache._unpin(self.name)
                raise
        return fd

    def __exit__(self, *exc: object) -> None:
        self.cache._unpin(self.name)


class Fetching(Protocol):
    def fetch(self, name: str) -> int:
        """A new descriptor (the caller's to close) of what is stored under ``name``; OSError if none."""
        ...


class FetchingMany(Fetching, Protocol):
    def fetch_many(self, names: list[str]) -> dict[str, int]:
        """New descriptors of those of ``names`` the store holds, in as few round trips as it can."""
        ...


class DescriptorCache:
    """Bounded LRU of descriptors fetched from a store, each pinned while in use."""

    def __init__(self, source: Fetching, size: int = DEFAULT_SIZE) -> None:
        self.source = source
        self.size = max(1, size)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._pins: dict[str, int] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # what the store was asked for (for tests and metrics)

    def __len__(self) -> int:
        return len(self._fds)

    def __contains__(self, name: str) -> bool:
        """Whether a copy of ``name`` is at hand (no round trip to the store to use it)."""
        return name in self._fds

    def use(self, name: str) -> _Use:
        """``with cache.use(name) as fd``: ``name``'s descriptor, fetched if need be, and
        pinned until the block ends."""
        return _Use(self, name)

    def _pin(self, name: str) -> int | None:
        with self._lock:
            fd = self._fds.get(name)
            if fd is not None:
                self._fds.move_to_end(name)
            self._pins[name] = self._pins.get(name, 0) + 1
            return fd

    def _unpin(self, name: str) -> None:
        with self._lock:
            self._pins[name] -= 1
            if not self._pins[name]:
                del self._pins[name]
            self._evict()

    def _fetch(self, name: str) -> int:
        fd = self.source.fetch(name)  # outside the lock: a round trip to a keeper
        with self._lock:
            self.fetches += 1
            other = self._fds.get(name)
            if other is not None:  # another thread fetched it meanwhile: one copy is enough
                os.close(fd)
                return other
            self._fds[name] = fd
            return fd

    def _evict(self) -> None:
        while len(self._fds) > self.size:
            # The oldest unpinned entry: nearly always the first (pins are one per thread at work).
            victim = next((name for name in self._fds if name not in self._pins), None)
            if victim is None:
                return
            os.close(self._fds.pop(victim))

    def prefetch(self, names: Iterable[str]) -> None:
        """Fetch the missing ones of ``names`` in one go (a keeper answers up to 250 names a
        message): what walks over every file (prepare, freeze, status, a listing) asks for
        a batch of at most half the cache first, instead of a round trip per file."""
        fetch_many = getattr(self.source, "fetch_many", None)
        if fetch_many is None:
            return
        with self._lock:
            missing = [n for n in dict.fromkeys(names) if n not in self._fds][:max(1, self.size // 2)]
        if not missing:
            return
        got = fetch_many(missing)
        with self._lock:
            self.fetches += len(got)
            for name, fd in got.items():
                if name in self._fds:
                    os.close(fd)
                else:
                    self._fds[name] = fd
            self._evict()

    def adopt(self, name: str, fd: int) -> None:
        """``fd`` (the daemon's own descriptor of what the store now holds as ``name``) is
        the first cached copy: a file just preserved or restored is often used again at
        once (its log line, a listing), and needs no round trip to the store for that."""
        with self._lock:
            if name in self._fds:
                os.close(fd)  # a twin's: one copy of an open file is enough
                return
            self._fds[name] = fd
            self._evict()

    def forget(self, name: str) -> None:
        """The store let go of ``name``: the copy goes too, now or, if in use, at a later
        eviction (names are never given twice, so a stale copy is never served)."""
        with self._lock:
            if name in self._pins:
                return
            fd = self._fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def clear(self) -> None:
        with self._lock:
            for name in [n for n in self._fds if n not in self._pins]:
                os.close(self._fds.pop(name))
