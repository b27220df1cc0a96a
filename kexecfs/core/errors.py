"""The one error type of kexecfs: an errno for the caller, a sentence for the log.

The kernel's pseudo filesystems answer bad input with an errno only; kexecfs does the
same at the interface and writes the precise reason into the daemon's log, so every
core function raises :class:`KexecfsError` and the FUSE layer maps it to both.
"""

from __future__ import annotations

import errno as _errno


class KexecfsError(Exception):
    """A refused request: ``errno`` goes back to the caller, ``message`` to the log."""

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} ({_errno.errorcode.get(self.errno, self.errno)})"


def fail(errno: int, message: str) -> KexecfsError:
    """Build a KexecfsError; ``raise fail(EBUSY, "...")`` reads like the kernel's ``return -EBUSY``."""
    return KexecfsError(errno, message)



def refusal(exc: BaseException) -> KexecfsError | None:
    """The answer a caller gets for ``exc``: a KexecfsError as it is; an OSError from a
    syscall made on the caller's behalf (a write into a sealed memfd, say) with its errno
    and text; None for anything else, which is a bug (the caller then gets EIO)."""
    if isinstance(exc, KexecfsError):
        return exc
    if isinstance(exc, OSError):
        return KexecfsError(exc.errno or _errno.EIO, str(exc))
    return None
