"""The kexecfs tree, declared as a table (like the kernel's cgroup ``cftype`` arrays).

Each row names a file, its permission bits, how to show it (read) and how to store
into it (write). Inode numbers are derived: top-level files have fixed numbers, an
instance's files follow its directory's inode number by ``offset``, and the entries
of ``fds/`` get numbers of their own (see :mod:`kexecfs.fs.operations`).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from enum import Enum


class Scope(Enum):
    GLOBAL = "global"  # the files at the top of the mount
    INSTANCE = "instance"  # the files in each instance directory


@dataclass(frozen=True)
class Node:
    name: str
    scope: Scope
    offset: int  # inode number (GLOBAL) or offset from the instance directory's (INSTANCE)
    mode: int
    show: str | None = None  # method "show_<show>" of the filesystem renders the text
    store: str | None = None  # method "store_<store>" acts on one written command
    control: bool = False  # takes the LUO ioctls
    pollable: bool = False  # poll() waits for a state transition

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


ROOT_INO = 1
FDS_OFFSET = 5

NODES: tuple[Node, ...] = (
    Node("state", Scope.GLOBAL, 2, stat.S_IFREG | 0o644, show="global_state", store="event", pollable=True),
    Node("control", Scope.GLOBAL, 3, stat.S_IFREG | 0o644, control=True),
    Node("status", Scope.GLOBAL, 4, stat.S_IFREG | 0o444, show="status"),
    Node("state", Scope.INSTANCE, 1, stat.S_IFREG | 0o644, show="instance_state", store="event",
         pollable=True),
    Node("fd_preserve", Scope.INSTANCE, 2, stat.S_IFREG | 0o644, show="preserved", store="preserve"),
    Node("fd_unpreserve", Scope.INSTANCE, 3, stat.S_IFREG | 0o200, store="unpreserve"),
    Node("control", Scope.INSTANCE, 4, stat.S_IFREG | 0o600, control=True),
    Node("fds", Scope.INSTANCE, FDS_OFFSET, stat.S_IFDIR | 0o755),
    # Root's limits for the instance (cgroup's pids.max style: a number, or "max").
    Node("files.max", Scope.INSTANCE, 6, stat.S_IFREG | 0o644, show="max_files", store="max_files"),
    Node("bytes.max", Scope.INSTANCE, 7, stat.S_IFREG | 0o644, show="max_bytes", store="max_bytes"),
)

GLOBAL_BY_INO = {n.offset: n for n in NODES if n.scope is Scope.GLOBAL}
GLOBAL_BY_NAME = {n.name: n for n in NODES if n.scope is Scope.GLOBAL}
INSTANCE_BY_OFFSET = {n.offset: n for n in NODES if n.scope is Scope.INSTANCE}
INSTANCE_BY_NAME = {n.name: n for n in NODES if n.scope is Scope.INSTANCE}
