"""The FUSE skin: maps inodes and requests onto the core, and errors back onto errno.

Every handler is a few lines: resolve the inode or handle, call the core
(:class:`~kexecfs.core.machine.LiveUpdate`), render text. The text files' show and store
functions are in :mod:`.textfiles` (held by the node table), the ioctls in :mod:`.control`,
restored files in :mod:`.restored`. Refusals (:func:`~kexecfs.core.errors.refusal`)
become their errno plus one log line; anything unexpected becomes EIO plus a traceback,
and the daemon keeps serving.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
import select
import stat
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from . import fusehook  # must precede pyfuse3 (see kexecfs.fusehook)
import pyfuse3  # noqa: E402
import trio  # noqa: E402

from ..core.descriptors import prefetch  # noqa: E402
from ..core.errors import KexecfsError, fail, refusal  # noqa: E402
from ..core.faults import delay  # noqa: E402
from ..core.instance import Caller, Instance, PreservedFile  # noqa: E402
from ..core.journal import current_request  # noqa: E402
from ..core.machine import FIRST_FILE_INO, INO_STRIDE, SLOW_EVENTS, LiveUpdate, State  # noqa: E402
from . import restored, sessions  # noqa: E402
from .nodes import (FDS_OFFSET, GLOBAL_BY_INO, GLOBAL_BY_NAME, INSTANCE_BY_NAME, INSTANCE_BY_OFFSET,  # noqa: E402
                    NODES, ROOT_INO, Node, Scope)

log = logging.getLogger("kexecfs.fs")

# fds/<token> entries are numbered from here, far above any instance's range (by the core:
# the numbers are journaled, so that a restarted daemon gives the same ones).
FIRST_TOKEN_INO = FIRST_FILE_INO
#: FUSE_UNIQUE_RESEND: the kernel sent this request again, to a restarted daemon.
RESENT = 1 << 63
# A file handle says what a restarted daemon cannot know otherwise of a file opened
# before it started (the request gives the inode and the open flags): the uid that
# opened it (high 32 bits) and whether it is a LUO session fd; the rest is a number
# that no open file of the connection has (restart.HandleNumbers).
SESSION_FH = 1 << 31


def file_handle(uid: int, number: int, session: bool = False) -> int:
    return (uid << 32) | (SESSION_FH if session else 0) | ((number - 1) % (SESSION_FH - 1) + 1)
DIR_TIMEOUT = 1.0  # directory entries and attributes change only through this daemon
READDIR_PREFETCH = 64  # fds/ entries a readdir reply holds, about (each with its attributes)
# fds/<token>: entries time out at once (tokens come and go, so every path walk asks
# again), and attributes after a jiffy. Not 0: the kernel takes a zero timeout as
# "stale already" and follows every LOOKUP with a GETATTR for the permission check of
# the same open or stat, one request in four of a restore. A size that changes through
# the FUSE file updates the kernel's copy itself; one changed behind it shows a jiffy late.
TOKEN_ATTR_TIMEOUT = 0.001
READY = select.POLLIN | select.POLLPRI | select.POLLERR

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def handler(fn: F) -> F:
    """Turn core errors into their errno and anything unexpected into EIO, logging both."""

    @functools.wraps(fn)
    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        note_request()
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except Exception as exc:
            answer = refusal(exc)
            if answer is None:
                log.exception("%s: unexpected error; answering EIO", fn.__name__)
                raise pyfuse3.FUSEError(errno.EIO) from None
            log.warning("%s: %s", fn.__name__, answer)
            raise pyfuse3.FUSEError(answer.errno) from None
    return wrapped  # type: ignore[return-value]


def note_request() -> int | None:
    """Record the request being served (for the journal, see ``current_request``); its
    unique, with FUSE_UNIQUE_RESEND if the kernel resent it. Call before any await."""
    try:
        unique = fusehook.last_request()[0]
    except RuntimeError:
        return None
    current_request.set(unique & ~RESENT)
    return unique


@dataclass
class Handle:
    """An open file: which node of which instance, and what its opener has seen."""

    node: Node | None  # None for an fds/<token> entry
    instance_ino: int
    text: bytes = b""  # the rendering served to reads (made at offset 0, like seq_file)
    seen: int = -1  # the state version at open or last read, for poll()
    restored_fd: int = -1  # fds/<token>: the daemon's own descriptor of the restored file, as granted
    opener_uid: int = 0  # who opened it: a command written through it must come from that uid (or root's open)
    session: Instance | None = None  # a LUO session fd (kexecfs run opened it): its close ends the session
    machine: LiveUpdate | None = None  # the machine the session belongs to (a kexec replaces it)

    def check_opener(self, caller: Caller) -> None:
        """A command must come from whoever opened the file, unless root opened it and handed it on.

        The descriptor a command names is taken from the *writer's* process. Without this
        rule an owner could pass its open ``fd_preserve`` to a set-uid program as its
        output, and a number that program prints would move the program's own descriptor
        (an open /etc/shadow, say) into the owner's instance: the kernel's /proc files
        guard against the same confused deputy by checking the opener's credentials.
        """
        if caller.uid != self.opener_uid and self.opener_uid != 0:
            raise fail(errno.EACCES, f"{caller} wrote through a file opened by uid {self.opener_uid}: commands "
                                     f"are taken only from the uid that opened the file")


class KexecfsOperations(pyfuse3.Operations):
    """pyfuse3 operations for one kexecfs mount."""

    supports_dot_lookup = True
    enable_writeback_cache = False  # writes must arrive synchronously, from their writer

    def __init__(self, machine: LiveUpdate, passthrough: bool = True,
                 handle_numbers: Iterator[int] | None = None) -> None:
        super().__init__()
        self.machine = machine
        self.passthrough = passthrough  # off: every restored file is served by the proxy (tests, debugging)
        self.nursery: trio.Nursery | None = None  # set by the daemon before serving
        self.state_version = 0
        self.mounted_ns = time.time_ns()
        self._pollers: list[pyfuse3.PollHandle] = []
        self.handles: dict[int, Handle] = {}  # by fh; the ioctl dispatch finds its file here
        self.device_lock = sessions.DeviceLock(GLOBAL_BY_NAME["control"].offset)
        # (launcher's thread id, instance inode) -> the session its next open of control binds
        self.pending_sessions: dict[tuple[int, int], Instance] = {}
        # Never a number an open file of a previous daemon of this connection still has.
        self._next_fh = handle_numbers or itertools.count(1)
        self._token_keys: dict[int, tuple[int, int]] = {}  # fds/<token> inode -> (instance inode, token)
        self._attach(machine)

    # ------------------------------------------------------------------ the machine

    def _attach(self, machine: LiveUpdate) -> None:
        self.machine = machine
        machine.listeners.append(self._state_changed)
        # A resumed machine's files: the kernel may ask about their inodes before any lookup.
        for inst in machine.instances.values():
            for token, pf in inst.files.items():
                self._token_keys[pf.ino] = (inst.ino, token)

    def _state_changed(self) -> None:
        self.state_version += 1
        pollers, self._pollers = self._pollers, []
        for ph in pollers:
            ph.notify()

    def live_instance(self, h: Handle) -> Instance:
        inst = self.machine.by_ino.get(h.instance_ino)
        if inst is None:
            raise fail(errno.ENODEV, "the instance of this open file was removed")
        return inst

    async def run_event(self, event: str, caller: Caller, inst: Instance | None = None) -> None:
        """An event through any door (see :meth:`LiveUpdate.request`); slow work runs in a
        thread while reads go on."""
        work = self.machine.request(event, caller, inst)
        if event not in SLOW_EVENTS:
            work()
            return
        await trio.to_thread.run_sync(work)
        if event == "kexec":
            await self._reboot()

    async def _reboot(self) -> None:
        """The second half of a simulated kexec: a fresh machine recovered from the image alone,
        swapped in at once (requests meanwhile see the old machine, frozen)."""
        old = self.machine
        # The old kernel is gone: nothing may change its machine while the next boot
        # recovers (a mkdir there would be dropped, a cancel would retire the image).
        old.busy = "kexec"
        new = await trio.to_thread.run_sync(old.reboot)
        old.listeners.remove(self._state_changed)
        self._attach(new)
        self._state_changed()
        for name in old.instances:  # the kernel may have cached these names for DIR_TIMEOUT
            if name not in new.instances:
                await trio.to_thread.run_sync(_forget_entry, name)

    # ------------------------------------------------------------------ inodes

    def _token_ino(self, inst: Instance, token: int) -> int:
        ino = inst.files[token].ino
        self._token_keys[ino] = (inst.ino, token)
        return ino

    def answered_before(self, unique: int | None) -> int | None:
        """For a request the kernel resent (the previous daemon died serving it): the errno
        it was answered with (0: done) if its effect is in the journal already; None if
        it is to be done now."""
        if unique is None or not unique & RESENT:
            return None
        return self.machine.record.answered(unique & ~RESENT)

    def _resolve(self, ino: int) -> tuple[Node | None, Instance | None, PreservedFile | None]:
        """(node, instance, preserved file) of an inode; ESTALE if it no longer exists.

        ESTALE, not ENOENT: the kernel may hold a dentry of a removed instance (for
        DIR_TIMEOUT, or forever for one the daemon removed itself, as a closed session),
        and on ESTALE the VFS looks the path up again instead of failing it, so the new
        instance of the same name is found, or the path fails with ENOENT after all."""
        if ino == ROOT_INO:
            return None, None, None
        if ino in GLOBAL_BY_INO:
            return GLOBAL_BY_INO[ino], None, None
        if ino >= FIRST_TOKEN_INO:
            inst_ino, token = self._token_keys.get(ino, (0, 0))
            inst = self.machine.by_ino.get(inst_ino)
            if inst is not None and token in inst.files and inst.files[token].ino == ino:
                return None, inst, inst.files[token]
        else:
            offset = ino % INO_STRIDE
            inst = self.machine.by_ino.get(ino - offset)
            if inst is not None and (offset == 0 or offset in INSTANCE_BY_OFFSET):
                return INSTANCE_BY_OFFSET.get(offset), inst, None
        raise pyfuse3.FUSEError(errno.ESTALE)

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        node, inst, pf = self._resolve(ino)
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.entry_timeout = a.attr_timeout = DIR_TIMEOUT
        a.st_nlink = 1
        if pf is not None:
            # The size needs the file's descriptor. This is the first request of each
            # restore and each stat (a LOOKUP), and the next tokens' are likely needed next.
            inst.warm_from(pf.token)  # type: ignore[union-attr]
            a.st_mode = stat.S_IFREG | pf.permission_bits()
            a.st_size = pf.size
            a.entry_timeout, a.attr_timeout = 0, TOKEN_ATTR_TIMEOUT
        elif node is None and inst is None:
            a.st_mode, a.st_nlink = stat.S_IFDIR | 0o755, 2 + len(self.machine.instances)
        elif node is None:
            a.st_mode, a.st_nlink = stat.S_IFDIR | inst.mode, 3  # type: ignore[union-attr]
        else:
            a.st_mode = node.mode
            a.st_nlink = 2 if node.is_dir else 1
        if inst is not None:
            a.st_uid, a.st_gid = inst.uid, inst.gid
        a.st_blksize = 4096
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = self.mounted_ns
        return a

    def _children(self, ino: int) -> list[tuple[str, int]]:
        node, inst, pf = self._resolve(ino)
        if ino == ROOT_INO:
            return [(n.name, n.offset) for n in GLOBAL_BY_NAME.values()] + sorted(
                (i.name, i.ino) for i in self.machine.instances.values())
        if inst is not None and node is None and pf is None:
            return [(n.name, inst.ino + n.offset) for n in INSTANCE_BY_NAME.values()]
        if inst is not None and node is not None and node.offset == FDS_OFFSET:
            return [(str(t), self._token_ino(inst, t)) for t in sorted(inst.files)]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def _child(self, parent: int, name: str) -> int:
        """The inode of ``name`` in directory ``parent`` (a direct look-up: no listing)."""
        node, inst, pf = self._resolve(parent)
        if parent == ROOT_INO:
            if name in GLOBAL_BY_NAME:
                return GLOBAL_BY_NAME[name].offset
            if name in self.machine.instances:
                return self.machine.instances[name].ino
        elif inst is not None and node is None and pf is None:
            if name in INSTANCE_BY_NAME:
                return inst.ino + INSTANCE_BY_NAME[name].offset
        elif inst is not None and node is not None and node.offset == FDS_OFFSET:
            if name.isascii() and name.isdigit() and str(int(name)) == name and int(name) in inst.files:
                return self._token_ino(inst, int(name))
        else:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        raise pyfuse3.FUSEError(errno.ENOENT)

    # ------------------------------------------------------------------ lookups

    @handler
    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        text = name.decode(errors="surrogateescape")
        if text == ".":
            return self._attrs(parent_inode)
        if text == "..":
            _node, inst, _pf = self._resolve(parent_inode)
            if parent_inode == ROOT_INO or inst is None:
                return self._attrs(ROOT_INO)
            return self._attrs(inst.ino if parent_inode != inst.ino else ROOT_INO)
        return self._attrs(self._child(parent_inode, text))

    @handler
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(inode)

    @handler
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node, inst, pf = self._resolve(inode)
        caller = Caller(ctx.pid, ctx.uid, ctx.gid, "setattr")
        if (done := self.answered_before(_unique())) is not None:
            return _as_before(done, self._attrs(inode))
        if fields.update_size:
            if pf is not None:
                # A truncate writes: only as the preserved descriptor could have (not read-only, not O_APPEND).
                restored = self.machine.restore(inst, caller, pf.token,  # type: ignore[arg-type]
                                                os.O_WRONLY | os.O_TRUNC)
                os.ftruncate(restored.fd, attr.st_size)
            elif node is None or node.is_dir:
                raise pyfuse3.FUSEError(errno.EISDIR)
            # Otherwise "echo x > file" truncating a pseudo file: a no-op, as in sysfs.
        chown = fields.update_uid or fields.update_gid
        if (chown or fields.update_mode) and inst is None:
            raise fail(errno.EPERM, "chown/chmod: the top of the mount belongs to root")
        if chown or fields.update_mode:
            assert inst is not None
            self.machine.check_instances_open(f"chown/chmod of instance {inst.name!r}")
        if chown:
            # Delegation (cgroup style): one owner for the instance and all its files.
            if ctx.uid != 0:
                raise fail(errno.EPERM, f"chown of instance {inst.name!r}: only root delegates instances; "
                                        f"refused {caller}")
            inst.uid = attr.st_uid if fields.update_uid else inst.uid
            inst.gid = attr.st_gid if fields.update_gid else inst.gid
            log.info("instance %r delegated to uid %d gid %d by %s", inst.name, inst.uid, inst.gid, caller)
        if fields.update_mode:
            if node is not None or pf is not None:
                raise fail(errno.EPERM, "chmod: only instance directories have a mode of their own")
            inst.check_owner(caller, "chmod")
            inst.mode = stat.S_IMODE(attr.st_mode)
        if chown or fields.update_mode:
            self.machine.instance_changed(inst)  # type: ignore[arg-type]
        return self._attrs(inode)

    # ------------------------------------------------------------------ directories

    @handler
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._children(inode)  # ENOTDIR/ENOENT now rather than at readdir
        return inode

    @handler
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._children(fh)
        node, inst, _pf = self._resolve(fh)
        if inst is not None and node is not None and node.offset == FDS_OFFSET:
            # Each entry's attributes carry its size: the stored descriptors of about one
            # reply's worth of entries come from the store in one go, not one by one.
            prefetch([inst.files[int(name)] for name, _ino in entries[start_id:start_id + READDIR_PREFETCH]
                      if int(name) in inst.files])
        for i, (name, ino) in enumerate(entries[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name.encode(), self._attrs(ino), i):
                break

    @handler
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO:
            raise fail(errno.EPERM, "mkdir: instances exist only at the top of the mount")
        if (done := self.answered_before(_unique())) is not None:
            return _as_before(done, lambda: self._attrs(self._child(ROOT_INO, name.decode(errors="surrogateescape"))))
        caller = Caller(ctx.pid, ctx.uid, ctx.gid, "mkdir")
        inst = self.machine.create_instance(name.decode(errors="surrogateescape"), caller,
                                            mode & ~ctx.umask & 0o7777)
        return self._attrs(inst.ino)

    @handler
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        text = name.decode(errors="surrogateescape")
        if parent_inode != ROOT_INO:
            raise pyfuse3.FUSEError(errno.EPERM if text == "fds" else errno.ENOTDIR)
        if text in GLOBAL_BY_NAME:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        if (done := self.answered_before(_unique())) is not None:
            return _as_before(done, None)
        self.machine.remove_instance(text, Caller(ctx.pid, ctx.uid, ctx.gid, "rmdir"))

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_files = len(self.machine.instances)
        s.f_namemax = 63
        return s

    # ------------------------------------------------------------------ files

    @handler
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node, inst, pf = self._resolve(inode)
        if node is not None and node.is_dir:
            raise pyfuse3.FUSEError(errno.EISDIR)
        h = Handle(node, inst.ino if inst else 0, seen=self.state_version, opener_uid=ctx.uid)
        fh = file_handle(ctx.uid, next(self._next_fh))
        if pf is not None:
            assert inst is not None
            caller = Caller(ctx.pid, ctx.uid, ctx.gid, f"open {inst.name}/fds/{pf.token}")
            h.restored_fd = restored.open_restored(self.machine, inst, pf, caller, flags)
        elif node is not None and node.control:
            self._open_control(h, fh, inst, Caller(ctx.pid, ctx.uid, ctx.gid, "open control"))
            fh |= SESSION_FH if h.session is not None else 0
        self.handles[fh] = h
        if pf is not None:
            restored.serve(fh, h.restored_fd, pf, self.passthrough)
        # direct_io: pseudo files have no size the page cache could trust, and a proxied
        # restored file must not be cached apart from the memfd it stands for.
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False)

    def _handle(self, fh: int, ino: int | None = None) -> Handle:
        """The open file ``fh``; one opened before this daemon started is taken over."""
        h = self.handles.get(fh)
        return h if h is not None else self.taken_over(fh, _request_ino() if ino is None else ino)

    def taken_over(self, fh: int, ino: int, serve_io: bool = True) -> Handle:
        """The handle of a file a previous daemon of this connection opened (the kernel keeps
        sending its ``fh``), rebuilt from the request: its inode, its open flags, and what
        the handle number says (:func:`file_handle`). ``serve_io``: a restored file gets its
        own descriptor again, with the access its open flags ask (checked again)."""
        try:
            node, inst, pf = self._resolve(ino)
        except pyfuse3.FUSEError:
            raise fail(errno.ENODEV, f"open file {fh:#x} (opened before a restart of the daemon): its "
                                     f"file is gone") from None
        if (node is None and pf is None) or (node is not None and node.is_dir):
            raise fail(errno.EBADF, f"open file {fh:#x} is not a file of this mount")
        h = Handle(node, inst.ino if inst else 0, opener_uid=fh >> 32)
        if pf is not None and serve_io:
            h.restored_fd = restored.reopen_granted(pf, fusehook.last_request_flags())
        if fh & SESSION_FH and inst is not None and node is not None and node.control:
            h.session, h.machine = inst, self.machine
        if node is not None and node.control and inst is None:
            self.device_lock.holders.setdefault(fh >> 32, fh)
        self.handles[fh] = h
        log.info("took over open file %#x of %s%s from the previous daemon", fh, f"{inst.name}/" if inst else "",
                 node.name if node else f"fds/{pf.token}")  # type: ignore[union-attr]
        return h

    @handler
    async def read(self, fh: int, off: int, size: int) -> bytes:
        h = self._handle(fh)
        if h.restored_fd >= 0:
            return os.pread(h.restored_fd, size, off)
        assert h.node is not None
        if h.node.show is None:
            raise pyfuse3.FUSEError(errno.EINVAL)
        if off == 0 or not h.text:  # (a file taken over at a restart has no rendering yet)
            inst = self.live_instance(h) if h.node.scope is Scope.INSTANCE else None
            h.text = h.node.show(self, inst).encode()
            h.seen = self.state_version
        return h.text[off:off + size]

    @handler
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        pid, uid, gid = fusehook.last_request_ctx()  # valid only until the first await
        if (done := self.answered_before(_unique())) is not None:
            return _as_before(done, len(buf))
        h = self._handle(fh)
        if h.restored_fd >= 0:
            # Its descriptor has the granted flags: on an O_APPEND one, pwrite appends.
            return os.pwrite(h.restored_fd, buf, off)
        assert h.node is not None
        inst = self.live_instance(h) if h.node.scope is Scope.INSTANCE else None
        via = f"{inst.name}/{h.node.name}" if inst else h.node.name
        caller = Caller(pid, uid, gid, via)
        if h.node.store is None:
            raise fail(errno.EINVAL, f"{via} is read-only; {caller} wrote to it")
        h.check_opener(caller)
        try:
            command = buf.decode("ascii").strip()
        except UnicodeDecodeError:
            raise fail(errno.EINVAL, f"{via}: {caller} wrote bytes that are not ASCII text") from None
        if not command or "\n" in command:
            raise fail(errno.EINVAL, f"{via}: {caller} wrote {len(buf)} bytes that are not one command")
        await h.node.store(self, inst, caller, command)
        return len(buf)

    def _open_control(self, h: Handle, fh: int, inst: Instance | None, caller: Caller) -> None:
        """The top-level control is /dev/liveupdate (exclusive); an instance's control that
        kexecfs run opens for a CREATE/RETRIEVE_SESSION it forwarded becomes a session fd."""
        if inst is None:
            self.device_lock.take(fh, caller, self.handles)
        elif (session := self.pending_sessions.pop((caller.pid, inst.ino), None)) is not None:
            h.session, h.machine = session, self.machine

    @handler
    async def release(self, fh: int) -> None:
        pid, uid, gid = fusehook.last_request_ctx()
        if fh not in self.handles:
            try:  # opened before a restart: what its close must do (a session fd's ends the session)
                self.taken_over(fh, _request_ino(), serve_io=False)
            except KexecfsError:
                pass  # its file is gone: nothing to release
        if pause := delay("release"):
            await trio.sleep(pause)
        h = self.handles.pop(fh, None)
        self.device_lock.release(fh)
        if h is not None and h.restored_fd >= 0:
            os.close(h.restored_fd)
        if h is not None and h.session is not None and h.machine is self.machine:
            self.machine.close_session(h.session, Caller(pid, uid, gid, "close of a session fd"))

    @handler
    async def poll(self, inode: int, fh: int, ph: pyfuse3.PollHandle | None,
                   ctx: pyfuse3.RequestContext) -> int:
        h = self._handle(fh, inode)
        if h.node is None or not h.node.pollable:
            return select.POLLIN | select.POLLOUT  # always ready, as regular files are
        if h.seen != self.state_version:
            return READY
        if ph is not None:
            self._pollers.append(ph)
        return 0

    @handler
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        # What open() of fds/<token> cannot carry: the preserved file position and seals,
        # for clients that want to reinstate them (kexecfs.client does).
        _node, inst, pf = self._resolve(inode)
        key = name.decode(errors="replace")
        if pf is not None and key in ("user.kexecfs.pos", "user.kexecfs.seals", "user.kexecfs.kind"):
            inst.check_owner(Caller(ctx.pid, ctx.uid, ctx.gid, f"getxattr {key}"), "getxattr")  # type: ignore[union-attr]
            value = pf.kind.name if key.endswith("kind") else pf.record.get(key.rsplit(".", 1)[1], 0)
            return str(value).encode()
        if pf is not None and key == "user.kexecfs.problem":
            # What prepare would refuse this file for, asked before the update (kexecfs check).
            inst.check_owner(Caller(ctx.pid, ctx.uid, ctx.gid, f"getxattr {key}"), "getxattr")  # type: ignore[union-attr]
            return self.machine.problem(pf).encode()
        raise pyfuse3.FUSEError(errno.ENODATA)


def _request_ino() -> int:
    """The inode of the request being served (pyfuse3 passes read, write and release only
    the fh); valid until the handler's first await."""
    return fusehook.last_request()[2]


def _unique() -> int | None:
    try:
        return fusehook.last_request()[0]
    except RuntimeError:
        return None


def _as_before(errno_: int, result: Any) -> Any:
    """Answer a resent request as the previous daemon answered it before it died."""
    if errno_:
        raise pyfuse3.FUSEError(errno_)
    return result() if callable(result) else result


def _forget_entry(name: str) -> None:
    """Drop the kernel's cached dentry of a vanished instance (in a thread: the kernel
    may need this daemon to answer other requests before it can take the lock)."""
    try:
        pyfuse3.invalidate_entry(ROOT_INO, name.encode())
    except OSError:
        pass  # not cached: nothing to forget


__all__ = ["KexecfsOperations", "NODES", "State"]
