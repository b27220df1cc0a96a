"""A regular file on a persistent filesystem: remembered by file handle and path.

Its contents stay where they are (the disk survives a kexec); the image only holds
how to find the same file again and how it was open.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from typing import Any

from ..errors import fail
from .. import syscalls
from .base import ContentsReader, ContentsWriter, Kind, non_persistent


# The open flags that describe how the file was open, as opposed to how it was opened.
_KEPT_FLAGS = os.O_ACCMODE | os.O_APPEND | os.O_SYNC | os.O_DSYNC | os.O_NOATIME | getattr(os, "O_DIRECT", 0)


class RegularFile(Kind):
    name = "file"
    fields = {"size": int, "pos": int, "flags": int, "path": str, "dev": int, "ino": int}
    optional_fields = {"handle_type": int, "handle": bytes}

    @staticmethod
    def accepts(st: os.stat_result, fs_type: int) -> bool:
        return stat.S_ISREG(st.st_mode) and not non_persistent(fs_type) and st.st_nlink > 0

    def capture(self, fd: int) -> dict[str, Any]:
        st = os.fstat(fd)
        record: dict[str, Any] = {
            "size": st.st_size, "pos": os.lseek(fd, 0, os.SEEK_CUR),
            "flags": fcntl.fcntl(fd, fcntl.F_GETFL) & _KEPT_FLAGS,
            "path": os.readlink(f"/proc/self/fd/{fd}"), "dev": st.st_dev, "ino": st.st_ino,
        }
        try:
            record["handle_type"], record["handle"], _mount_id = syscalls.name_to_handle(fd)
        except OSError:
            pass  # filesystems without export support: the path alone will have to do
        return record

    def serialize(self, fd: int, writer: ContentsWriter, previous: dict[str, Any] | None) -> dict[str, Any]:
        return self.capture(fd)

    def check_record(self, record: dict[str, Any]) -> str | None:
        problem = super().check_record(record)
        if problem:
            return problem
        if record["flags"] & ~_KEPT_FLAGS:
            # The flags are passed to open(): O_CREAT or O_TRUNC there must never come from an image.
            return f"open flags {record['flags']:#o} beyond those a preserved file keeps"
        if not record["path"].startswith("/"):
            return f"path {record['path'][:80]!r} is not absolute"
        if ("handle" in record) != ("handle_type" in record) or len(record.get("handle", b"")) > 128 \
                or record.get("handle_type", 0) >= 1 << 31:
            return "file handle incomplete or longer than MAX_HANDLE_SZ"
        return None

    def restore(self, record: dict[str, Any], image: ContentsReader) -> int:
        flags = record["flags"] | os.O_CLOEXEC
        fd = self._open_by_handle(record, flags)
        if fd is None:
            try:
                fd = os.open(record["path"], flags)
            except OSError as exc:
                raise fail(exc.errno or errno.EIO, f"cannot reopen {record['path']}: {exc.strerror}") from None
        # The owner controls the path: it can now name another file (a symlink to a root-only
        # one), and the handle is decoded on whatever filesystem holds the path's nearest
        # directory. Only the same inode on the same device is the preserved file.
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (record["dev"], record["ino"]):
            os.close(fd)
            raise fail(errno.ESTALE, f"{record['path']} is now another file (device {st.st_dev} inode {st.st_ino}, "
                                     f"preserved {record['dev']} {record['ino']})")
        os.lseek(fd, record["pos"], os.SEEK_SET)
        return fd

    @staticmethod
    def _open_by_handle(record: dict[str, Any], flags: int) -> int | None:
        if "handle" not in record:
            return None
        # open_by_handle_at wants any descriptor on the same filesystem: the nearest
        # existing ancestor directory of the old path is one.
        directory = os.path.dirname(record["path"]) or "/"
        while not os.path.isdir(directory):
            directory = os.path.dirname(directory)
        mount_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            return syscalls.open_by_handle(mount_fd, record["handle_type"], record["handle"], flags)
        except OSError:
            return None
        finally:
            os.close(mount_fd)
