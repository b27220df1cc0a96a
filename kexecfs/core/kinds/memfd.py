"""memfd: an unlinked shmem file, e.g. a VM's guest RAM. Its contents go into the image."""

from __future__ import annotations

import fcntl
import os
import stat
from typing import Any

from .. import syscalls
from .base import ContentsReader, ContentsWriter, Kind


_MFD_PREFIX, _MFD_SUFFIX = "/memfd:", " (deleted)"


def memfd_name(fd: int) -> str:
    """The name given to memfd_create(), read back from the /proc link of ``fd``."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    if target.startswith(_MFD_PREFIX):
        target = target[len(_MFD_PREFIX):]
    return target.removesuffix(_MFD_SUFFIX)


# Seals the kernel knows (F_SEAL_SEAL, SHRINK, GROW, WRITE, FUTURE_WRITE, EXEC).
_SEALS = 0x3F
F_SEAL_WRITE = 0x0008


def _unchanged_since(previous: dict[str, Any], now: dict[str, Any]) -> bool:
    """Sealed against writes at prepare and still of the same size: its contents cannot
    have changed, so freeze needs not read it again. F_SEAL_WRITE only: F_SEAL_FUTURE_WRITE
    leaves writable mappings made before it writing, so those memfds are re-checked."""
    return bool(previous["seals"] & now["seals"] & F_SEAL_WRITE) and previous["size"] == now["size"]


class Memfd(Kind):
    name = "memfd"
    stores_contents = True
    fields = {"size": int, "pos": int, "flags": int, "seals": int, "name": str, "mode": int, "extents": list}

    @staticmethod
    def accepts(st: os.stat_result, fs_type: int) -> bool:
        # "Any unlinked shmem file": memfd_create, O_TMPFILE on tmpfs, an unlinked
        # /dev/shm file. hugetlbfs memfds are refused: their pages cannot be copied
        # into a file with the ordinary page-size windows used here.
        return stat.S_ISREG(st.st_mode) and fs_type == syscalls.TMPFS_MAGIC and st.st_nlink == 0

    def capture(self, fd: int) -> dict[str, Any]:
        st = os.fstat(fd)
        return {"size": st.st_size, "pos": os.lseek(fd, 0, os.SEEK_CUR),
                "flags": fcntl.fcntl(fd, fcntl.F_GETFL), "seals": fcntl.fcntl(fd, fcntl.F_GET_SEALS),
                "name": memfd_name(fd), "mode": stat.S_IMODE(st.st_mode)}

    def serialize(self, fd: int, writer: ContentsWriter, previous: dict[str, Any] | None) -> dict[str, Any]:
        record = self.capture(fd)
        if previous is not None and _unchanged_since(previous, record):
            record["extents"] = previous["extents"]
            return record
        # Read through a private open file of the same inode: finding holes moves the
        # file offset (SEEK_DATA), and ``fd`` shares its offset with the service. It
        # also makes a memfd the service opened write-only readable.
        readable = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            # Sealed against shrinking, it can be mapped: no truncation can make a read of
            # the mapping SIGBUS (seals are never taken away).
            mapped = bool(record["seals"] & fcntl.F_SEAL_SHRINK)
            if previous is None:
                record["extents"] = writer.copy_contents(readable, record["size"], mapped)
            else:
                record["extents"] = writer.refresh_contents(readable, record["size"], previous["extents"], mapped)
        finally:
            os.close(readable)
        return record

    def check_record(self, record: dict[str, Any]) -> str | None:
        problem = super().check_record(record)
        if problem:
            return problem
        if record["seals"] & ~_SEALS or record["mode"] > 0o7777 or record["flags"] >= 1 << 32:
            return "seals, mode or flags out of range"
        if len(record["name"].encode(errors="surrogateescape")) > 249:  # memfd_create's limit
            return "name longer than 249 bytes"
        for extent in record["extents"]:
            if isinstance(extent, list) and len(extent) == 4 and all(isinstance(v, int) for v in extent[:2]) \
                    and extent[0] + extent[1] > record["size"]:
                return f"extent at {extent[0]} of {extent[1]} bytes goes beyond the size {record['size']}"
        return None

    def restore(self, record: dict[str, Any], image: ContentsReader) -> int:
        fd = os.memfd_create(record.get("name", "kexecfs"), os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, record["size"])
            image.copy_into(fd, record.get("extents", []))
            os.lseek(fd, record.get("pos", 0), os.SEEK_SET)
            if record.get("seals"):
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, record["seals"])
        except BaseException:
            os.close(fd)
            raise
        return fd
