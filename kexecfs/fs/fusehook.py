"""Loader and API of ``kexecfs._fusehook``, the C extension that adds FUSE ioctl, the
caller of each request and FUSE passthrough to pyfuse3.

The extension works by defining ``fuse_session_new`` itself, so that pyfuse3's call
lands there instead of in libfuse (see the top of ``fusehook-c/session.c``). That
only happens if the extension is loaded into the global symbol scope *before* pyfuse3
is loaded: hence this module must be imported before ``pyfuse3`` anywhere in the
process. Every kexecfs module that uses pyfuse3 imports this module first.

Ioctl protocol: the handler registered with :func:`set_ioctl_handler` is called,
synchronously in the trio thread that runs ``pyfuse3.main()``, for every FUSE_IOCTL
request (on files and on directories). It must not block and must return None; it
answers each request exactly once with :func:`reply_ioctl` or :func:`reply_err`, right
away or later from a trio task. A request that is never answered leaves its caller
hanging in ``ioctl(2)``.

Passthrough (Linux >= 6.9): the kernel can serve an open FUSE file straight from a
"backing" file the daemon holds, so a restored memfd handed back through the mount reads
at the memfd's own speed (instead of ~0.27x through a direct_io proxy), its mappings
share the memfd's pages, its seals hold, and it works for any uid and pid namespace.
libfuse 3.14 has no API for it and pyfuse3's ``FileInfo`` cannot express it, so the
extension enables it at FUSE_INIT and writes passthrough open replies itself. The daemon
only calls :func:`passthrough_open` from its ``open`` handler; where passthrough is not
possible, the same open is served by the daemon with direct_io instead (see
:func:`passthrough_open`), so the daemon's ``read``/``write`` must still work for it.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable

if "pyfuse3" in sys.modules:
    raise ImportError(
        "kexecfs.fs.fusehook must be imported before pyfuse3: pyfuse3 is already loaded, "
        "so its call to fuse_session_new() is already bound to libfuse and the hook "
        "(ioctl support, request context) would silently do nothing. Import "
        "kexecfs.fs.fusehook (or the kexecfs module that needs pyfuse3) first."
    )

# RTLD_GLOBAL puts the extension's fuse_session_new in the global symbol scope, which
# the dynamic linker searches before pyfuse3's own dependency on libfuse. RTLD_NOW is
# Python's default for extensions; keep it. Other extensions loaded later must not
# become global, so the old flags are restored at once.
_old_dlopen_flags = sys.getdlopenflags()
sys.setdlopenflags(os.RTLD_GLOBAL | os.RTLD_NOW)
try:
    from .. import _fusehook  # type: ignore[attr-defined]  # C extension, no stub
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
            "kexecfs.fs.fusehook (or by a path that bypassed it)."
        )


def set_ioctl_handler(callback: IoctlHandler | None) -> None:
    """Register the handler for FUSE_IOCTL requests (see :data:`IoctlHandler`).

    With no handler (None), every ioctl is answered ENOTTY. If the handler raises or
    returns something other than None, the error is logged on the
    ``kexecfs.fs.fusehook`` logger and the request, if still unanswered, gets EIO.
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


def passthrough_available() -> bool:
    """True once FUSE_INIT was answered with FUSE_PASSTHROUGH enabled.

    False before the daemon has answered FUSE_INIT (``pyfuse3.main()`` does that first),
    if the kernel did not offer FUSE_PASSTHROUGH (Linux < 6.9, or built without
    CONFIG_FUSE_PASSTHROUGH), if libfuse lacks ``fuse_session_custom_io`` (< 3.12: the
    extension cannot see INIT), if the writeback cache is on (the kernel allows
    passthrough only without it), or if the kernel refuses to register backing files
    (checked right after INIT: it needs CAP_SYS_ADMIN). For the status file and tests:
    the daemon need not check it before :func:`passthrough_open`.
    """
    return _fusehook.passthrough_available()


def passthrough_open(fh: int, fd: int) -> None:
    """Have the kernel serve the file being opened, whose handle is ``fh``, from ``fd``.

    Call it in the ``open`` handler, right before returning the ``FileInfo`` with this
    ``fh``; ``fh`` must identify this one open (not be in use by another open file). The
    reply to that open then carries FOPEN_PASSTHROUGH: reads, writes, splice and mmap of
    the opened file go to ``fd``'s file in the kernel and never reach the daemon (open,
    flush, release, getattr and setattr still do). The ``FileInfo`` flags are ignored
    for it: the kernel fails a passthrough open with keep_cache (pyfuse3's default) or
    nonseekable, and direct_io would send I/O to the daemon again.

    ``fd`` must stay open until the handler has returned (the reply is sent then); it is
    not duplicated. The kernel keeps its own reference to the file for as long as files
    opened with it are open, so the daemon may close ``fd`` afterwards. Concurrent
    opens of one FUSE inode must be served from the same file (else the kernel fails the
    later open with EIO); registering the same file again is cheap: the extension keeps
    one kernel registration per file until the last file opened with it is released.
    While a FUSE inode is open with passthrough, the kernel also fails (EIO) an open of
    it that is not: register every open of such a file.

    If passthrough is not possible (see :func:`passthrough_available`), or the kernel
    refuses ``fd`` (it must be a regular file, on a file system that is not itself
    stacked, e.g. a memfd), the open is answered as the handler returned it but with
    direct_io forced on, so the daemon's ``read``/``write`` serve it; the reason is
    logged once (per errno) on the ``kexecfs.fs.fusehook`` logger, and
    :func:`passthrough_stats` counts a fallback. A registration is consumed by the
    reply to an open returning ``fh``; one left by an open handler that raised after
    registering is consumed by the next open returning the same ``fh``.
    """
    _fusehook.passthrough_open(fh, fd)


def passthrough_stats() -> tuple[int, int]:
    """(opens replied with passthrough, registered opens that fell back to direct_io),
    since the process started: for the status file and tests. An open counts when its
    reply was delivered; the kernel can still fail it (EIO, see
    :func:`passthrough_open`)."""
    return _fusehook.passthrough_stats()


# ------------------------------------------------------------------ restarts (see fusehook-c/connection.c)


def record_init_exchange(fd: int) -> None:
    """Have the FUSE_INIT request and reply written at offset 0 of ``fd`` (a memfd kept with
    the connection) once the reply has reached the kernel: what a restarted daemon replays."""
    _fusehook.record_init_exchange(fd)


def adopt_connection(record: bytes) -> None:
    """Make the next ``pyfuse3.init()`` on ``/dev/fd/N`` an adoption of connection N, whose
    INIT was answered already: libfuse gets the recorded INIT (``record``, what
    :func:`record_init_exchange` wrote; empty if none was answered), its reply is dropped,
    and the kernel is asked to resend what a dead daemon had read. ValueError if
    ``record`` is not such a recording."""
    _fusehook.adopt_connection(record)


def session_fd() -> int:
    """The ``/dev/fuse`` descriptor of the session (-1 before ``pyfuse3.init()``)."""
    return _fusehook.session_fd()


def last_request() -> tuple[int, int, int]:
    """(unique, opcode, nodeid) of the request read last: valid in a handler until its first
    ``await``, like :func:`last_request_ctx`. A unique with bit 63 set was resent by the
    kernel to a restarted daemon (FUSE_UNIQUE_RESEND)."""
    return _fusehook.last_request()


def last_request_flags() -> int:
    """The open flags of the file of the read, write, flush or release dispatched last
    (valid as :func:`last_request_ctx`): what a restarted daemon needs to serve a file
    that was opened before it started."""
    return _fusehook.last_request_flags()


def connection_status() -> dict[str, object]:
    """{"adopted", "init_reply_matches", "resend", "resend_errno"}: how this daemon came to
    its connection, for the log, the status file and tests."""
    return _fusehook.connection_status()
