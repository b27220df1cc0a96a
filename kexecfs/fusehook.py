"""Loader and API of ``kexecfs._fusehook``, the C extension that adds FUSE ioctl and the
caller of each request to pyfuse3.

The extension works by defining ``fuse_session_new`` itself, so that pyfuse3's call
lands there instead of in libfuse (see the comment at the top of ``_fusehook.c``). That
only happens if the extension is loaded into the global symbol scope *before* pyfuse3
is loaded: hence this module must be imported before ``pyfuse3`` anywhere in the
process. Every kexecfs module that uses pyfuse3 imports this module first.

Ioctl protocol: the handler registered with :func:`set_ioctl_handler` is called,
synchronously in the trio thread that runs ``pyfuse3.main()``, for every FUSE_IOCTL
request (on files and on directories). It must not block and must return None; it
answers each request exactly once with :func:`reply_ioctl` or :func:`reply_err`, right
away or later from a trio task. A request that is never answered leaves its caller
hanging in ``ioctl(2)``.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

if "pyfuse3" in sys.modules:
    raise ImportError(
        "kexecfs.fusehook must be imported before pyfuse3: pyfuse3 is already loaded, "
        "so its call to fuse_session_new() is already bound to libfuse and the hook "
        "(ioctl support, request context) would silently do nothing. Import "
        "kexecfs.fusehook (or the kexecfs module that needs pyfuse3) first."
    )

# RTLD_GLOBAL puts the extension's fuse_session_new in the global symbol scope, which
# the dynamic linker searches before pyfuse3's own dependency on libfuse. RTLD_NOW is
# Python's default for extensions; keep it. Other extensions loaded later must not
# become global, so the old flags are restored at once.
_old_dlopen_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
try:
    from . import _fusehook  # type: ignore[attr-defined]  # C extension, no stub
finally:
    sys.setdlopenflags(_old_dlopen_flags)
del _old_dlopen_flags

#: ``flags & FUSE_IOCTL_DIR``: the ioctl was made on a directory.
FUSE_IOCTL_DIR: int = _fusehook.FUSE_IOCTL_DIR

IoctlHandler = Callable[[int, int, int, int, int, bytes, int, int, int, int, int], None]
"""``handler(req, ino, cmd, fh, flags, in_data, out_size, arg, pid, uid, gid)``.

- ``req``: opaque int handle of the request, for :func:`reply_ioctl`/:func:`reply_err`.
- ``ino``: inode number; ``fh``: the file handle from ``open``/``opendir``.
- ``cmd``: the ioctl number, unsigned 32 bits.
- ``flags``: FUSE ioctl flags (see :data:`FUSE_IOCTL_DIR`).
- ``in_data``: the ``_IOC_SIZE(cmd)`` bytes the kernel copied in (``_IOC_WRITE``
  commands), else ``b""``.
- ``out_size``: how many bytes the caller's buffer takes back (``_IOC_READ``
  commands), else 0.
- ``arg``: the raw argument (a pointer in the caller's address space, or an integer).
- ``pid``/``uid``/``gid``: the caller (``pid`` is the calling thread's id, 0 if the
  caller is outside the daemon's pid namespace).
"""


def hook_active() -> bool:
    """True once a FUSE session was created with the hooked ops table (after
    ``pyfuse3.init()``); False before, or if the hook was loaded too late."""
    return _fusehook.hook_active()


def ensure_live() -> None:
    """Raise RuntimeError unless the hook is live; call right after ``pyfuse3.init()``."""
    if not _fusehook.hook_active():
        raise RuntimeError(
            "kexecfs._fusehook did not intercept pyfuse3's fuse_session_new(): ioctls "
            "would fail with ENOSYS and write() would not know its caller. Either "
            "pyfuse3.init() has not been called yet, or pyfuse3 was loaded before "
            "kexecfs.fusehook (or by a path that bypassed it)."
        )


def set_ioctl_handler(callback: IoctlHandler | None) -> None:
    """Register the handler for FUSE_IOCTL requests (see :data:`IoctlHandler`).

    With no handler (None), every ioctl is answered ENOTTY. If the handler raises or
    returns something other than None, the error is logged on the
    ``kexecfs.fusehook`` logger and the request, if still unanswered, gets EIO.
    """
    if inspect.iscoroutinefunction(callback):
        raise TypeError(
            "the ioctl handler must be a plain function: it is called synchronously, "
            "so a coroutine would never run (start a trio task from it instead)"
        )
    _fusehook.set_ioctl_handler(callback)


def reply_ioctl(req: int, data: bytes) -> None:
    """Answer ioctl request ``req`` with result 0 and ``data`` copied to the caller.

    ``data`` longer than the request's ``out_size`` is answered EIO instead (the kernel
    would turn it into EIO anyway) and logged. Raises ValueError if ``req`` is not an
    outstanding request (e.g. already answered).
    """
    _fusehook.reply_ioctl(req, data)


def reply_err(req: int, errno: int) -> None:
    """Answer ioctl request ``req`` with the error ``errno`` (1..999).

    Raises ValueError if ``req`` is not an outstanding request, or for a bad errno
    (then the request stays outstanding).
    """
    _fusehook.reply_err(req, errno)


def last_request_ctx() -> tuple[int, int, int]:
    """(pid, uid, gid) of the request most recently dispatched to setattr, open, read,
    write, flush, release or poll.

    Valid in the pyfuse3 handler of that request until its first ``await`` (use it on
    the handler's first line). The pid is the calling thread's id. Raises RuntimeError
    if no such request has been dispatched yet.
    """
    return _fusehook.last_request_ctx()
