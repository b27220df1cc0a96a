"""Instances (what LUO calls sessions) and the files preserved in them.

An instance is a named set of preserved files owned by one service. Ownership follows
the cgroup delegation model: the creator owns it, ``chown`` hands it to a service's
uid, and only the owner (or root) may change what it holds.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from typing import Any

from .errors import KexecfsError, fail
from .kinds import Kind, access_flags

TOP_LEVEL_NAMES = frozenset({"state", "control", "status"})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
TOKEN_MAX = (1 << 64) - 1


def check_name(name: str) -> None:
    """EINVAL unless ``name`` may name an instance (SPEC section 1)."""
    if not _NAME.fullmatch(name) or name.startswith(".") or name in TOP_LEVEL_NAMES:
        raise fail(errno.EINVAL, f"{name!r} is not a valid instance name: 1-63 characters of "
                                 f"[A-Za-z0-9._-], not starting with '.', not state/control/status")


@dataclass(frozen=True)
class Caller:
    """Who made a request, as FUSE reports it, and through which file."""

    pid: int
    uid: int
    gid: int
    via: str = ""

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}" + (f" via {self.via}" if self.via else "")



@dataclass
class PreservedFile:
    """One preserved file: before a kexec the service's own open file, after it the restored one.

    ``record`` holds what the image says (or will say) about the file: its kind's
    fields such as size, position, open flags and seals.
    """

    token: int
    kind: Kind
    fd: int
    record: dict[str, Any]
    recovered: bool = False  # came from an image and was not yet handed back for good
    opened: bool = False  # the owner opened fds/<token> (restored it)
    error: KexecfsError | None = None  # why a recovered file could not be restored

    @property
    def size(self) -> int:
        if self.fd >= 0:
            try:
                return os.fstat(self.fd).st_size
            except OSError:
                pass
        return int(self.record.get("size", 0))

    def line(self) -> str:
        """``<token> <kind> <size> <flags>``, as ``fd_preserve`` lists it."""
        return f"{self.token} {self.kind.name} {self.size} {access_flags(self.record.get('flags', 0))}"

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class Instance:
    """A service's named set of preserved files."""

    name: str
    ino: int
    uid: int
    gid: int
    mode: int
    files: dict[int, PreservedFile] = field(default_factory=dict)
    finished: bool = False  # after a kexec: the owner wrote "finish"
    removed: bool = False

    def check_owner(self, caller: Caller, action: str) -> None:
        """EACCES unless the caller owns this instance (or is root)."""
        if caller.uid != 0 and caller.uid != self.uid:
            raise fail(errno.EACCES, f"{action}: {caller} does not own instance {self.name!r} "
                                     f"(owner uid {self.uid})")

    def free_token(self) -> int:
        """The lowest token not in use."""
        token = 0
        while token in self.files:
            token += 1
        return token

    def add(self, token: int | None, kind: Kind, fd: int, record: dict[str, Any]) -> PreservedFile:
        if token is None:
            token = self.free_token()
        if not 0 <= token <= TOKEN_MAX:
            raise fail(errno.EINVAL, f"token {token} is not an unsigned 64-bit number")
        if token in self.files:
            raise fail(errno.EEXIST, f"token {token} is already used in instance {self.name!r}")
        pf = self.files[token] = PreservedFile(token, kind, fd, record)
        return pf

    def get(self, token: int) -> PreservedFile:
        try:
            return self.files[token]
        except KeyError:
            raise fail(errno.ENOENT, f"instance {self.name!r} has no preserved file with token {token}") from None

    def listing(self) -> str:
        return "".join(self.files[t].line() + "\n" for t in sorted(self.files))

    def drop_files(self) -> None:
        for pf in self.files.values():
            pf.close()
        self.files.clear()

    def record(self) -> dict[str, Any]:
        return {"type": "instance", "name": self.name, "uid": self.uid, "gid": self.gid,
                "mode": self.mode, "ino": self.ino}
