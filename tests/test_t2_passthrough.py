"""FUSE passthrough through kexecfs._fusehook against a real mount: a tiny pyfuse3 file
system (DAEMON below) runs in a child process and holds a 64 MiB memfd of random data.

Its files: ``f`` registers passthrough to the memfd at every open; ``dir_backed`` and
``pipe_backed`` register descriptors the kernel cannot use as backing files (a directory,
a pipe), so their opens fall back to direct_io and the daemon serves them from the same
memfd; ``state`` reads back what the daemon saw (JSON, snapshot at open); ``ctl`` takes
``poke <offset> <hex>`` (the daemon writes into its memfd). The daemon counts the
read/write requests that reach it, per file.

The tests compare with the memfd itself, opened as /proc/<daemon>/fd/<memfd> (root).
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import NOBODY, TIMEOUT, MiniMount, digest, in_fresh_interpreter, mini_daemon

SIZE = 64 << 20
CHUNK = 1 << 20

DAEMON = textwrap.dedent(
    r"""
    import itertools, json, os, sys

    from minifs import MiniOps, serve  # loads the C extension before pyfuse3
    import kexecfs.fs.fusehook as fusehook
    import pyfuse3

    SIZE = int(sys.argv[2])
    memfd = os.memfd_create("passthrough-test")
    data = os.urandom(SIZE)
    done = 0
    while done < SIZE:
        done += os.pwrite(memfd, data[done:], done)
    del data
    dirfd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)  # EISDIR as a backing file
    pipe_r, pipe_w = os.pipe()  # EINVAL as a backing file

    FILES = {b"f": 2, b"state": 3, b"ctl": 4, b"dir_backed": 5, b"pipe_backed": 6}
    NAMES = {ino: name.decode() for name, ino in FILES.items()}
    BACKING = {2: memfd, 5: dirfd, 6: pipe_r}
    reads = {name: 0 for name in NAMES.values()}
    writes = {name: 0 for name in NAMES.values()}
    handles = {}  # fh: (ino, state snapshot or None)
    next_fh = itertools.count(100)


    def snapshot():
        return json.dumps(dict(
            pid=os.getpid(), memfd=memfd, available=fusehook.passthrough_available(),
            stats=fusehook.passthrough_stats(), reads=reads, writes=writes,
            open_handles=len(handles),
        )).encode()


    class Ops(MiniOps):
        def size(self, ino):
            return os.fstat(memfd).st_size if ino in BACKING else 0

        async def opendir(self, ino, ctx):
            # A registration for the fh of a directory: opendir replies also go
            # through fuse_reply_open(), and must not take it (nor become passthrough).
            fusehook.passthrough_open(ino, memfd)
            return ino

        async def open(self, ino, flags, ctx):
            fh = next(next_fh)
            handles[fh] = (ino, snapshot() if ino == 3 else None)
            if ino in BACKING:
                fusehook.passthrough_open(fh, BACKING[ino])
            # What the kexecfs daemon returns; ignored for a passthrough reply (and
            # keep_cache, pyfuse3's default, would make the kernel refuse it).
            return pyfuse3.FileInfo(fh=fh, direct_io=True)

        async def read(self, fh, off, size):
            ino, snap = handles[fh]
            reads[NAMES[ino]] += 1
            if snap is not None:
                return snap[off:off + size]
            return os.pread(memfd, size, off) if ino in BACKING else b""

        async def write(self, fh, off, buf):
            ino, _ = handles[fh]
            writes[NAMES[ino]] += 1
            if ino in BACKING:
                return os.pwrite(memfd, buf, off)
            if ino == 4:
                cmd, offset, hexdata = buf.decode().split()
                assert cmd == "poke", cmd
                os.pwrite(memfd, bytes.fromhex(hexdata), int(offset))
            return len(buf)

        async def release(self, fh):
            del handles[fh]


    serve(Ops(FILES), sys.argv[1], "passthroughtest")
    """
)


def _kernel_version() -> tuple[int, int]:
    major, minor = os.uname().release.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


KERNEL_HAS_PASSTHROUGH = _kernel_version() >= (6, 9)
NO_PASSTHROUGH = (
    f"Linux {os.uname().release} has no FUSE passthrough (it needs 6.9 or later)"
)


class Mount(MiniMount):
    def __init__(self, path: Path, proc: subprocess.Popen[str], stderr: Path) -> None:
        super().__init__(path, proc, stderr)
        self.f = path / "f"

    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state").read_bytes())

    def poke(self, offset: int, data: bytes) -> None:
        """Have the daemon write data into its memfd."""
        fd = os.open(self.path / "ctl", os.O_WRONLY)
        try:
            os.write(fd, f"poke {offset} {data.hex()}".encode())
        finally:
            os.close(fd)

    def memfd_path(self) -> str:
        state = self.state()
        return f"/proc/{state['pid']}/fd/{state['memfd']}"

    def memfd_read(self, offset: int = 0, size: int = SIZE) -> bytes:
        """The daemon's memfd itself, not through FUSE."""
        fd = os.open(self.memfd_path(), os.O_RDONLY)
        try:
            return read_all(fd, size, offset)
        finally:
            os.close(fd)


def read_all(fd: int, size: int, offset: int = 0) -> bytes:
    out = bytearray()
    while len(out) < size:
        chunk = os.pread(fd, min(CHUNK, size - len(out)), offset + len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    if os.geteuid() != 0:
        pytest.skip("FUSE passthrough needs CAP_SYS_ADMIN in the daemon: run as root")
    base = tmp_path_factory.mktemp("passthrough")
    # Outside pytest's 0700 directories, so that the uid-65534 reader can reach it.
    mnt = Path(tempfile.mkdtemp(prefix="kexecfs-passthrough-"))
    mnt.chmod(0o755)
    try:
        with mini_daemon(DAEMON, base, mnt, SIZE) as m:
            yield Mount(m.path, m.proc, m.stderr_path)
    finally:
        mnt.rmdir()


@pytest.fixture
def passthrough(mount: Mount) -> Mount:
    """The mount, for tests of passthrough itself: skipped where the kernel lacks it."""
    if not KERNEL_HAS_PASSTHROUGH:
        pytest.skip(NO_PASSTHROUGH)
    if not mount.state()["available"]:
        # Have the daemon log why: the registered open falls back and says so.
        os.close(os.open(mount.f, os.O_RDONLY))
        if "the kernel did not offer FUSE_PASSTHROUGH" in mount.stderr():
            pytest.skip(
                f"Linux {os.uname().release} did not offer FUSE_PASSTHROUGH at FUSE_INIT "
                "(built without CONFIG_FUSE_PASSTHROUGH?)"
            )
        pytest.fail("FUSE passthrough was not enabled:\n" + mount.stderr())
    return mount


def test_passthrough_available(passthrough: Mount) -> None:
    assert passthrough.state()["available"] is True


def test_reads_are_identical_and_bypass_the_daemon(passthrough: Mount) -> None:
    before = passthrough.state()
    fd = os.open(passthrough.f, os.O_RDONLY)
    try:
        via_fuse = read_all(fd, SIZE + 1)  # and EOF at the memfd's size
        assert os.pread(fd, 100, 12_345_678) == passthrough.memfd_read(12_345_678, 100)
    finally:
        os.close(fd)
    assert len(via_fuse) == SIZE
    assert via_fuse == passthrough.memfd_read()
    after = passthrough.state()
    assert after["reads"]["f"] == 0, "a read of the passthrough file reached the daemon"
    assert after["stats"][0] == before["stats"][0] + 1
    assert after["stats"][1] == before["stats"][1]


def test_writes_land_in_the_memfd(passthrough: Mount) -> None:
    data = os.urandom(3 * 4096 + 5)
    offset = 7 * CHUNK + 123
    fd = os.open(passthrough.f, os.O_RDWR)
    try:
        assert os.pwrite(fd, data, offset) == len(data)
    finally:
        os.close(fd)
    assert passthrough.memfd_read(offset, len(data)) == data
    assert passthrough.state()["writes"]["f"] == 0


def test_mmap_is_coherent_with_the_memfd(passthrough: Mount) -> None:
    fd = os.open(passthrough.f, os.O_RDWR)
    try:
        m = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping keeps the file open
    try:
        offset = 5 * CHUNK + 4000  # across a page boundary
        assert m[offset:offset + 4096] == passthrough.memfd_read(offset, 4096)
        # The daemon writes into its memfd after the mapping was made...
        new = os.urandom(200)
        passthrough.poke(offset, new)
        assert m[offset:offset + 200] == new
        # ...and a store into the mapping is in the memfd, without msync.
        other = 40 * CHUNK + 1
        new = os.urandom(300)
        m[other:other + 300] = new
        assert passthrough.memfd_read(other, 300) == new
    finally:
        m.close()
    state = passthrough.state()
    assert state["reads"]["f"] == 0 and state["writes"]["f"] == 0


def test_unprivileged_reader(passthrough: Mount) -> None:
    expected = digest(passthrough.memfd_path())
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: as nobody, hash the file through the mount
        status = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            fd = os.open(passthrough.f, os.O_RDONLY)
            os.write(w, digest(fd, SIZE).encode())
            status = 0
        finally:
            os._exit(status)
    os.close(w)
    try:
        got = os.read(r, 100).decode()
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert got == expected
    assert passthrough.state()["reads"]["f"] == 0


def _release_all(mount: Mount) -> dict[str, Any]:
    """The state once the daemon has processed every release (they are asynchronous)."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        state = mount.state()
        if state["open_handles"] == 0 or time.monotonic() > deadline:
            return state
        time.sleep(0.01)


def test_concurrent_and_repeated_opens(passthrough: Mount) -> None:
    # Concurrent passthrough opens of one inode must share one kernel backing
    # registration (a second one gets EBUSY): the extension keeps it while any is open.
    before = passthrough.state()
    fds = [os.open(passthrough.f, flags) for flags in (os.O_RDONLY, os.O_RDWR, os.O_RDONLY)]
    try:
        expected = passthrough.memfd_read(CHUNK, 4096)
        for fd in fds:
            assert os.pread(fd, 4096, CHUNK) == expected
    finally:
        for fd in fds:
            os.close(fd)
    # After the last release the registration is closed; new opens make a new one.
    _release_all(passthrough)
    for _ in range(20):
        fd = os.open(passthrough.f, os.O_RDONLY)
        try:
            assert os.pread(fd, 16, 0) == passthrough.memfd_read(0, 16)
        finally:
            os.close(fd)
    after = _release_all(passthrough)
    assert after["stats"][0] == before["stats"][0] + 23
    assert after["stats"][1] == before["stats"][1]
    assert after["reads"]["f"] == 0
    assert "FUSE_DEV_IOC_BACKING_CLOSE" not in passthrough.stderr()


def test_opendir_is_never_passthrough(mount: Mount) -> None:
    before = mount.state()["stats"]
    for _ in range(3):
        assert sorted(os.listdir(mount.path)) == sorted(
            ["f", "state", "ctl", "dir_backed", "pipe_backed"]
        )
    assert mount.state()["stats"] == before


@pytest.mark.parametrize(
    ("name", "error"), [("dir_backed", "Is a directory"), ("pipe_backed", "Invalid argument")]
)
def test_unusable_backing_falls_back_to_direct_io(mount: Mount, name: str, error: str) -> None:
    before = mount.state()
    for _ in range(2):
        fd = os.open(mount.path / name, os.O_RDWR)
        try:
            assert os.pread(fd, 100_000, 3 * CHUNK) == mount.memfd_read(3 * CHUNK, 100_000)
            data = os.urandom(5000)
            assert os.pwrite(fd, data, 9 * CHUNK) == len(data)
            assert mount.memfd_read(9 * CHUNK, len(data)) == data
        finally:
            os.close(fd)
    after = mount.state()
    # Served by the daemon, not from the page cache (direct_io was forced on)...
    assert after["reads"][name] >= before["reads"][name] + 2
    assert after["writes"][name] == before["writes"][name] + 2
    assert after["stats"][0] == before["stats"][0]
    assert after["stats"][1] == before["stats"][1] + 2
    # ...and why is logged once.
    if after["available"]:
        assert mount.stderr().count(f"FUSE_DEV_IOC_BACKING_OPEN: {error}") == 1
    else:
        assert mount.stderr().count("FUSE passthrough is not enabled") == 1


def _mib_per_s(fd: int) -> float:
    buf = bytearray(CHUNK)
    start = time.perf_counter()
    offset = 0
    while (n := os.preadv(fd, [buf], offset)) > 0:
        offset += n
    assert offset == SIZE
    return SIZE / (1 << 20) / (time.perf_counter() - start)


def test_throughput(passthrough: Mount, capsys: pytest.CaptureFixture[str]) -> None:
    """Not asserted: a figure for the log (1 MiB reads, best of 5, alternating so that
    load from elsewhere on the machine hits both alike)."""
    via_fuse = os.open(passthrough.f, os.O_RDONLY)
    direct = os.open(passthrough.memfd_path(), os.O_RDONLY)
    try:
        runs = [(_mib_per_s(via_fuse), _mib_per_s(direct)) for _ in range(5)]
    finally:
        os.close(via_fuse)
        os.close(direct)
    fuse_speed = max(r[0] for r in runs)
    memfd_speed = max(r[1] for r in runs)
    with capsys.disabled():
        print(
            f"\nread 64 MiB: passthrough {fuse_speed:.0f} MiB/s, memfd directly "
            f"{memfd_speed:.0f} MiB/s ({fuse_speed / memfd_speed:.2f}x)"
        )


def test_api_outside_a_session() -> None:
    result = in_fresh_interpreter(
        """
        import kexecfs.fs.fusehook as fusehook
        import pytest

        assert fusehook.passthrough_available() is False
        assert fusehook.passthrough_stats() == (0, 0)
        fusehook.passthrough_open(1, 0)  # a registration no open consumes
        with pytest.raises(ValueError, match=">= 0"):
            fusehook.passthrough_open(2, -1)
        with pytest.raises(TypeError):
            fusehook.passthrough_open("3", 0)
        with pytest.raises(OverflowError):
            fusehook.passthrough_open(-4, 0)
        print("OK")
        """
    )
    assert result.stdout == "OK\n", result.stderr
