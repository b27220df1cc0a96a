"""Thin wrappers over the Linux syscalls Python's ``os`` module lacks.

Each one raises ``OSError`` with the kernel's errno, like ``os`` functions do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import select
import struct

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.syscall.restype = ctypes.c_long

# x86-64 syscall numbers (asm-generic shares 438 for pidfd_getfd as well).
_SYS_PIDFD_GETFD = 438

PIDFD_THREAD = os.O_EXCL  # Linux >= 6.9: a pidfd may refer to a non-leader thread

# statfs(2) f_type values (linux/magic.h) of the filesystems kexecfs tells apart.
TMPFS_MAGIC = 0x01021994
HUGETLBFS_MAGIC = 0x958458F6
RAMFS_MAGIC = 0x858458F6
PROC_SUPER_MAGIC = 0x9FA0
SYSFS_MAGIC = 0x62656572
DEBUGFS_MAGIC = 0x64626720
TRACEFS_MAGIC = 0x74726163
CGROUP2_SUPER_MAGIC = 0x63677270
DEVPTS_SUPER_MAGIC = 0x1CD1
FUSE_SUPER_MAGIC = 0x65735546

_libc.fstatfs.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]


def _raise_errno(what: str) -> None:
    err = ctypes.get_errno()
    raise OSError(err, f"{what}: {os.strerror(err)}")


def fstatfs_type(fd: int) -> int:
    """The f_type of the filesystem holding ``fd`` (``os.fstatvfs`` does not report it)."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on x86-64
    if _libc.fstatfs(fd, buf) != 0:
        _raise_errno("fstatfs")
    return struct.unpack_from("=q", buf.raw)[0] & 0xFFFFFFFF


def statfs_type(path: str) -> int:
    """The f_type of the filesystem at ``path``."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statfs(os.fsencode(path), buf) != 0:
        _raise_errno("statfs")
    return struct.unpack_from("=q", buf.raw)[0] & 0xFFFFFFFF


_libc.statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
AT_STATX_DONT_SYNC = 0x4000
_STATX_DEV = struct.Struct("=II")  # stx_dev_major, stx_dev_minor at offset 136 of struct statx


class _MountTable:
    """Device number -> filesystem type, from /proc/self/mountinfo, read again only when
    the mount table changed (the kernel flags that with POLLPRI on the open file)."""

    def __init__(self) -> None:
        self._file = open("/proc/self/mountinfo", "rb")
        self._poll = select.poll()
        self._poll.register(self._file, select.POLLPRI | select.POLLERR)
        self._types: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        self._file.seek(0)
        types = {}
        for line in self._file.read().decode(errors="replace").splitlines():
            fields = line.split()
            if "-" in fields[6:]:
                types[fields[2]] = fields[fields.index("-", 6) + 1]
        self._types = types

    def type_of(self, device: str) -> str:
        if self._poll.poll(0):
            self._load()
        return self._types.get(device, "")


_mounts: _MountTable | None = None


def filesystem_type(fd: int) -> str:
    """The type ("ext4", "fuse.kexecfs", ...) of the filesystem ``fd`` is on, as
    /proc/self/mountinfo names it for its device; "" if no mount shows that device
    (kernel-internal ones: pipes, sockets, memfds).

    Unlike fstat(2) or fstatfs(2), this never sends a request to the filesystem itself
    (statx with AT_STATX_DONT_SYNC takes the device from the superblock): on a FUSE file
    those requests wait for its daemon, which may be this very process. The device, not
    the mount, is compared: the file may come through a bind mount in a container's
    mount namespace that this process does not see.
    """
    global _mounts
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(fd, b"", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, 0, buf) != 0:
        _raise_errno("statx")
    if _mounts is None:
        _mounts = _MountTable()
    return _mounts.type_of("%d:%d" % _STATX_DEV.unpack_from(buf.raw, 136))


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate descriptor ``targetfd`` of the process behind ``pidfd`` into this one.

    The result shares the open file description (offset, flags) with the original,
    which is the point: reopening ``/proc/PID/fd/N`` would make a different open file.
    """
    fd = _libc.syscall(_SYS_PIDFD_GETFD, pidfd, targetfd, 0)
    if fd < 0:
        _raise_errno("pidfd_getfd")
    os.set_inheritable(fd, False)
    return fd


class FileHandle(ctypes.Structure):
    _fields_ = [("handle_bytes", ctypes.c_uint), ("handle_type", ctypes.c_int),
                ("f_handle", ctypes.c_ubyte * 128)]  # MAX_HANDLE_SZ


_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(FileHandle),
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.POINTER(FileHandle), ctypes.c_int]

AT_EMPTY_PATH = 0x1000


def name_to_handle(fd: int) -> tuple[int, bytes, int]:
    """(handle_type, handle bytes, mount_id) of the file open as ``fd``."""
    fh = FileHandle(handle_bytes=128)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", ctypes.byref(fh), ctypes.byref(mount_id), AT_EMPTY_PATH) != 0:
        _raise_errno("name_to_handle_at")
    return fh.handle_type, bytes(fh.f_handle[: fh.handle_bytes]), mount_id.value


def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
    """Open a file by the handle :func:`name_to_handle` gave (needs CAP_DAC_READ_SEARCH)."""
    fh = FileHandle(handle_bytes=len(handle), handle_type=handle_type)
    ctypes.memmove(fh.f_handle, handle, len(handle))
    fd = _libc.open_by_handle_at(mount_fd, ctypes.byref(fh), flags | os.O_CLOEXEC)
    if fd < 0:
        _raise_errno("open_by_handle_at")
    return fd


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


_libc.process_vm_readv.argtypes = [ctypes.c_int, ctypes.POINTER(_IoVec), ctypes.c_ulong,
                                   ctypes.POINTER(_IoVec), ctypes.c_ulong, ctypes.c_ulong]
_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.argtypes = _libc.process_vm_readv.argtypes
_libc.process_vm_writev.restype = ctypes.c_ssize_t


def read_memory(pid: int, address: int, size: int) -> bytes:
    """``size`` bytes at ``address`` in process ``pid`` (a thread id names its process);
    EFAULT if any of them is not mapped readable."""
    buf = ctypes.create_string_buffer(size)
    local, remote = _IoVec(ctypes.addressof(buf), size), _IoVec(address, size)
    done = _libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done < 0:
        _raise_errno("process_vm_readv")
    if done != size:
        raise OSError(errno.EFAULT, "process_vm_readv: short read")
    return buf.raw


def write_memory(pid: int, address: int, data: bytes) -> None:
    """Write ``data`` at ``address`` in process ``pid``; EFAULT if it is not all writable."""
    buf = ctypes.create_string_buffer(data, len(data))
    local, remote = _IoVec(ctypes.addressof(buf), len(data)), _IoVec(address, len(data))
    done = _libc.process_vm_writev(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
    if done < 0:
        _raise_errno("process_vm_writev")
    if done != len(data):
        raise OSError(errno.EFAULT, "process_vm_writev: short write")


_SYS_KCMP = 312
_KCMP_FILE = 0


def same_open_file(fd1: int, fd2: int) -> bool:
    """Whether two of this process's descriptors refer to one open file description."""
    pid = os.getpid()
    res = _libc.syscall(_SYS_KCMP, pid, pid, _KCMP_FILE, fd1, fd2)
    if res < 0:
        _raise_errno("kcmp")
    return res == 0
