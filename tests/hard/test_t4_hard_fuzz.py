"""Fuzzing every writable file and the ioctl interface through a real mount, as root,
as the instance's owner and as a stranger: random bytes, commands with junk, huge
(1 MiB) and split writes, writes at odd offsets, reads anywhere, random ioctl numbers
and argument sizes (type 0xBA and others, _IOR/_IOW up to 16 KiB), bad pointers, and
the odd metadata call. The daemon must answer each with an errno or success, never
hang (a watchdog aborts the connection and fails the test), never die, and log no
unexpected traceback.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import os
import select
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import NOBODY, Daemon, MiB, needs_fuse, public_tmp, state, watchdog, write_errno
from kexecfs import abi

pytestmark = needs_fuse

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_SYS_SETGROUPS = 116  # x86-64
OTHER = 1000
OWNER = NOBODY


def as_uid(uid: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run ``fn`` in a thread whose filesystem uid/gid are ``uid`` (no groups): FUSE reports
    that uid, the kernel checks permissions with it, and the thread loses CAP_DAC_OVERRIDE.
    Exceptions are re-raised here."""
    if uid == 0:
        return fn(*args)
    box: dict[str, Any] = {}

    def run() -> None:
        _libc.syscall(_SYS_SETGROUPS, 0, None)  # per thread, unlike os.setgroups
        _libc.setfsgid(uid)
        _libc.setfsuid(uid)
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


class Fuzz:
    """The mount under fuzz, put back into a known shape before each example."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.mnt = d.mountpoint
        self.memfd = os.memfd_create("fuzz-target", os.MFD_CLOEXEC)
        os.write(self.memfd, os.urandom(10_000))
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.inputs = 0

    def reset(self) -> None:
        now = state(self.mnt)
        if now in ("prepared", "frozen"):
            (self.mnt / "state").write_text("cancel\n")
        elif now == "updated":
            (self.mnt / "state").write_text("finish\n")
        svc = self.mnt / "svc"
        if not svc.exists():
            svc.mkdir()
        os.chown(svc, OWNER, OWNER)
        os.chmod(svc, 0o755)
        if not (svc / "fds" / "1").exists():
            with open(svc / "fd_preserve", "w") as f:
                f.write(f"{self.memfd} 1")
        assert state(self.mnt) == "normal"

    def run(self, op: tuple, uid: int) -> None:  # type: ignore[type-arg]
        self.inputs += 1
        try:
            as_uid(uid, getattr(self, f"op_{op[0]}"), *op[1:])
            self.outcomes[f"{op[0]}:ok"] += 1
        except OSError as exc:
            self.outcomes[f"{op[0]}:{errno.errorcode.get(exc.errno or 0, exc.errno)}"] += 1

    # Each op does one thing a program could do to a kexecfs path; OSError is an answer.

    def _open(self, target: str, flags: int) -> int:
        return os.open(self.mnt / target, flags | os.O_CLOEXEC)

    def op_write(self, target: str, data: bytes, offset: int | None) -> None:
        fd = self._open(target, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset) if offset is not None else os.write(fd, data)
        finally:
            os.close(fd)

    def op_huge(self, target: str, byte: int) -> None:
        fd = self._open(target, os.O_WRONLY)
        try:
            os.write(fd, (b"prepare " if byte == 0 else bytes([byte])) * (MiB // (8 if byte == 0 else 1)))
        finally:
            os.close(fd)

    def op_split(self, target: str, data: bytes, cut: int) -> None:
        """One command in two write(2)s: each one is judged alone, as sysfs does."""
        fd = self._open(target, os.O_WRONLY)
        try:
            for part in (data[:cut], data[cut:]):
                try:
                    os.write(fd, part)
                except OSError as exc:
                    self.outcomes[f"split-part:{errno.errorcode.get(exc.errno or 0)}"] += 1
        finally:
            os.close(fd)

    def op_read(self, target: str, offset: int, size: int) -> None:
        fd = self._open(target, os.O_RDONLY)
        try:
            os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def op_ioctl(self, target: str, cmd: int, how: str, fill: int) -> None:
        fd = self._open(target, os.O_RDONLY)
        try:
            size = abi.ioc_size(cmd)
            buf = ctypes.create_string_buffer(bytes([fill]) * size, max(size, 1))
            arg = {"buf": ctypes.addressof(buf), "bad": 0xDEADBEEF, "null": 0, "int": fill}[how]
            if _libc.ioctl(fd, cmd, arg) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err))
        finally:
            os.close(fd)

    def op_open(self, target: str, flags: int) -> None:
        os.close(self._open(target, flags))

    def op_poll(self, target: str) -> None:
        fd = self._open(target, os.O_RDONLY)
        try:
            p = select.poll()
            p.register(fd, select.POLLIN | select.POLLPRI | select.POLLOUT)
            p.poll(0)
        finally:
            os.close(fd)

    def op_meta(self, target: str, which: str, n: int) -> None:
        path = self.mnt / target
        if which == "truncate":
            os.truncate(path, n)
        elif which == "chmod":
            os.chmod(path, n & 0o7777)
        elif which == "chown":
            os.chown(path, n % 70000, n % 70000)
        elif which == "setxattr":
            os.setxattr(path, "user.kexecfs.pos", str(n).encode())
        elif which == "getxattr":
            os.getxattr(path, ["user.kexecfs.pos", "user.kexecfs.seals", "user.kexecfs.kind", "security.x"][n % 4])
        elif which == "listxattr":
            os.listxattr(path)
        elif which == "mkdir":
            os.mkdir(self.mnt / f"fz{n % 5}")
        elif which == "rmdir":
            os.rmdir(self.mnt / f"fz{n % 5}" if n % 2 else path)
        elif which == "unlink":
            os.unlink(path)
        elif which == "rename":
            os.rename(path, self.mnt / f"fz{n % 5}")
        elif which == "symlink":
            os.symlink("/etc/passwd", path / "x" if (self.mnt / target).is_dir() else path)
        elif which == "mknod":
            os.mknod(self.mnt / target / "node")
        elif which == "utime":
            os.utime(path, (n, n))
        elif which == "statvfs":
            os.statvfs(path)
        elif which == "listdir":
            os.listdir(path)
        elif which == "fallocate":
            fd = self._open(target, os.O_WRONLY)
            try:
                os.posix_fallocate(fd, 0, n % (1 << 20) + 1)
            finally:
                os.close(fd)
        elif which == "fsync":
            fd = self._open(target, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


WRITABLE = ["state", "svc/state", "svc/fd_preserve", "svc/fd_unpreserve"]
ALL_FILES = WRITABLE + ["status", "control", "svc/control", "svc/fds/1", "svc/fds/99", "svc/fds", "svc", ".",
                        "nope/state", "svc/fds/../state"]

WORDS = ["prepare", "cancel", "freeze", "finish", "kexec", "0", "1", "1 1", "1 2", "3 1", "-1", "18446744073709551615",
         "18446744073709551616", "99999999999999999999999999", "1 2 3", "+1", "0x10", "1e3", "", " ", "\n",
         "prepare\ncancel", "prepare\0", "١", "１"]

payloads = st.one_of(
    st.binary(max_size=300),
    st.sampled_from(WORDS).map(str.encode),
    st.tuples(st.sampled_from(WORDS), st.sampled_from(["", "\n", " \n", "\t", "\0", "\r\n", "  "])).map(
        lambda t: (t[0] + t[1]).encode()),
    st.tuples(st.integers(-(2 ** 70), 2 ** 70), st.integers(-(2 ** 70), 2 ** 70)).map(
        lambda t: f"{t[0]} {t[1]}".encode()),
    st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
)

# ioctl numbers: the LUO ones, their neighbours, and anything of any type, direction and
# size, except the generic VFS ones that act before FUSE sees them and would freeze the
# filesystem or touch other files (FIFREEZE 'X', FICLONE 0x94).
ioctl_numbers = st.one_of(
    st.sampled_from(sorted(abi.COMMANDS)),
    st.builds(lambda d, nr, size, typ: (d << 30) | (size << 16) | (typ << 8) | nr,
              st.integers(0, 3), st.integers(0, 255), st.one_of(st.integers(0, 64), st.integers(0, 0x3FFF)),
              st.one_of(st.just(0xBA), st.integers(0, 255).filter(lambda t: t not in (0x58, 0x94)))),
    st.sampled_from([0x5401, 0x541B, 0x80086601, 0x40086602, 0x5421, 0x5451, 0x5450]),  # TCGETS, FIONREAD, ...
)

ops = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(WRITABLE + ["status", "control"]), payloads,
              st.one_of(st.none(), st.just(12345), st.integers(0, 2 ** 40))),
    st.tuples(st.just("huge"), st.sampled_from(WRITABLE), st.sampled_from([0, ord("1"), ord(" "), 0xFF])),
    st.tuples(st.just("split"), st.sampled_from(WRITABLE), payloads, st.integers(0, 20)),
    st.tuples(st.just("read"), st.sampled_from(ALL_FILES), st.one_of(st.integers(0, 100), st.integers(0, 2 ** 62)),
              st.integers(0, 1 << 17)),
    st.tuples(st.just("ioctl"), st.sampled_from(["control", "svc/control", "state", "svc/fd_preserve", "svc",
                                                 "svc/fds", "svc/fds/1", "."]),
              ioctl_numbers, st.sampled_from(["buf", "buf", "bad", "null", "int"]), st.integers(0, 255)),
    st.tuples(st.just("open"), st.sampled_from(ALL_FILES),
              st.sampled_from([os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_TRUNC, os.O_WRONLY | os.O_APPEND,
                               os.O_RDONLY | os.O_DIRECTORY, os.O_CREAT | os.O_WRONLY, os.O_RDWR | os.O_EXCL,
                               os.O_RDONLY | os.O_NOATIME, getattr(os, "O_DIRECT", 0) | os.O_RDWR,
                               os.O_PATH, os.O_WRONLY | os.O_NONBLOCK])),
    st.tuples(st.just("poll"), st.sampled_from(["state", "svc/state", "status", "svc/fd_preserve", "svc/fds/1"])),
    st.tuples(st.just("meta"), st.sampled_from(ALL_FILES),
              st.sampled_from(["truncate", "chmod", "chown", "setxattr", "getxattr", "listxattr", "mkdir", "rmdir",
                               "unlink", "rename", "symlink", "mknod", "utime", "statvfs", "listdir", "fallocate",
                               "fsync"]),
              st.integers(0, 2 ** 31)),
)
uids = st.sampled_from([0, OWNER, OWNER, OTHER])


@pytest.fixture(scope="module")
def fuzz() -> Iterator[Fuzz]:
    tmp = public_tmp("fuzz")  # other uids write through the mount
    d = Daemon.at(tmp)
    d.start()
    f = Fuzz(d)
    try:
        yield f
        assert d.alive(), "the daemon died"
        print(f"fuzz: {f.inputs} inputs; outcomes: {dict(sorted(f.outcomes.items()))}")
        eio = {k: v for k, v in f.outcomes.items() if k.endswith(":EIO")}
        assert not eio, f"EIO is kexecfs's answer to its own bugs: {eio}"
    finally:
        os.close(f.memfd)
        d.stop()
    assert d.proc is not None and d.proc.returncode == 0, f"the daemon exited with {d.proc.returncode}"
    d.check_log()


SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def fuzz_example(fuzz: Fuzz, program: list[tuple]) -> None:  # type: ignore[type-arg]
    fuzz.reset()
    with watchdog(fuzz.mnt, 30, f"ops {program}"):
        for op, uid in program:
            fuzz.run(op, uid)
        assert fuzz.d.alive(), f"the daemon died during {program}"
        # It keeps serving, and the owner's own file is still there when the state allows it.
        assert state(fuzz.mnt) in ("normal", "prepared", "frozen", "updated")
        (fuzz.mnt / "status").read_text()


@settings(max_examples=150, **SETTINGS)  # type: ignore[arg-type]
@given(program=st.lists(st.tuples(ops, uids), min_size=1, max_size=8))
def test_fuzz_files_and_ioctls_fast(fuzz: Fuzz, program: list[tuple]) -> None:  # type: ignore[type-arg]
    fuzz_example(fuzz, program)


@pytest.mark.nondeterministic
@settings(max_examples=2500, **SETTINGS)  # type: ignore[arg-type]
@given(program=st.lists(st.tuples(ops, uids), min_size=1, max_size=10))
def test_fuzz_files_and_ioctls(fuzz: Fuzz, program: list[tuple]) -> None:  # type: ignore[type-arg]
    fuzz_example(fuzz, program)


def test_every_ioctl_number_of_type_ba(fuzz: Fuzz) -> None:
    ba_sweep(fuzz, range(256))


def ba_sweep(fuzz: Fuzz, nrs: range) -> None:
    """Every nr of type 0xBA, in every direction, at the LUO sizes and a few others,
    with good buffers and bad pointers, on both control files, as owner and root."""
    fuzz.reset()
    n = 0
    with watchdog(fuzz.mnt, 120, "the 0xBA sweep"):
        for nr in nrs:
            for direction in range(4):
                for size in (0, 4, 8, 16, 17, 4096):
                    if direction == 0 and size:
                        continue
                    cmd = (direction << 30) | (size << 16) | (0xBA << 8) | nr
                    if cmd in abi.COMMANDS and abi.COMMANDS[cmd].event:
                        continue  # the state machine's own: driven elsewhere
                    for target, uid in (("svc/control", OWNER), ("control", 0), ("svc/control", 0)):
                        for how in ("buf", "bad"):
                            fuzz.run(("ioctl", target, cmd, how, nr), uid)
                            n += 1
    assert fuzz.d.alive()
    print(f"{n} ioctls of type 0xBA")


def test_preserving_a_kexecfs_file_is_refused_not_a_deadlock(fuzz: Fuzz, tmp_path: Path) -> None:
    """Regression: preserving a descriptor of a file of the kexecfs mount itself made the
    daemon fstat() it from its only request loop, a request to itself that nobody could
    answer: every caller of the mount hung for good. Now: ENOENT, at once, also through a
    bind mount in another mount namespace (which the daemon's mountinfo does not show)."""
    fuzz.reset()
    with watchdog(fuzz.mnt, 20, "preserving a kexecfs file"):
        for target in ("status", "svc/state", "svc/fd_preserve", "state"):
            fd = os.open(fuzz.mnt / target, os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert write_errno(fuzz.mnt / "svc/fd_preserve", f"{fd} 50".encode()) == errno.ENOENT
            finally:
                os.close(fd)
        script = (f"mkdir -p {tmp_path}/b && mount --bind {fuzz.mnt}/svc {tmp_path}/b && "
                  f"exec 7<{tmp_path}/b/state && echo '7 51' > {tmp_path}/b/fd_preserve")
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                           capture_output=True, text=True, timeout=15)
        assert r.returncode != 0 and "No such file or directory" in r.stderr, r.stderr
    assert "50" not in (fuzz.mnt / "svc/fd_preserve").read_text()
    assert state(fuzz.mnt) == "normal"


def test_a_megabyte_of_digits_is_einval(fuzz: Fuzz) -> None:
    """Regression: a token of a million digits went to int(), which raises past 4300
    digits: EIO and a traceback. A token is a u64: more than 20 digits is EINVAL."""
    fuzz.reset()
    digits = b"1" * (MiB - 1)
    for target in ("svc/fd_preserve", "svc/fd_unpreserve"):
        assert write_errno(fuzz.mnt / target, digits) == errno.EINVAL
        assert write_errno(fuzz.mnt / target, b"1" * 5000) == errno.EINVAL
        assert write_errno(fuzz.mnt / target, b"3 " + b"9" * 21) == errno.EINVAL
    assert write_errno(fuzz.mnt / "svc/fd_unpreserve", b"18446744073709551615") == errno.ENOENT
    assert "1 memfd 10000 rw" in (fuzz.mnt / "svc/fd_preserve").read_text().splitlines()


def test_descriptor_numbers_beyond_an_int_are_ebadf(fuzz: Fuzz) -> None:
    """Regression: the fd number went to pidfd_getfd() through ctypes, which cuts a
    Python int to a C int: "4294967301" took descriptor 5 of the caller, and numbers past
    a long raised OverflowError (EIO and a traceback). Now EBADF."""
    fuzz.reset()
    memfd = os.memfd_create("aliased")
    try:
        for fd in ((1 << 32) + memfd, (1 << 63) + memfd, 10 ** 20 - 1, 2 ** 31):
            assert write_errno(fuzz.mnt / "svc/fd_preserve", f"{fd} 77".encode()) == errno.EBADF, fd
        assert "77" not in (fuzz.mnt / "svc/fd_preserve").read_text()
    finally:
        os.close(memfd)
