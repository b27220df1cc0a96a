"""The floor of the kexecfs stack: the smallest pyfuse3 filesystem with kexecfs's shape.

Same stack as kexecfs (pyfuse3 + trio + the kexecfs._fusehook C extension, loaded
before pyfuse3 so that FUSE_IOCTL works), same FUSE options (default_permissions,
allow_other), same open flags (direct_io, no keep_cache) and the same entry/attribute
timeouts (1 s; for ``fds/<token>`` entries 0 and attributes 1 ms). Every handler does the least it can: constant
texts, writes accepted and dropped, ioctls answered synchronously from the hook's
callback. The tree mirrors kexecfs's, so the benchmark client uses the same paths::

    state  control  status  inst/{state,fd_preserve,fd_unpreserve,control,fds/<token>}

where ``fds/<token>`` is any decimal token, each its own inode, so that a restore of many
files walks as many names as kexecfs's does.

Usage: python bench/floorfs.py MOUNTPOINT   (serves in the foreground until unmounted)

Environment: FLOOR_TAKE=1 makes preserves take the caller's descriptor (see TAKE);
FLOOR_IOCTL_VIA_TASK=1 answers ioctls from a trio task as kexecfs does (diagnosis).
"""

from __future__ import annotations

import errno
import os
import signal
import stat
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kexecfs.fs import fusehook  # noqa: E402  (must precede pyfuse3)
import pyfuse3  # noqa: E402
import trio  # noqa: E402

from kexecfs import abi  # noqa: E402
from kexecfs.core.capture import take_descriptor  # noqa: E402
from kexecfs.core.machine import State  # noqa: E402

TIMEOUT = 1.0  # kexecfs.fs.operations.DIR_TIMEOUT
# GET_STATE's answer, packed once: the floor is always normal.
NORMAL = abi.STATE.pack(State.NORMAL.number)
# FLOOR_TAKE=1: fd_preserve and FD_PRESERVE also take the caller's descriptor (pidfd_open +
# pidfd_getfd, then close it), the least work a preserve has to do: a second floor, for
# the preserve rows.
TAKE = bool(os.environ.get("FLOOR_TAKE"))
TEXT = {2: b"normal\n", 4: b"state: normal\n", 17: b"normal\n", 18: b""}
NOW = time.time_ns()

# inode: (name, parent, mode, entry timeout); fds/<token>'s attributes: kexecfs's TOKEN_ATTR_TIMEOUT
TREE = {
    1: ("", 1, stat.S_IFDIR | 0o755, TIMEOUT),
    2: ("state", 1, stat.S_IFREG | 0o644, TIMEOUT),
    3: ("control", 1, stat.S_IFREG | 0o644, TIMEOUT),
    4: ("status", 1, stat.S_IFREG | 0o444, TIMEOUT),
    16: ("inst", 1, stat.S_IFDIR | 0o755, TIMEOUT),
    17: ("state", 16, stat.S_IFREG | 0o644, TIMEOUT),
    18: ("fd_preserve", 16, stat.S_IFREG | 0o644, TIMEOUT),
    19: ("fd_unpreserve", 16, stat.S_IFREG | 0o200, TIMEOUT),
    20: ("control", 16, stat.S_IFREG | 0o600, TIMEOUT),
    21: ("fds", 16, stat.S_IFDIR | 0o755, TIMEOUT),
}
FDS, TOKEN_BASE = 21, 1 << 48  # kexecfs numbers a token's inode from 1 << 48 too
CHILDREN: dict[int, dict[bytes, int]] = {}
for _ino, (_name, _parent, _mode, _t) in TREE.items():
    if _ino != 1:
        CHILDREN.setdefault(_parent, {})[_name.encode()] = _ino


def _make_attrs(ino: int) -> pyfuse3.EntryAttributes:
    _name, _parent, mode, timeout = TREE[ino] if ino < TOKEN_BASE else ("", FDS, stat.S_IFREG | 0o600, 0.0)
    a = pyfuse3.EntryAttributes()
    a.st_ino = ino
    a.st_mode = mode
    a.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    a.st_size = 1 << 20 if ino >= TOKEN_BASE else 0
    a.st_blksize = 4096
    a.entry_timeout = timeout
    a.attr_timeout = timeout or 0.001
    a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = NOW
    return a


ATTRS = {ino: _make_attrs(ino) for ino in TREE}


def _attrs(ino: int) -> pyfuse3.EntryAttributes:
    if ino not in ATTRS:  # a token's, made once at its first lookup
        ATTRS[ino] = _make_attrs(ino)
    return ATTRS[ino]


class FloorFS(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    async def lookup(self, parent_inode, name, ctx):
        if parent_inode == FDS and name.isdigit():
            return _attrs(TOKEN_BASE + int(name))
        try:
            return ATTRS[CHILDREN[parent_inode][name]]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    async def getattr(self, inode, ctx):
        return _attrs(inode)

    async def setattr(self, inode, attr, fields, fh, ctx):
        return _attrs(inode)

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        for i, (name, ino) in enumerate(list(CHILDREN.get(fh, {}).items())[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, ATTRS[ino], i):
                break

    async def open(self, inode, flags, ctx):
        return pyfuse3.FileInfo(fh=inode, direct_io=True, keep_cache=False)

    async def read(self, fh, off, size):
        return TEXT.get(fh, b"")[off:off + size]

    async def write(self, fh, off, buf):
        if TAKE and fh == 18:  # fd_preserve
            pid, _uid, _gid = fusehook.last_request_ctx()
            os.close(take_descriptor(pid, int(buf.split()[0])))
        return len(buf)

    async def release(self, fh):
        pass


def ioctl(req, ino, cmd, fh, flags, in_data, out_size, arg, pid, uid, gid):
    """Answer any LUO command at once (GET_STATE: normal); everything else ENOTTY."""
    if (cmd >> 8) & 0xFF == abi.LIVEUPDATE_IOCTL_TYPE:
        if TAKE and cmd == abi.FD_PRESERVE:
            fd, _flags, _token = abi.LIVEUPDATE_FD.unpack_from(in_data)
            os.close(take_descriptor(pid, fd))
        fusehook.reply_ioctl(req, NORMAL if cmd == abi.GET_STATE else bytes(out_size))
    else:
        fusehook.reply_err(req, errno.ENOTTY)


NURSERY: trio.Nursery | None = None


def ioctl_via_task(*args):
    """FLOOR_IOCTL_VIA_TASK=1: answer from a new trio task, as kexecfs does (diagnosis)."""
    async def answer():
        ioctl(*args)
    NURSERY.start_soon(answer)


async def _main() -> None:
    global NURSERY
    async with trio.open_nursery() as nursery:
        NURSERY = nursery

        async def stop() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return
        nursery.start_soon(stop)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main() -> None:
    mnt = sys.argv[1]
    options = set(pyfuse3.default_options) | {"fsname=floorfs", "subtype=floorfs", "allow_other"}
    pyfuse3.init(FloorFS(), mnt, options)
    fusehook.ensure_live()
    fusehook.set_ioctl_handler(ioctl_via_task if os.environ.get("FLOOR_IOCTL_VIA_TASK") else ioctl)
    try:
        trio.run(_main)
    finally:
        fusehook.set_ioctl_handler(None)
        pyfuse3.close(unmount=True)


if __name__ == "__main__":
    main()
