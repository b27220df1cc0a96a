"""Taking a descriptor out of the process that asked kexecfs to preserve it.

The caller is still blocked in write(2) or ioctl(2) on a kexecfs file while this runs,
so its descriptor table is stable and its pid cannot be reused under us. FUSE reports
the calling *thread's* id, translated into the daemon's pid namespace (0 when the
caller is invisible to the daemon).
"""

from __future__ import annotations

import errno
import os

from .errors import KexecfsError, fail
from .syscalls import PIDFD_THREAD, pidfd_getfd


def _thread_group_leader(tid: int) -> int:
    with open(f"/proc/{tid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"Tgid:"):
                return int(line.split()[1])
    raise OSError(errno.ESRCH, "no Tgid line")


def open_pidfd(tid: int) -> int:
    """A pidfd of thread ``tid`` (of its thread group leader on kernels before 6.9)."""
    try:
        return os.pidfd_open(tid, PIDFD_THREAD)
    except OSError as exc:
        # Kernels before 6.9 know no PIDFD_THREAD (EINVAL); a pidfd of the thread
        # group leader reaches the same descriptor table.
        if exc.errno != errno.EINVAL:
            raise
    return os.pidfd_open(_thread_group_leader(tid))


def take_descriptor(pid: int, fd: int) -> int:
    """Duplicate descriptor ``fd`` of caller ``pid`` into the daemon; EBADF/ESRCH on failure."""
    if pid <= 0:
        raise fail(errno.ESRCH, "the caller is not visible in the daemon's pid namespace (pid 0)")
    if not 0 <= fd <= 0x7FFFFFFF:
        # Descriptors are C ints: a larger number would be cut to one that may be open.
        raise fail(errno.EBADF, f"fd {fd} is not a descriptor number")
    try:
        pidfd = open_pidfd(pid)
    except OSError as exc:
        raise fail(errno.ESRCH, f"cannot open a pidfd for pid {pid}: {exc.strerror}") from None
    try:
        return pidfd_getfd(pidfd, fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise fail(errno.EBADF, f"fd {fd} is not open in pid {pid}") from None
        raise KexecfsError(exc.errno or errno.EIO,
                           f"cannot take fd {fd} of pid {pid}: {exc.strerror}") from None
    finally:
        os.close(pidfd)
