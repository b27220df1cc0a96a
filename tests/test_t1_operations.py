"""Tier 1: the FUSE operations (``KexecfsOperations``) driven directly, with no /dev/fuse
and no mount, as s3ql's t3_fs_api drives its Operations.

Each test builds the operations on a ``LiveUpdate.boot(tmp_path)`` machine and awaits their
handlers under ``trio.run``, as pyfuse3 would for the kernel's requests. The kernel's side
is played by :class:`Kernel`:

- the request context pyfuse3 passes is a plain object (:class:`Ctx`): the handlers read
  only its pid, uid, gid and umask, and ``pyfuse3.RequestContext`` cannot be given values;
- what the C extension reports as the caller of the request in flight
  (``fusehook.last_request_ctx``, which write and release read) is that same caller;
- ``pyfuse3.readdir_reply`` fills a listing with as much room as the test says; ioctl
  replies, passthrough registrations and the entries the daemon invalidates are recorded.

What the kernel itself decides (``default_permissions``: the mode bits of every path) is
not here: these tests see what the daemon decides. The caller's pid is this process, so a
descriptor number written to ``fd_preserve`` is one of the test's own (taking a
descriptor from oneself with pidfd_getfd needs no privilege).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import select
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kexecfs.fs import fusehook  # before pyfuse3 (it loads the C extension)
import pyfuse3  # noqa: E402
import pytest  # noqa: E402
import trio  # noqa: E402

from kexecfs import abi  # noqa: E402
from kexecfs.core.descriptors import DescriptorCache  # noqa: E402
from kexecfs.core.machine import LiveUpdate, State  # noqa: E402
from kexecfs.fs import control  # noqa: E402
from kexecfs.fs.nodes import INSTANCE_BY_NAME, ROOT_INO  # noqa: E402
from kexecfs.fs.operations import READY, KexecfsOperations  # noqa: E402


@dataclass(frozen=True)
class Ctx:
    """What a handler reads of ``pyfuse3.RequestContext``."""

    uid: int = 0
    gid: int = 0
    pid: int = field(default_factory=os.getpid)
    umask: int = 0o022


ROOT = Ctx()
ALICE = Ctx(1000, 1000)
BOB = Ctx(1001, 1001)


@dataclass
class Fields:
    """``pyfuse3.SetattrFields``, whose fields are read-only."""

    update_uid: bool = False
    update_gid: bool = False
    update_mode: bool = False
    update_size: bool = False
    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False


class Listing:
    """A readdir request's buffer, with room for ``room`` entries (a ``ReaddirToken``)."""

    def __init__(self, room: int = 1000) -> None:
        self.room = room
        self.entries: list[tuple[str, int, int]] = []  # name, inode, next_id

    @property
    def names(self) -> list[str]:
        return [name for name, _ino, _next in self.entries]


class PollHandle:
    """``pyfuse3.PollHandle``: the kernel's waiter, woken by notify()."""

    def __init__(self) -> None:
        self.notified = False

    def notify(self) -> None:
        self.notified = True


class Kernel:
    """The kernel and the C extension, as the operations see them, around one
    KexecfsOperations on ``machine``; paths are relative to the top of the tree."""

    def __init__(self, machine: LiveUpdate, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ops = KexecfsOperations(machine)
        self.caller = ROOT  # the request in flight, as fusehook.last_request_ctx() reports it
        self.replies: dict[int, bytes | int] = {}  # ioctl request: reply data, or the errno
        self.backing: dict[int, int] = {}  # fh: the descriptor registered for passthrough
        self.forgotten: list[bytes] = []  # names the daemon told the kernel to drop
        monkeypatch.setattr(fusehook, "last_request_ctx", lambda: (self.caller.pid, self.caller.uid, self.caller.gid))
        monkeypatch.setattr(fusehook, "reply_ioctl", lambda req, data: self._reply(req, bytes(data)))
        monkeypatch.setattr(fusehook, "reply_err", self._reply)
        monkeypatch.setattr(fusehook, "passthrough_open", self.backing.__setitem__)
        monkeypatch.setattr(pyfuse3, "readdir_reply", self._readdir_reply)
        monkeypatch.setattr(pyfuse3, "invalidate_entry", lambda parent, name, deleted=0: self.forgotten.append(name))

    def _reply(self, req: int, answer: bytes | int) -> None:
        assert req not in self.replies, f"ioctl request {req} answered twice"
        self.replies[req] = answer

    @staticmethod
    def _readdir_reply(token: Listing, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if len(token.entries) >= token.room:
            return False
        token.entries.append((name.decode(), attr.st_ino, next_id))
        return True

    @property
    def machine(self) -> LiveUpdate:
        return self.ops.machine

    async def lookup(self, path: str, ctx: Ctx = ROOT) -> pyfuse3.EntryAttributes:
        attrs = await self.ops.getattr(ROOT_INO, ctx)
        for name in filter(None, path.split("/")):
            attrs = await self.ops.lookup(attrs.st_ino, name.encode(), ctx)
        return attrs

    async def ino(self, path: str) -> int:
        return (await self.lookup(path)).st_ino

    async def open(self, path: str, flags: int = os.O_RDONLY, ctx: Ctx = ROOT) -> int:
        info = await self.ops.open(await self.ino(path), flags, ctx)
        assert info.direct_io, "pseudo files and proxied restored files must not be cached"
        return info.fh

    async def release(self, fh: int, ctx: Ctx = ROOT) -> None:
        self.caller = ctx
        await self.ops.release(fh)

    async def write_fh(self, fh: int, data: bytes, ctx: Ctx = ROOT, off: int = 0) -> int:
        self.caller = ctx
        return await self.ops.write(fh, off, data)

    async def read(self, path: str, ctx: Ctx = ROOT) -> str:
        """``cat path``: open, read from offset 0, release."""
        fh = await self.open(path, os.O_RDONLY, ctx)
        try:
            return (await self.ops.read(fh, 0, 1 << 16)).decode()
        finally:
            await self.release(fh, ctx)

    async def write(self, path: str, text: str | bytes, ctx: Ctx = ROOT, opener: Ctx | None = None) -> int:
        """``echo text > path`` by ``ctx``, through a file ``opener`` (``ctx`` by default) opened."""
        fh = await self.open(path, os.O_WRONLY, opener or ctx)
        try:
            return await self.write_fh(fh, text.encode() if isinstance(text, str) else text, ctx)
        finally:
            await self.release(fh, opener or ctx)

    async def listdir(self, path: str, room: int = 1000) -> list[str]:
        fh = await self.ops.opendir(await self.ino(path), ROOT)
        listing = Listing(room)
        await self.ops.readdir(fh, 0, listing)
        return listing.names

    async def mkdir(self, name: str, ctx: Ctx = ROOT, mode: int = 0o777) -> pyfuse3.EntryAttributes:
        return await self.ops.mkdir(ROOT_INO, name.encode(), mode, ctx)


async def fuse_errno(call: Awaitable[Any]) -> int:
    """The errno the handler answers (0 if it succeeds); anything but FUSEError fails the test:
    a handler must never let another exception reach pyfuse3."""
    try:
        await call
    except pyfuse3.FUSEError as exc:
        return exc.errno
    return 0


def trio_test(fn: Callable[..., Awaitable[None]]) -> Callable[..., None]:
    """Run an async test under trio.run (pytest still sees its fixtures, through __wrapped__)."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        trio.run(functools.partial(fn, *args, **kwargs))
    return run


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Kernel:
    return Kernel(LiveUpdate.boot(tmp_path / "images", boot_id="boot-1"), monkeypatch)


def memfd(data: bytes) -> int:
    fd = os.memfd_create("t1-operations", os.MFD_CLOEXEC)
    os.write(fd, data)
    return fd


# ---------------------------------------------------------------------------- the tree


@trio_test
async def test_lookup_and_getattr_of_the_top(kernel: Kernel) -> None:
    ops = kernel.ops
    top = await ops.getattr(ROOT_INO, ROOT)
    assert (top.st_mode, top.st_nlink) == (stat.S_IFDIR | 0o755, 2)
    modes = {name: stat.filemode((await kernel.lookup(name)).st_mode) for name in ("state", "control", "status")}
    assert modes == {"state": "-rw-r--r--", "control": "-rw-rw-rw-", "status": "-r--r--r--"}
    assert (await ops.lookup(ROOT_INO, b".", ROOT)).st_ino == ROOT_INO
    assert (await ops.lookup(ROOT_INO, b"..", ROOT)).st_ino == ROOT_INO
    assert await fuse_errno(ops.lookup(ROOT_INO, b"nothing", ROOT)) == errno.ENOENT
    assert await fuse_errno(ops.lookup(await kernel.ino("state"), b"x", ROOT)) == errno.ENOTDIR
    # An inode that was never handed out: ESTALE, so that the VFS looks the path up again.
    assert await fuse_errno(ops.getattr(999, ROOT)) == errno.ESTALE
    assert (await ops.statfs(ROOT)).f_namemax == 63


@trio_test
async def test_mkdir_makes_an_instance_of_its_caller_with_its_umask(kernel: Kernel) -> None:
    made = await kernel.mkdir("svc", Ctx(umask=0o027))
    assert stat.filemode(made.st_mode) == "drwxr-x---" and (made.st_uid, made.st_gid) == (0, 0)
    assert (await kernel.lookup("svc")).st_ino == made.st_ino
    assert (await kernel.lookup("svc/..")).st_ino == ROOT_INO
    assert (await kernel.lookup("svc/fds/..")).st_ino == made.st_ino
    assert (await kernel.ops.getattr(ROOT_INO, ROOT)).st_nlink == 3
    assert (await kernel.ops.statfs(ROOT)).f_files == 1
    assert await fuse_errno(kernel.mkdir("svc")) == errno.EEXIST
    for bad in (".hidden", "state", "a b", "x" * 64):
        assert await fuse_errno(kernel.mkdir(bad)) == errno.EINVAL, bad
    assert await fuse_errno(kernel.ops.mkdir(made.st_ino, b"sub", 0o755, ROOT)) == errno.EPERM
    for name, node in INSTANCE_BY_NAME.items():
        assert (await kernel.lookup(f"svc/{name}")).st_mode == node.mode, name


@trio_test
async def test_readdir_lists_the_tree_and_resumes_where_the_kernel_stopped(kernel: Kernel) -> None:
    for name in ("b", "a", "c"):
        await kernel.mkdir(name)
    everything = ["state", "control", "status", "a", "b", "c"]
    assert await kernel.listdir("") == everything
    assert sorted(await kernel.listdir("a")) == sorted(INSTANCE_BY_NAME)
    assert await kernel.listdir("a/fds") == []
    # A buffer with room for two entries at a time: each call goes on from the last next_id.
    fh = await kernel.ops.opendir(ROOT_INO, ROOT)
    seen: list[str] = []
    start = 0
    for _call in range(len(everything)):  # bounded: a readdir that never ends fails, not hangs
        part = Listing(room=2)
        await kernel.ops.readdir(fh, start, part)
        if not part.entries:
            break
        seen += part.names
        start = part.entries[-1][2]
    assert seen == everything
    assert await fuse_errno(kernel.ops.opendir(await kernel.ino("state"), ROOT)) == errno.ENOTDIR


# ---------------------------------------------------------------------------- text files


@trio_test
async def test_state_is_rendered_at_offset_zero_and_takes_one_command(kernel: Kernel) -> None:
    fh = await kernel.open("state")
    assert await kernel.ops.read(fh, 0, 100) == b"normal\n"
    assert await kernel.ops.read(fh, 3, 100) == b"mal\n"
    assert await kernel.write("state", "prepare\n") == len("prepare\n")
    assert await kernel.ops.read(fh, 3, 100) == b"mal\n", "a read past offset 0 goes on with the text of open"
    assert await kernel.ops.read(fh, 0, 100) == b"prepared\n"
    await kernel.release(fh)
    assert kernel.machine.state is State.PREPARED
    for junk in (b"prepare\nfreeze\n", b"\xff\n", b" \n", b"reboot"):
        assert await fuse_errno(kernel.write("state", junk)) == errno.EINVAL, junk
    assert await fuse_errno(kernel.write("state", "cancel", ALICE)) == errno.EPERM
    assert await fuse_errno(kernel.write("status", "x")) == errno.EINVAL
    await kernel.write("state", "cancel")
    assert await kernel.read("state") == "normal\n"
    assert "state: normal\n" in await kernel.read("status")


@trio_test
async def test_fd_preserve_takes_the_writers_descriptor(kernel: Kernel) -> None:
    await kernel.mkdir("svc")
    m = memfd(b"guest memory")
    try:
        await kernel.write("svc/fd_preserve", f"{m} 7\n")
        assert await fuse_errno(kernel.write("svc/fd_preserve", f"{m} 7")) == errno.EEXIST
    finally:
        os.close(m)  # the daemon holds its own descriptor now
    assert await kernel.read("svc/fd_preserve") == "7 memfd 12 rw\n"
    assert await kernel.listdir("svc/fds") == ["7"]
    entry = await kernel.lookup("svc/fds/7")
    assert (stat.filemode(entry.st_mode), entry.st_size) == ("-rw-------", 12)
    assert entry.entry_timeout == 0, "tokens come and go: every path walk must ask again"
    assert 0 < entry.attr_timeout <= 0.01, "fresh for the call that looked it up, not beyond (sizes change)"
    assert await fuse_errno(kernel.ops.lookup(await kernel.ino("svc/fds"), b"07", ROOT)) == errno.ENOENT
    for junk in ("five", "1 2 3", "1" * 21):
        assert await fuse_errno(kernel.write("svc/fd_preserve", junk)) == errno.EINVAL, junk
    await kernel.write("svc/fd_unpreserve", "7")
    assert await kernel.read("svc/fd_preserve") == ""


@trio_test
async def test_delegation_by_chown_and_the_owner_rules(kernel: Kernel) -> None:
    svc = await kernel.mkdir("svc")
    to_alice = pyfuse3.EntryAttributes()
    to_alice.st_uid, to_alice.st_gid = ALICE.uid, ALICE.gid
    chown = Fields(update_uid=True, update_gid=True)
    assert await fuse_errno(kernel.ops.setattr(svc.st_ino, to_alice, chown, None, ALICE)) == errno.EPERM
    assert (await kernel.ops.setattr(svc.st_ino, to_alice, chown, None, ROOT)).st_uid == ALICE.uid
    assert (await kernel.lookup("svc/fd_preserve")).st_uid == ALICE.uid, "one owner for the instance and its files"
    assert await fuse_errno(kernel.ops.setattr(ROOT_INO, to_alice, chown, None, ROOT)) == errno.EPERM
    m = memfd(b"alice's")
    try:
        assert await fuse_errno(kernel.write("svc/fd_preserve", f"{m} 1", BOB)) == errno.EACCES
        # The confused deputy: root writing through a file its owner opened is refused.
        assert await fuse_errno(kernel.write("svc/fd_preserve", f"{m} 1", ROOT, opener=ALICE)) == errno.EACCES
        await kernel.write("svc/fd_preserve", f"{m} 1", ALICE)
    finally:
        os.close(m)
    assert await kernel.read("svc/fd_preserve") == "1 memfd 7 rw\n"
    assert await fuse_errno(kernel.write("svc/state", "prepare", ALICE)) == errno.EINVAL, "an owner only finishes"


@trio_test
async def test_poll_sleeps_until_a_transition(kernel: Kernel) -> None:
    ino = await kernel.ino("state")
    fh = await kernel.open("state")
    waiter = PollHandle()
    assert await kernel.ops.poll(ino, fh, waiter, ROOT) == 0
    await kernel.write("state", "prepare")
    assert waiter.notified
    assert await kernel.ops.poll(ino, fh, None, ROOT) == READY
    await kernel.ops.read(fh, 0, 100)
    assert await kernel.ops.poll(ino, fh, None, ROOT) == 0, "after reading the new state, poll sleeps again"
    status = await kernel.open("status")
    assert await kernel.ops.poll(await kernel.ino("status"), status, None, ROOT) == select.POLLIN | select.POLLOUT


# ---------------------------------------------------------------------------- a live update


@trio_test
async def test_a_simulated_kexec_swaps_the_machine_and_restores_through_fds(kernel: Kernel) -> None:
    await kernel.mkdir("svc")
    ino_before = await kernel.ino("svc")
    m = memfd(b"guest memory")
    try:
        await kernel.write("svc/fd_preserve", f"{m} 1")
    finally:
        os.close(m)
    assert await fuse_errno(kernel.open("svc/fds/1")) == errno.EBUSY, "nothing to restore before a kexec"
    old = kernel.machine
    await kernel.write("state", "prepare")
    await kernel.write("state", "kexec")
    assert kernel.machine is not old and kernel.machine.kexec_count == 1
    assert await kernel.read("state") == "updated\n"
    assert await kernel.ino("svc") == ino_before, "a bind mount of the instance goes on naming it"
    assert kernel.forgotten == [], "every instance came through"
    fh = await kernel.open("svc/fds/1", os.O_RDWR)
    backing = kernel.backing[fh]
    assert os.pread(backing, 100, 0) == b"guest memory", "passthrough is registered with the restored memfd"
    assert await kernel.ops.read(fh, 6, 6) == b"memory", "and the proxy serves the same bytes"
    assert await kernel.write_fh(fh, b"G", off=0) == 1
    assert os.pread(backing, 100, 0) == b"Guest memory"
    assert await kernel.ops.getxattr(await kernel.ino("svc/fds/1"), b"user.kexecfs.kind", ROOT) == b"memfd"
    assert await fuse_errno(kernel.ops.getxattr(await kernel.ino("svc/fds/1"), b"user.other", ROOT)) == errno.ENODATA
    assert await fuse_errno(kernel.open("svc/fds/1", os.O_RDONLY, ALICE)) == errno.EACCES
    await kernel.release(fh)
    assert fh not in kernel.ops.handles
    with pytest.raises(OSError) as closed:
        os.fstat(backing)
    assert closed.value.errno == errno.EBADF, "release closes the open's own descriptor"
    await kernel.write("svc/state", "finish")
    assert await kernel.read("state") == "normal\n"


class CountingStore:
    """Descriptors held outside the daemon, given back as keepers do; counts the round trips."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.round_trips = 0

    def fetch(self, name: str) -> int:
        self.round_trips += 1
        return os.dup(self.fds[name])

    def fetch_many(self, names: list[str]) -> dict[str, int]:
        self.round_trips += 1
        return {name: os.dup(self.fds[name]) for name in names}


@trio_test
async def test_lookups_of_fds_in_token_order_fetch_stored_descriptors_in_batches(kernel: Kernel) -> None:
    """A service restores fds/0, fds/1, ... in turn, and each LOOKUP's attributes need the
    file's descriptor: with the store holding them, one round trip per 64 tokens, not one
    per file (the bench's 1,000 restores made 1,000 round trips to a keeper)."""
    await kernel.mkdir("svc")
    fds = [memfd(b"x" * t) for t in range(100)]
    try:
        for t, fd in enumerate(fds):
            await kernel.write("svc/fd_preserve", f"{fd} {t}\n")
    finally:
        for fd in fds:
            os.close(fd)
    store = CountingStore()
    cache = DescriptorCache(store, size=256)
    try:
        for t, pf in kernel.machine.instances["svc"].files.items():
            store.fds[f"f{t}"] = os.dup(pf.fd)
            pf.hand_over(f"f{t}", cache)
        cache.clear()  # nothing at hand: every descriptor is the store's alone
        sizes = [(await kernel.lookup(f"svc/fds/{t}")).st_size for t in range(100)]
        assert sizes == list(range(100))
        assert store.round_trips == 2, "tokens 0-63, then 64-99"
    finally:
        cache.clear()
        for fd in store.fds.values():
            os.close(fd)


@trio_test
async def test_a_kexec_that_loses_instances_makes_the_kernel_forget_them(kernel: Kernel) -> None:
    await kernel.mkdir("gone")
    await kernel.write("state", "kexec")  # from normal: nothing was prepared, nothing comes through
    assert await kernel.listdir("") == ["state", "control", "status"]
    assert kernel.forgotten == [b"gone"], "the kernel may have cached the name"


@trio_test
async def test_a_removed_instance_answers_enodev_through_open_files(kernel: Kernel) -> None:
    ino = (await kernel.mkdir("svc")).st_ino
    fh = await kernel.open("svc/state")
    await kernel.ops.rmdir(ROOT_INO, b"svc", ROOT)
    assert await fuse_errno(kernel.ops.read(fh, 0, 100)) == errno.ENODEV
    assert await fuse_errno(kernel.ops.getattr(ino, ROOT)) == errno.ESTALE
    assert await fuse_errno(kernel.ops.rmdir(ROOT_INO, b"svc", ROOT)) == errno.ENOENT
    assert await fuse_errno(kernel.ops.rmdir(ROOT_INO, b"state", ROOT)) == errno.ENOTDIR
    assert (await kernel.mkdir("svc")).st_ino != ino, "the kernel may still hold the old inode"


# ---------------------------------------------------------------------------- errno


@trio_test
async def test_refusals_are_their_errno_and_one_log_line(kernel: Kernel, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kexecfs.fs"):
        assert await fuse_errno(kernel.mkdir(".hidden")) == errno.EINVAL
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.getMessage().startswith("mkdir: ")
    assert record.exc_info is None
    # An OSError of a syscall made for the caller is its errno too: no descriptor 1000000 here.
    await kernel.mkdir("svc")
    assert await fuse_errno(kernel.write("svc/fd_preserve", "1000000")) == errno.EBADF


@trio_test
async def test_an_unexpected_error_is_eio_and_the_next_request_is_served(
        kernel: Kernel, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("a bug in status")

    monkeypatch.setattr(kernel.machine, "status", broken)
    with caplog.at_level(logging.WARNING, logger="kexecfs.fs"):
        assert await fuse_errno(kernel.read("status")) == errno.EIO
    assert any(r.exc_info and "a bug in status" in str(r.exc_info[1]) for r in caplog.records), \
        "the traceback goes to the log"
    assert await kernel.read("state") == "normal\n"


# ---------------------------------------------------------------------------- ioctls


@trio_test
async def test_control_ioctls_are_dispatched_and_answered_once(kernel: Kernel) -> None:
    await kernel.mkdir("svc")
    ino = await kernel.ino("svc/control")
    roots = await kernel.open("svc/control")
    alices = await kernel.open("svc/control", ctx=ALICE)
    m = memfd(b"by ioctl")

    def ioctl(req: int, cmd: int, data: bytes = b"", out_size: int = 0, fh: int = roots) -> None:
        control.dispatch(kernel.ops, req, ino, cmd, fh, 0, data, out_size, 0, ROOT.pid, ROOT.uid, ROOT.gid)

    async with trio.open_nursery() as nursery:
        kernel.ops.nursery = nursery  # the daemon's: event ioctls are answered by a task
        ioctl(1, abi.GET_STATE, out_size=abi.STATE.size)
        ioctl(2, abi.FD_PRESERVE, abi.LIVEUPDATE_FD.pack(m, 0, 5))
        ioctl(3, abi.FD_PRESERVE, abi.LIVEUPDATE_FD.pack(m, 1, 6))  # flags must be 0
        ioctl(4, 0x5401)  # TCGETS, from isatty()
        ioctl(5, abi.PREPARE)
        ioctl(6, abi.GET_STATE, out_size=abi.STATE.size, fh=alices)  # root through a file alice opened
        assert 5 not in kernel.replies, "an event is answered by a task, not in the hook's call"
    os.close(m)
    assert kernel.replies == {1: abi.STATE.pack(State.NORMAL.number), 2: b"", 3: errno.EINVAL, 4: errno.ENOTTY,
                              5: b"", 6: errno.EACCES}
    assert await kernel.read("svc/fd_preserve") == "5 memfd 8 rw\n"
    assert kernel.machine.state is State.PREPARED
