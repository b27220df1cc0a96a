"""What every preservable kind is: the :class:`Kind` interface, and words for what a
descriptor is (for refusals and log lines).

A kind knows how to recognise a descriptor (``accepts``), what to remember of it
(``capture``), whether it can still be preserved (``validate``, at prepare), how to put
it into the handover image (``serialize``) and how to bring it back after a kexec
(``restore``). The image hands the kinds its writer and reader; the kinds know them
only by the two protocols below, so that the image may import the kinds.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any, ClassVar, Protocol

from ..errors import fail
from .. import syscalls


class ContentsWriter(Protocol):
    """How a kind puts contents into the image being written (``image.ContentsWriter``)."""

    def copy_contents(self, fd: int, size: int, mapped: bool = False) -> list[Any]: ...

    def refresh_contents(self, fd: int, size: int, previous: list[Any], mapped: bool = False) -> list[Any]: ...


class ContentsReader(Protocol):
    """How a kind takes contents back out of an image (``image.ContentsReader``)."""

    def copy_into(self, fd: int, extents: list[Any]) -> None: ...


class Kind:
    """The interface every preservable kind implements."""

    name: ClassVar[str]
    #: The fields of this kind's image records, with their types (the image's schema check);
    #: integers are unsigned 64-bit (sizes and positions 63-bit) unless :meth:`check_record`
    #: says otherwise.
    fields: ClassVar[dict[str, type]] = {}
    optional_fields: ClassVar[dict[str, type]] = {}
    #: Whether the image holds the file's contents (and so counts against bytes.max).
    stores_contents: ClassVar[bool] = False

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

    def serialize(self, fd: int, writer: ContentsWriter, previous: dict[str, Any] | None) -> dict[str, Any]:
        """The image record fields of ``fd``; ``previous`` is what prepare wrote, at freeze."""
        raise NotImplementedError

    def restore(self, record: dict[str, Any], image: ContentsReader) -> int:
        """A new descriptor for what ``record`` describes (after a kexec)."""
        raise NotImplementedError

    def check_record(self, record: dict[str, Any]) -> str | None:
        """Why ``record``, read from an image, cannot be restored as this kind (None if it can)."""
        for key, typ in [*self.fields.items(), *((k, t) for k, t in self.optional_fields.items() if k in record)]:
            value = record.get(key)
            if not isinstance(value, typ) or isinstance(value, bool):
                return f"field {key!r} missing or not {typ.__name__}"
            # Sizes and positions are off_t; the rest (inode numbers, say) may use all 64 bits.
            if isinstance(value, int) and not 0 <= value < 1 << (63 if key in ("size", "pos") else 64):
                return f"field {key!r} = {value} out of range"
            if isinstance(value, str) and "\0" in value:
                return f"field {key!r} holds a NUL character"
        return None


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
    return f"a {'deleted ' if st.st_nlink == 0 else ''}regular file on {where}"


def non_persistent(fs_type: int) -> bool:
    """Filesystems whose files do not outlive a kexec, or that cannot be reopened by handle."""
    return fs_type in _FS_NAMES
