"""The text files of the tree: what a read shows and what a written command does.

Every store has the same rhythm (the kernel's cgroup and LUO handlers): parse and check
the one command, then let the core act; the core raises the errno. The node table
(:mod:`.nodes`) holds these functions in its rows.
"""

from __future__ import annotations

import errno
from typing import Protocol

from ..core.errors import fail
from ..core.faults import inject
from ..core.instance import Caller, Instance
from ..core.machine import LiveUpdate
from . import fusehook


class Served(Protocol):
    """What these functions need of the operations that call them (which import this module)."""

    machine: LiveUpdate
    passthrough: bool

    async def run_event(self, event: str, caller: Caller, inst: Instance | None = None) -> None: ...


# ------------------------------------------------------------------ shows (reads)


def show_global_state(fs: Served, inst: None) -> str:
    return fs.machine.state.word + "\n"


def show_instance_state(fs: Served, inst: Instance) -> str:
    return fs.machine.instance_state(inst).word + "\n"


def show_status(fs: Served, inst: None) -> str:
    inject("show_status")
    status = fs.machine.status()
    status["restore"] = "passthrough" if fs.passthrough and fusehook.passthrough_available() else "proxy"
    # "key: value" lines; nothing (None) is an empty value, as last_image has always been.
    return "".join(f"{k}: {'' if v is None else v}\n" for k, v in status.items())


def show_preserved(fs: Served, inst: Instance) -> str:
    return inst.listing()


def show_max_files(fs: Served, inst: Instance) -> str:
    return _limit_text(inst.max_files)


def show_max_bytes(fs: Served, inst: Instance) -> str:
    return _limit_text(inst.max_bytes)


# ------------------------------------------------------------------ stores (writes)


async def store_event(fs: Served, inst: Instance | None, caller: Caller, command: str) -> None:
    await fs.run_event(command, caller, inst)


async def store_preserve(fs: Served, inst: Instance, caller: Caller, command: str) -> None:
    words = command.split()
    # At most 20 digits (a u64): int() of a megabyte of digits raises, and takes long.
    if len(words) > 2 or not all(w.lstrip("-").isascii() and w.lstrip("-").isdigit() and len(w) <= 20
                                 for w in words):
        raise fail(errno.EINVAL, f"fd_preserve: {caller} wrote {command[:80]!r}; expected 'FD [TOKEN]'")
    fs.machine.preserve(inst, caller, int(words[0]), int(words[1]) if len(words) == 2 else None)


async def store_unpreserve(fs: Served, inst: Instance, caller: Caller, command: str) -> None:
    if not (command.isascii() and command.isdigit() and len(command) <= 20):
        raise fail(errno.EINVAL, f"fd_unpreserve: {caller} wrote {command[:80]!r}; expected a token")
    fs.machine.unpreserve(inst, caller, int(command))


async def store_max_files(fs: Served, inst: Instance, caller: Caller, command: str) -> None:
    fs.machine.set_limit(inst, caller, "files", _parse_limit(command, caller, "files.max"))


async def store_max_bytes(fs: Served, inst: Instance, caller: Caller, command: str) -> None:
    fs.machine.set_limit(inst, caller, "bytes", _parse_limit(command, caller, "bytes.max"))


def _limit_text(value: int | None) -> str:
    return ("max" if value is None else str(value)) + "\n"


def _parse_limit(command: str, caller: Caller, name: str) -> int | None:
    """A limit as written: "max" for none, or a decimal number below 2**63."""
    if command == "max":
        return None
    if not (command.isascii() and command.isdigit() and len(command) <= 19 and int(command) < 1 << 63):
        raise fail(errno.EINVAL, f"{name}: {caller} wrote {command[:80]!r}; expected a number or 'max'")
    return int(command)
