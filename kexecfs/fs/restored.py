"""Restored files: what ``open("<instance>/fds/<token>")`` hands back after a kexec.

The access rule is the core's (:meth:`PreservedFile.check_access`); this module gives the
open its own descriptor and chooses who serves its I/O: the kernel through FUSE
passthrough where it can hold the grant, the daemon's direct_io proxy otherwise.
"""

from __future__ import annotations

import os

from ..core.instance import Caller, Instance, PreservedFile
from ..core.machine import LiveUpdate
from . import fusehook


def open_restored(machine: LiveUpdate, inst: Instance, pf: PreservedFile, caller: Caller, flags: int) -> int:
    """A descriptor of the restored file for one open, with only the access granted: the
    open stays valid after finish, and proxied I/O through it cannot exceed the grant."""
    fd = machine.restore(inst, caller, pf.token, flags).reopen(flags)
    if flags & os.O_TRUNC:
        try:
            os.ftruncate(fd, 0)  # atomic_o_trunc: the kernel leaves the truncation to us
        except OSError:
            os.close(fd)
            raise
    return fd


def reopen_granted(pf: PreservedFile, flags: int) -> int:
    """A descriptor for an open of ``fds/<token>`` made before a restart of the daemon: the
    restore was granted then (in updated, or the file stays restored after finish), so
    only the access its open flags ask is checked again."""
    pf.check_access(flags, f"an open file of fds/{pf.token} taken over at a restart")
    if pf.error:
        raise pf.error
    return pf.reopen(flags)


def serve(fh: int, fd: int, pf: PreservedFile, passthrough: bool) -> None:
    """Have the kernel serve the open ``fh`` from ``fd`` where that keeps the grant.

    The kernel's passthrough opens its own backing file with this open's flags, and
    reads, writes and mmap never reach the daemon (which still proxies if the extension
    has to fall back). Never for an O_APPEND file: passthrough writes follow the FUSE
    file's flags, which F_SETFL can clear, so the daemon appends each write itself
    through its O_APPEND descriptor.
    """
    if passthrough and not pf.appends:
        fusehook.passthrough_open(fh, fd)
