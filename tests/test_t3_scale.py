"""More preserved files than the daemon may hold descriptors (issue 16, "Scale").

The daemon runs with RLIMIT_NOFILE 512 (soft and hard, which only CAP_SYS_RESOURCE could
raise again; its keepers inherit it) and preserves 2,000 memfds: only if the keepers own
the descriptors and the daemon holds a bounded few at a time can it take them all, read
them all at prepare and freeze, recover them all at the kexec, and restore them. A kill -9
in the middle of preserving, one while prepared and one after the kexec must lose none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Daemon, keeper_holdings, needs_fuse, serving, stored_files, until
from kexecfs.fs.fdstore import KeeperStore

pytestmark = needs_fuse

LIMIT = 512
INSTANCES, FILES = 20, 100  # 2,000 files, four times the limit


def content(name: str, token: int) -> bytes:
    """Distinct bytes for each file (and sizes that differ), so no file can pass for another."""
    seed = hashlib.sha256(f"{name}/{token}".encode()).digest()
    return seed * (1 + token % 7)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serving(Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log", nofile=LIMIT)) as d:
        yield d


def preserve(mnt: Path, names: list[str]) -> None:
    for name in names:
        (mnt / name).mkdir()
        pfd = os.open(mnt / name / "fd_preserve", os.O_WRONLY)
        try:
            for token in range(FILES):
                fd = os.memfd_create(f"{name}-{token}", os.MFD_CLOEXEC)
                os.write(fd, content(name, token))
                os.write(pfd, f"{fd} {token}\n".encode())
                os.close(fd)  # the test holds none of them either
        finally:
            os.close(pfd)


def check_registrations(d: Daemon, names: list[str]) -> None:
    for name in names:
        lines = (d.mountpoint / name / "fd_preserve").read_text().splitlines()
        assert [int(line.split()[0]) for line in lines] == list(range(FILES)), name
        for line in lines:
            token, kind, size = line.split()[:3]
            assert kind == "memfd" and int(size) == len(content(name, int(token))), line


def check_bounds(d: Daemon, files: int) -> None:
    """The daemon stays under its limit; every file is in two keepers, each under its own."""
    assert d.descriptors() < LIMIT
    stored = stored_files(d.image_dir)
    assert len(stored) == files and set(stored.values()) == {2}, f"{len(stored)} files stored, not {files}"
    assert all(len(held) < LIMIT for held in keeper_holdings(d.image_dir).values())


def restore_sample(d: Daemon, names: list[str], step: int, first: int) -> int:
    """Open (restore) every ``step``-th file from ``first`` and compare its bytes; the count."""
    checked = 0
    for i in range(first, len(names) * FILES, step):
        name, token = names[i // FILES], i % FILES
        assert (d.mountpoint / name / "fds" / str(token)).read_bytes() == content(name, token), f"{name}/{token}"
        checked += 1
    return checked


def test_an_update_of_more_files_than_the_daemons_descriptor_limit(daemon: Daemon) -> None:
    d, mnt = daemon, daemon.mountpoint
    names = [f"svc{i:02d}" for i in range(INSTANCES)]
    preserve(mnt, names[:INSTANCES // 2])
    d.kill()  # in the middle of the preserves: half of them are registered
    d.start()
    check_registrations(d, names[:INSTANCES // 2])
    preserve(mnt, names[INSTANCES // 2:])
    check_registrations(d, names)
    check_bounds(d, INSTANCES * FILES)

    (mnt / "state").write_text("prepare")  # reads every file: each is fetched, then let go
    assert (mnt / "state").read_text() == "prepared\n"
    d.kill()  # the restarted daemon prepares again, reading every file once more
    d.start()
    assert (mnt / "state").read_text() == "prepared\n"
    check_bounds(d, INSTANCES * FILES)
    (mnt / "state").write_text("freeze")
    (mnt / "state").write_text("kexec")  # recovery makes 2,000 memfds: each goes to the keepers at once
    assert (mnt / "state").read_text() == "updated\n"
    check_bounds(d, INSTANCES * FILES)
    assert restore_sample(d, names, 7, 0) == 286

    d.kill()  # after the kexec: the restored files are the keepers' too
    d.start()
    assert (mnt / "state").read_text() == "updated\n"
    check_registrations(d, names)
    assert restore_sample(d, names, 7, 3) == 286
    assert d.descriptors() < LIMIT
    (mnt / "state").write_text("finish")
    assert (mnt / "state").read_text() == "normal\n"
    # Finish keeps the restored files only: 572 of them, still in the keepers.
    assert len(stored_files(d.image_dir)) == 572
    assert "LOST" not in d.log_text() and "EMFILE" not in d.log_text()


def test_a_release_of_many_files_is_one_message_per_shard_and_batch(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A simulated kexec lets go of every file of the old kernel at once. One REMOVE per
    file and keeper was 200,000 messages at 100,000 files, each sent by the daemon and read
    by a keeper on its own (an eighth of the kexec); now 250 names go in each."""
    store = KeeperStore(tmp_path, capacity=300)  # two shards of 300 files
    fds = [os.memfd_create(f"f{i}", os.MFD_CLOEXEC) for i in range(600)]
    try:
        store.keep_many([(f"f{i}", fd) for i, fd in enumerate(fds)])
    finally:
        for fd in fds:
            os.close(fd)
    try:
        until(lambda: sum(map(len, keeper_holdings(tmp_path).values())) == 1200, "every file in two keepers")
        sent: list[str] = []
        send = store._send
        monkeypatch.setattr(store, "_send", lambda member, text, fds=None: (sent.append(text.split()[0]),
                                                                           send(member, text, fds)))
        store.release_many([f"f{i}" for i in range(600)])
        assert sent.count("REMOVE") == 2 * 2 * 2, "2 shards, 2 keepers each, 300 names in 2 messages"
        until(lambda: not any(keeper_holdings(tmp_path).values()), "the keepers let go of every file", timeout=10)
    finally:
        store.end()
