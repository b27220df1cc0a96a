"""The kexecfs tree, declared as a table (like the kernel's cgroup ``cftype`` arrays).

Each row names a file, its permission bits, the function that shows it (read) and the
one that stores a command written to it. Inode numbers are derived: top-level files
have fixed numbers, an instance's files follow its directory's inode number by
``offset``, and the entries of ``fds/`` get numbers of their own (see
:mod:`kexecfs.fs.operations`).
"""

from __future__ import annotations

import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from . import textfiles as t


class Scope(Enum):
    GLOBAL = "global"  # the files at the top of the mount
    INSTANCE = "instance"  # the files in each instance directory


@dataclass(frozen=True)
class Node:
    name: str
    scope: Scope
    offset: int  # inode number (GLOBAL) or offset from the instance directory's (INSTANCE)
    mode: int
    show: Callable[[Any, Any], str] | None = None  # (operations, instance) -> the text
    store: Callable[[Any, Any, Any, str], Awaitable[None]] | None = None  # (operations, instance, caller, command)
    control: bool = False  # takes the LUO ioctls
    pollable: bool = False  # poll() waits for a state transition

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


ROOT_INO = 1
FDS_OFFSET = 5
G, I = Scope.GLOBAL, Scope.INSTANCE
FILE = stat.S_IFREG

NODES: tuple[Node, ...] = (
    Node("state", G, 2, FILE | 0o644, show=t.show_global_state, store=t.store_event, pollable=True),
    # /dev/liveupdate: every uid may open it; what each may do there is the core's to say.
    Node("control", G, 3, FILE | 0o666, control=True),
    Node("status", G, 4, FILE | 0o444, show=t.show_status),
    Node("state", I, 1, FILE | 0o644, show=t.show_instance_state, store=t.store_event, pollable=True),
    Node("fd_preserve", I, 2, FILE | 0o644, show=t.show_preserved, store=t.store_preserve),
    Node("fd_unpreserve", I, 3, FILE | 0o200, store=t.store_unpreserve),
    Node("control", I, 4, FILE | 0o600, control=True),
    Node("fds", I, FDS_OFFSET, stat.S_IFDIR | 0o755),
    # Root's limits for the instance (cgroup's pids.max style: a number, or "max").
    Node("files.max", I, 6, FILE | 0o644, show=t.show_max_files, store=t.store_max_files),
    Node("bytes.max", I, 7, FILE | 0o644, show=t.show_max_bytes, store=t.store_max_bytes),
)

GLOBAL_BY_INO = {n.offset: n for n in NODES if n.scope is Scope.GLOBAL}
GLOBAL_BY_NAME = {n.name: n for n in NODES if n.scope is Scope.GLOBAL}
INSTANCE_BY_OFFSET = {n.offset: n for n in NODES if n.scope is Scope.INSTANCE}
INSTANCE_BY_NAME = {n.name: n for n in NODES if n.scope is Scope.INSTANCE}
