"""Preservable file kinds, one small plug-in each (LUO's per-file "compatible" handlers).

The interface is :class:`.base.Kind`. Adding a kind is one module and one line in
:data:`KINDS`.
"""

from __future__ import annotations

import errno
import os

from .. import syscalls
from ..errors import fail
from .base import Kind, access_flags, describe
from .memfd import Memfd
from .regular import RegularFile

KINDS: dict[str, Kind] = {kind.name: kind for kind in (Memfd(), RegularFile())}


def detect(fd: int) -> Kind:
    """The kind that can preserve ``fd``; ENOENT (as LUO) naming what it is otherwise."""
    fs = syscalls.filesystem_type(fd)
    if fs.startswith("fuse"):
        # Not a single stat of it: the request would go to its FUSE daemon, and if that is
        # this kexecfs (a file of its own mount), the daemon would wait for itself forever.
        raise fail(errno.ENOENT, f"is a file on a FUSE filesystem ({fs}); only memfds and regular files on "
                                 f"persistent filesystems can be preserved")
    st = os.fstat(fd)
    fs_type = syscalls.fstatfs_type(fd)
    for kind in KINDS.values():
        if kind.accepts(st, fs_type):
            return kind
    raise fail(errno.ENOENT, f"is {describe(fd)}; only memfds and regular files on persistent "
                             f"filesystems can be preserved")



__all__ = ["KINDS", "Kind", "access_flags", "describe", "detect"]
