"""Preservable file kinds, one small plug-in each (LUO's per-file "compatible" handlers).

A kind knows how to recognise a descriptor (``accepts``), what to remember of it
(``capture``), whether it can still be preserved (``validate``, at prepare), how to put
it into the handover image (``serialize``) and how to bring it back after a kexec
(``restore``). Adding a kind is one module and one line in :data:`KINDS`.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, ClassVar

from ..errors import fail
from ..image import HandoverImage, ImageWriter
from .. import syscalls


class Kind:
    """The interface every preservable kind implements."""

    name: ClassVar[str]

    @staticmethod
    def accepts(st: os.stat_result, fs_type: int) -> bool:
        raise NotImplementedError

    def capture(self, fd: int) -> dict[str, Any]:
        """What to remember of ``fd`` when it is preserved (msgpack-able fields)."""
        raise NotImplementedError

    def validate(self, fd: int) -> None:
        """Raise KexecfsError if ``fd`` can no longer be preserved (checked at prepare)."""
        st = os.fstat(fd)
        if not self.accepts(st, syscalls.fstatfs_type(fd)):
            raise fail(errno.ENOENT, f"is no longer a {self.name}: {describe(fd)}")

    def serialize(self, fd: int, writer: ImageWriter, previous: dict[str, Any] | None) -> dict[str, Any]:
        """The image record fields of ``fd``; ``previous`` is what prepare wrote, at freeze."""
        raise NotImplementedError

    def restore(self, record: dict[str, Any], image: HandoverImage) -> int:
        """A new descriptor for what ``record`` describes (after a kexec)."""
        raise NotImplementedError


def access_flags(flags: int) -> str:
    """The ``rw``/``r``/``w`` column of ``fd_preserve`` listings (``a`` marks O_APPEND)."""
    mode = {os.O_RDONLY: "r", os.O_WRONLY: "w", os.O_RDWR: "rw"}.get(flags & os.O_ACCMODE, "?")
    return mode + ("a" if flags & os.O_APPEND else "")


_FS_NAMES = {
    syscalls.TMPFS_MAGIC: "tmpfs", syscalls.HUGETLBFS_MAGIC: "hugetlbfs", syscalls.RAMFS_MAGIC: "ramfs",
    syscalls.PROC_SUPER_MAGIC: "procfs", syscalls.SYSFS_MAGIC: "sysfs", syscalls.DEBUGFS_MAGIC: "debugfs",
    syscalls.TRACEFS_MAGIC: "tracefs", syscalls.CGROUP2_SUPER_MAGIC: "cgroup2",
    syscalls.DEVPTS_SUPER_MAGIC: "devpts", syscalls.FUSE_SUPER_MAGIC: "a FUSE filesystem",
}


def describe(fd: int) -> str:
    """What ``fd`` is, in words fit for a log line ("a pipe", "a linked tmpfs file", ...)."""
    st = os.fstat(fd)
    fs_type = syscalls.fstatfs_type(fd)
    mode = st.st_mode
    if stat.S_ISFIFO(mode):
        return "a pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a directory"
    if not stat.S_ISREG(mode):
        return f"a special file (mode {mode:o})"
    if fs_type == syscalls.HUGETLBFS_MAGIC:
        return "a hugetlb memfd" if st.st_nlink == 0 else "a hugetlbfs file"
    if fs_type == syscalls.TMPFS_MAGIC:
        return "a memfd" if st.st_nlink == 0 else "a linked tmpfs file"
    where = _FS_NAMES.get(fs_type, f"a filesystem of type {fs_type:#x}")
    return f"a regular file on {where}"


def non_persistent(fs_type: int) -> bool:
    """Filesystems whose files do not outlive a kexec, or that cannot be reopened by handle."""
    return fs_type in _FS_NAMES


from .memfd import Memfd  # noqa: E402  (the plug-ins import the base class above)
from .regular import RegularFile  # noqa: E402

KINDS: dict[str, Kind] = {kind.name: kind for kind in (Memfd(), RegularFile())}


def detect(fd: int) -> Kind:
    """The kind that can preserve ``fd``; ENOENT (as LUO) naming what it is otherwise."""
    st = os.fstat(fd)
    fs_type = syscalls.fstatfs_type(fd)
    for kind in KINDS.values():
        if kind.accepts(st, fs_type):
            return kind
    raise fail(errno.ENOENT, f"is {describe(fd)}; only memfds and regular files on persistent "
                             f"filesystems can be preserved")

