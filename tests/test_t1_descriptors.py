"""The daemon's cache of stored descriptors (kexecfs.core.descriptors): bounded, and never
closing a descriptor while someone uses it."""

from __future__ import annotations

import os
import threading

from kexecfs.core.descriptors import DescriptorCache, warmed
from kexecfs.core.instance import PreservedFile
from kexecfs.core.kinds import KINDS


class Store:
    """Stored memfds, each fetched as a new descriptor, as a keeper hands them out."""

    def __init__(self, count: int) -> None:
        self.fds = {f"f{i}": os.memfd_create(f"stored-{i}") for i in range(count)}
        for i, fd in enumerate(self.fds.values()):
            os.write(fd, str(i).encode())
        self.handed_out = 0

    def fetch(self, name: str) -> int:
        self.handed_out += 1
        return os.dup(self.fds[name])

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


def open_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_cache_holds_at_most_its_size() -> None:
    store = Store(200)
    cache = DescriptorCache(store, size=16)
    before = open_count()
    try:
        for round_ in range(2):
            for i in range(200):
                with cache.use(f"f{i}") as fd:
                    assert os.pread(fd, 8, 0) == str(i).encode()
                assert len(cache) <= 16
        assert open_count() - before <= 16
        assert store.handed_out == 400, "200 names through 16 places: each fetched again in round two"
        with cache.use("f199") as fd:
            pass
        assert store.handed_out == 400, "the last one used is still there"
    finally:
        cache.clear()
        store.close()
    assert open_count() == before - 200


def test_a_pinned_descriptor_outlives_evictions_by_others() -> None:
    store = Store(40)
    cache = DescriptorCache(store, size=2)
    try:
        with cache.use("f0") as held:
            for i in range(1, 40):
                with cache.use(f"f{i}"):
                    pass
            assert os.pread(held, 8, 0) == b"0", "evicted while in use"
        assert len(cache) <= 2
    finally:
        cache.clear()
        store.close()


class FlakyStore(Store):
    """A store whose first fetch of each name fails (a keeper that died mid-answer)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.failed: set[str] = set()

    def fetch(self, name: str) -> int:
        if name not in self.failed:
            self.failed.add(name)
            raise ConnectionResetError("keeper hung up")
        return super().fetch(name)


def test_a_fetch_that_fails_leaves_its_name_unpinned() -> None:
    store = FlakyStore(20)
    cache = DescriptorCache(store, size=4)
    try:
        try:
            with cache.use("f0"):
                raise AssertionError("the fetch should have failed")
        except ConnectionResetError:
            pass
        with cache.use("f0") as fd:
            assert os.pread(fd, 8, 0) == b"0"
        for i in range(1, 20):
            store.failed.add(f"f{i}")
            with cache.use(f"f{i}"):
                pass
        assert "f0" not in cache, "a pin left by the failed fetch would keep it forever"
    finally:
        cache.clear()
        store.close()


def test_threads_share_one_copy_and_the_bound() -> None:
    store = Store(50)
    cache = DescriptorCache(store, size=8)
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for n in range(500):
                i = (n * 7 + offset) % 50
                with cache.use(f"f{i}") as fd:
                    assert os.pread(fd, 8, 0) == str(i).encode()
        except BaseException as exc:
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        assert not errors, errors
        assert len(cache) <= 8
    finally:
        cache.clear()
        store.close()


def test_a_preserved_file_let_go_by_the_daemon_is_fetched_while_used() -> None:
    store = Store(1)
    cache = DescriptorCache(store, size=4)
    own = os.dup(store.fds["f0"])
    pf = PreservedFile(0, KINDS["memfd"], own, {"size": 1, "flags": os.O_RDWR})
    try:
        pf.hand_over("f0", cache)
        assert pf.fd == -1 and pf.held and pf.inode is not None
        cache.clear()  # the daemon's own copy goes: the next use fetches one
        assert pf.size == 1 and store.handed_out == 1
        reopened = pf.reopen(os.O_RDONLY)
        assert os.pread(reopened, 8, 0) == b"0"
        os.close(reopened)
    finally:
        cache.clear()
        store.close()


def test_a_handed_over_descriptor_is_the_first_cached_copy_and_still_bounded() -> None:
    store = Store(30)
    cache = DescriptorCache(store, size=4)
    before = open_count()
    try:
        files = []
        for i in range(30):
            pf = PreservedFile(i, KINDS["memfd"], os.dup(store.fds[f"f{i}"]), {"size": 1, "flags": os.O_RDWR})
            pf.hand_over(f"f{i}", cache)
            files.append(pf)
        assert len(cache) == 4 and open_count() - before == 4
        assert files[-1].size == len(b"29") and store.handed_out == 0, "the last handed over needs no fetch"
        assert files[0].size == 1 and store.handed_out == 1
    finally:
        cache.clear()
        store.close()


class BatchStore(Store):
    """A store that also answers many names in one round trip (as a keeper's GET)."""

    def __init__(self, count: int) -> None:
        super().__init__(count)
        self.round_trips = 0

    def fetch_many(self, names: list[str]) -> dict[str, int]:
        self.round_trips += 1
        return {name: os.dup(self.fds[name]) for name in names}


def test_a_walk_over_every_file_fetches_in_batches_within_the_bound() -> None:
    store = BatchStore(100)
    cache = DescriptorCache(store, size=16)
    before = open_count()
    files = []
    try:
        for i in range(100):
            pf = PreservedFile(i, KINDS["memfd"], -1, {"size": 0, "flags": os.O_RDWR})
            pf.stored, pf.cache = f"f{i}", cache
            files.append(pf)
        sizes = [pf.size for pf in warmed(files)]
        assert sizes == [len(str(i)) for i in range(100)]
        assert store.handed_out == 0 and store.round_trips == 13, "one round trip per 8 files (half the cache)"
        assert open_count() - before <= 16
    finally:
        cache.clear()
        store.close()
