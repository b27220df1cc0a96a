"""Instances (what LUO calls sessions) and the files preserved in them.

An instance is a named set of preserved files owned by one service. Ownership follows
the cgroup delegation model: the creator owns it, ``chown`` hands it to a service's
uid, and only the owner (or root) may change what it holds.
"""

from __future__ import annotations

import errno
import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from .descriptors import DescriptorCache, prefetch, warmed
from .errors import KexecfsError, fail
from .kinds import Kind, access_flags
from .names import session_name

TOKEN_MAX = (1 << 64) - 1
# Descriptors fetched with the one a restore needs: its next tokens' (at most half the
# cache, see DescriptorCache.prefetch). Probed token by token, so sparse tokens get fewer.
RESTORE_PREFETCH = 64


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

    Its descriptor is either the daemon's own (``fd``: until the descriptor store holds
    it, and always for a machine without a store) or in the store under ``stored``, of
    which the daemon fetches a copy while it works on the file (:mod:`.descriptors`):
    so the files a machine holds are not bounded by the daemon's RLIMIT_NOFILE. Code
    that needs the descriptor asks :meth:`descriptor`, whichever holds it.
    """

    token: int
    kind: Kind
    fd: int
    record: dict[str, Any]
    recovered: bool = False  # came from an image and was not yet handed back for good
    opened: bool = False  # the owner opened fds/<token> (restored it)
    error: KexecfsError | None = None  # why a recovered file could not be restored
    ino: int = 0  # the inode number of its fds/<token> entry (the machine gives it)
    stored: str | None = None  # its name in the descriptor store, once the daemon let go of its own
    cache: DescriptorCache | None = field(default=None, repr=False, compare=False)
    # (st_dev, st_ino) of the open file: it never changes, and duplicate checks and the
    # journal's twins compare it without fetching every stored descriptor.
    inode: tuple[int, int] | None = None

    @property
    def held(self) -> bool:
        """Whether the file has a descriptor (the daemon's or the store's)."""
        return self.fd >= 0 or (self.stored is not None and self.cache is not None)

    def descriptor(self) -> AbstractContextManager[int]:
        """The file's descriptor for the time of the block (-1 if it has none); a stored
        one is fetched into the cache and may be closed once the block ends."""
        if self.fd >= 0 or self.stored is None or self.cache is None:
            return nullcontext(self.fd)
        return self.cache.use(self.stored)

    def inode_key(self) -> tuple[int, int] | None:
        if self.inode is None and self.held:
            with self.descriptor() as fd:
                st = os.fstat(fd)
            self.inode = (st.st_dev, st.st_ino)
        return self.inode

    @property
    def at_hand(self) -> bool:
        """Whether using the descriptor needs no round trip to the store."""
        return self.fd >= 0 or self.stored is None or self.cache is None or self.stored in self.cache

    def hand_over(self, name: str, cache: DescriptorCache) -> None:
        """The store holds the descriptor under ``name`` now: the daemon's own becomes a
        cached copy, closed when the cache needs the room."""
        self.inode_key()
        self.stored, self.cache = name, cache
        if self.fd >= 0:
            cache.adopt(name, self.fd)
            self.fd = -1

    @property
    def size(self) -> int:
        if self.held:
            try:
                with self.descriptor() as fd:
                    return os.fstat(fd).st_size
            except OSError:
                pass
        return int(self.record.get("size", 0))

    # ------------------------------------------------------------------ what a restore may grant

    @property
    def preserved_flags(self) -> int:
        """The open flags of the descriptor that was preserved (kept in the image as they
        were at preservation, however often the file is restored and carried again)."""
        return int(self.record.get("flags", os.O_RDONLY))

    @property
    def appends(self) -> bool:
        return bool(self.preserved_flags & os.O_APPEND)

    def permission_bits(self) -> int:
        """The mode ``ls -l fds/`` shows: the access a restore grants, to the owner only."""
        return {os.O_RDONLY: 0o400, os.O_WRONLY: 0o200}.get(self.preserved_flags & os.O_ACCMODE, 0o600)

    def check_access(self, flags: int, what: str) -> None:
        """EACCES unless an open with ``flags`` asks for no more than the preserved descriptor had:
        reading and writing only as it could, O_APPEND kept for writers, no truncation of an
        append-only file (it could never have written anywhere but at the end)."""
        had = self.preserved_flags & os.O_ACCMODE
        wants = flags & os.O_ACCMODE
        wants_write = wants in (os.O_WRONLY, os.O_RDWR) or bool(flags & os.O_TRUNC)
        problem = ""
        if wants in (os.O_RDONLY, os.O_RDWR) and had == os.O_WRONLY:
            problem = "it asks to read, and the preserved descriptor was write-only"
        elif wants_write and had == os.O_RDONLY:
            problem = "it asks to write, and the preserved descriptor was read-only"
        elif wants_write and self.appends and (flags & os.O_TRUNC or not flags & os.O_APPEND):
            problem = ("the preserved descriptor was O_APPEND: a writer must open with O_APPEND too, "
                       "and may not truncate")
        if problem:
            raise fail(errno.EACCES, f"{what} with flags {flags:#o} refused: {problem} "
                                     f"({access_flags(self.preserved_flags)}); a restore never grants more")

    def reopen(self, flags: int) -> int:
        """A descriptor of the restored file of its own, opened with what ``flags`` asks
        (already checked): the kernel then holds every proxied read and write to the granted
        access and to O_APPEND, whatever the FUSE file's flags become later (F_SETFL)."""
        keep = (flags & os.O_ACCMODE) | (os.O_APPEND if self.appends else 0)
        with self.descriptor() as fd:
            return os.open(f"/proc/self/fd/{fd}", keep | os.O_CLOEXEC)

    def line(self) -> str:
        """``<token> <kind> <size> <flags>``, as ``fd_preserve`` lists it."""
        return f"{self.token} {self.kind.name} {self.size} {access_flags(self.record.get('flags', 0))}"

    def close(self) -> None:
        """Let go of the descriptor (a stored one stays in the store until the journal
        releases its name: another file may share it, and a crash must find it there)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.stored = None


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
    max_files: int | None = None  # root's limits (files.max, bytes.max); None: no limit
    max_bytes: int | None = None
    incoming: bool = False  # came from the image of the last kexec (a session RETRIEVE_SESSION finds)
    session: str | None = None  # the LUO session fd bound to it: "created", "retrieved" or none

    def check_owner(self, caller: Caller, action: str) -> None:
        """EACCES unless the caller owns this instance (or is root)."""
        if caller.uid != 0 and caller.uid != self.uid:
            raise fail(errno.EACCES, f"{action}: {caller} does not own instance {self.name!r} "
                                     f"(owner uid {self.uid})")

    def image_bytes(self) -> int:
        """The bytes of contents this instance puts into the image (memfds; not regular files)."""
        return sum(pf.size for pf in warmed(self.files.values()) if pf.kind.stores_contents)

    def check_room(self, kind: Kind, record: dict[str, Any], caller: Caller) -> None:
        """ENOSPC past the file limit, EDQUOT past the byte limit, for one more preserved file."""
        if self.max_files is not None and len(self.files) >= self.max_files:
            raise fail(errno.ENOSPC, f"fd_preserve by {caller}: instance {self.name!r} already holds "
                                     f"{len(self.files)} file(s), its limit (files.max)")
        if self.max_bytes is not None and kind.stores_contents:
            total = self.image_bytes() + int(record.get("size", 0))
            if total > self.max_bytes:
                raise fail(errno.EDQUOT, f"fd_preserve by {caller}: a {kind.name} of {record.get('size', 0)} bytes "
                                         f"would bring instance {self.name!r} to {total} bytes, over its limit "
                                         f"of {self.max_bytes} (bytes.max)")

    def check_bytes(self, action: str) -> None:
        """EDQUOT if what the instance holds has grown past its byte limit (checked at prepare)."""
        if self.max_bytes is not None and (total := self.image_bytes()) > self.max_bytes:
            raise fail(errno.EDQUOT, f"{action}: instance {self.name!r} holds {total} bytes, over its limit of "
                                     f"{self.max_bytes} (bytes.max); root can raise the limit or drop a file "
                                     f"with: echo TOKEN > {self.name}/fd_unpreserve")

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

    @property
    def session_name(self) -> bytes:
        """The LUO session name this instance is (its directory name, unescaped)."""
        name = session_name(self.name)
        assert name is not None  # every instance name passed check_name
        return name

    def get(self, token: int) -> PreservedFile:
        try:
            return self.files[token]
        except KeyError:
            raise fail(errno.ENOENT, f"instance {self.name!r} has no preserved file with token {token}") from None

    def warm_from(self, token: int) -> None:
        """Before the file of ``token`` is used: if its descriptor is not at hand, fetch it
        together with those of the next tokens, in one round trip to the store. After a
        kexec a service restores its files one after another, in token order as a rule
        (and every file it does not restore is dropped at finish): a restore walk then
        costs one round trip per batch, not one per file."""
        pf = self.files.get(token)
        if pf is not None and not pf.at_hand:
            prefetch([f for t in range(token, token + RESTORE_PREFETCH) if (f := self.files.get(t)) is not None])

    def listing(self) -> str:
        return "".join(pf.line() + "\n" for pf in warmed(self.files[t] for t in sorted(self.files)))

    def drop_files(self) -> None:
        for pf in self.files.values():
            pf.close()
        self.files.clear()

    def record(self) -> dict[str, Any]:
        limits = {k: v for k, v in (("max_files", self.max_files), ("max_bytes", self.max_bytes)) if v is not None}
        return {"type": "instance", "name": self.name, "uid": self.uid, "gid": self.gid,
                "mode": self.mode, "ino": self.ino, **limits}
