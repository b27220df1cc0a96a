"""The mini file system of the C extension's tests, in the child process that serves it.

A test module's daemon script (run by :func:`harness.mini_daemon`) subclasses
:class:`MiniOps` with what its files do and hands it to :func:`serve`. The tree is one
flat directory of files named in a table (name -> inode number); every file is a
0666 regular file, sized by :meth:`MiniOps.size`. Opens are direct_io, with the inode
number as the handle unless a subclass says otherwise.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Awaitable, Callable

import kexecfs.fs.fusehook as fusehook  # before pyfuse3
import pyfuse3  # noqa: E402
import trio  # noqa: E402

ROOT_INO = 1


class MiniOps(pyfuse3.Operations):
    """A directory of ``files`` (name: inode number); reads and writes are the subclass's."""

    def __init__(self, files: dict[bytes, int]) -> None:
        super().__init__()
        self.files = files

    def size(self, ino: int) -> int:
        return 0

    def attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = ino
        if ino == ROOT_INO:
            entry.st_mode = stat.S_IFDIR | 0o755
        else:
            entry.st_mode = stat.S_IFREG | 0o666
            entry.st_size = self.size(ino)
        entry.st_nlink = 1
        return entry

    async def lookup(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if parent_inode != ROOT_INO or name not in self.files:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.attrs(self.files[name])

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: int | None, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(inode)  # O_TRUNC of a file: a no-op

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        for i, (name, ino) in enumerate(list(self.files.items())[start_id:], start_id + 1):
            if not pyfuse3.readdir_reply(token, name, self.attrs(ino), i):
                break

    async def releasedir(self, fh: int) -> None:
        pass

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, direct_io=True)

    async def flush(self, fh: int) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass


def serve(ops: MiniOps, mountpoint: str, fsname: str, main: Callable[[], Awaitable[None]] = pyfuse3.main,
          ready: Callable[[], None] = lambda: None) -> None:
    """Mount ``ops`` (allow_other as root, so that other uids get in), check that the C
    hook is live, run ``ready``, print READY and serve with ``main`` until unmounted."""
    options = set(pyfuse3.default_options) | {f"fsname={fsname}"}
    if os.geteuid() == 0:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)
    fusehook.ensure_live()
    ready()
    print("READY", flush=True)
    try:
        trio.run(main)
    finally:
        pyfuse3.close(unmount=False)
