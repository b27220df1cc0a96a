"""The merged LUO API (Linux 6.19 sessions) on the control files.

Its commands are ``_IO()``: FUSE hands over only the raw pointer, so the struct is read
from and written to the calling thread's memory (process_vm_readv/writev) under the
kernel's rules for extensible structs: the first u32 is the caller's size; below the
struct's size EINVAL; a larger size with a non-zero tail E2BIG; the reply copies
min(caller's size, ours); a bad pointer EFAULT.

Commands that return a descriptor cannot be completed by a FUSE server. Under
``kexecfs run`` a seccomp filter sends them to the launcher, which forwards them with
kexecfs's own numbers (``abi.RUN_*``): the daemon does the work and expects the launcher
to open the session's ``control`` (or ``fds/<token>``) and install it in the caller.
Reaching the daemon with LUO's own number, such a call was not intercepted: EOPNOTSUPP,
and the log names ``kexecfs run``.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path
from typing import Any, Protocol

from .. import abi
from ..core.capture import take_descriptor
from ..core.errors import KexecfsError, fail
from ..core.instance import Caller, Instance
from ..core.syscalls import read_memory, write_memory

from ..core.machine import LiveUpdate


class Served(Protocol):
    """What the session commands need of the operations (which import this module)."""

    machine: LiveUpdate
    pending_sessions: dict[tuple[int, int], Instance]

_TAIL_CHUNK = 1 << 16


def read_struct(pid: int, address: int, layout: struct.Struct) -> tuple[tuple[Any, ...], int]:
    """The caller's struct at ``address`` and the size it declared (extensible-struct rules)."""
    try:
        (usize,) = struct.unpack("=I", read_memory(pid, address, 4))
        if usize < layout.size:
            raise fail(errno.EINVAL, f"struct of {usize} bytes; this command's is {layout.size}")
        values = layout.unpack(read_memory(pid, address, layout.size))
        for offset in range(layout.size, usize, _TAIL_CHUNK):
            if any(read_memory(pid, address + offset, min(_TAIL_CHUNK, usize - offset))):
                raise fail(errno.E2BIG, f"struct of {usize} bytes has non-zero bytes past the {layout.size} "
                                        f"this kexecfs knows")
    except OSError as exc:
        raise fail(errno.EFAULT, f"cannot read the caller's struct at {address:#x}: {exc.strerror}") from None
    return values, usize


def write_struct(pid: int, address: int, layout: struct.Struct, values: tuple[Any, ...], usize: int) -> None:
    try:
        write_memory(pid, address, layout.pack(*values)[:min(usize, layout.size)])
    except OSError as exc:
        raise fail(errno.EFAULT, f"cannot write the caller's struct at {address:#x}: {exc.strerror}") from None


def _name(raw: bytes, caller: Caller) -> bytes:
    """A session name as the kernel takes it: NUL-terminated within 64 bytes, not empty."""
    end = raw.find(b"\0")
    if end <= 0:
        raise fail(errno.EINVAL, f"{caller}: session name " + ("is empty" if end == 0 else "has no NUL in 64 bytes"))
    return raw[:end]


def _needs_run(caller: Caller, what: str) -> KexecfsError:
    return fail(errno.EOPNOTSUPP, f"{caller}: {what} returns a descriptor, which a FUSE server cannot "
                                  f"install; run the program under 'kexecfs run' (its seccomp helper does)")


# Each handler: (fs, session instance or None, caller, the struct's values) -> values to write back.

def create_session(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    name = _name(v[2], caller)
    if not run:
        raise _needs_run(caller, "CREATE_SESSION")
    session = fs.machine.create_session(name, caller)
    fs.pending_sessions[caller.pid, session.ino] = session
    return v


def retrieve_session(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    name = _name(v[2], caller)
    if not run:
        fs.machine.check_retrievable(name, caller)  # ENOENT and EINVAL as the kernel, then:
        raise _needs_run(caller, "RETRIEVE_SESSION")
    session = fs.machine.retrieve_session(name, caller)
    fs.pending_sessions[caller.pid, session.ino] = session
    return v


def preserve_fd(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    assert inst is not None
    fs.machine.preserve(inst, caller, v[1], v[2], once=True)
    return v


def retrieve_fd(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    """RUN_RETRIEVE_FD's ``fd`` is a unix socket of the caller's: the restored file itself
    (a new open file of it, with exactly the preserved access, at offset 0) comes back over
    it, as the kernel hands back the memfd and not a stand-in (shared mmap and F_GET_SEALS
    work on every kernel). The reply's ``fd`` is 0 then; -1 means "open fds/<token>",
    for files preserved O_APPEND, whose append only the daemon can hold."""
    target = inst if inst is not None else fs.machine.default_instance(caller)  # v1 FD_RESTORE at the top
    pf = fs.machine.restore(target, caller, v[2])  # ENOENT, EBUSY, EACCES before anything else
    if not run:
        raise _needs_run(caller, "SESSION_RETRIEVE_FD")
    if pf.appends or v[1] < 0:
        return v[0], -1, v[2]
    channel = socket.socket(fileno=take_descriptor(caller.pid, v[1]))
    try:
        if channel.family != socket.AF_UNIX:
            raise fail(errno.EINVAL, f"{caller}: RUN_RETRIEVE_FD's fd must be a unix socket")
        restored = pf.reopen(pf.preserved_flags & os.O_ACCMODE)
        try:
            socket.send_fds(channel, [b"f"], [restored])
        finally:
            os.close(restored)
    finally:
        channel.close()
    return v[0], 0, v[2]


def finish(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    assert inst is not None
    if v[1]:
        raise fail(errno.EINVAL, f"{caller}: SESSION_FINISH's reserved field must be 0")
    fs.machine.request("finish", caller, inst)()
    return v


def get_name(fs: Served, inst: Instance | None, caller: Caller, v: tuple, run: bool) -> tuple:
    assert inst is not None
    if v[1]:
        raise fail(errno.EINVAL, f"{caller}: SESSION_GET_NAME's reserved field must be 0")
    return v[0], 0, inst.session_name


HANDLERS = {
    abi.CREATE_SESSION: create_session, abi.RUN_CREATE_SESSION: create_session,
    abi.RETRIEVE_SESSION: retrieve_session, abi.RUN_RETRIEVE_SESSION: retrieve_session,
    abi.SESSION_PRESERVE_FD: preserve_fd,
    abi.SESSION_RETRIEVE_FD: retrieve_fd, abi.RUN_RETRIEVE_FD: retrieve_fd,
    abi.SESSION_FINISH: finish,
    abi.SESSION_GET_NAME: get_name,
}
_RUN_NUMBERS = frozenset({abi.RUN_CREATE_SESSION, abi.RUN_RETRIEVE_SESSION, abi.RUN_RETRIEVE_FD})


def handle(fs: Served, cmd: int, inst: Instance | None, caller: Caller, pid: int, arg: int) -> None:
    """One merged-API command on a control file of scope ``inst`` (None: the top level)."""
    command = abi.SESSION_COMMANDS[cmd]
    if command.device != (inst is None) and cmd != abi.RUN_RETRIEVE_FD:
        raise fail(errno.EINVAL, f"{caller}: {command.name} is for "
                                 + ("/dev/liveupdate (the top-level control)" if command.device else "a session fd"))
    values, usize = read_struct(pid, arg, command.layout)
    out = HANDLERS[cmd](fs, inst, caller, values, cmd in _RUN_NUMBERS)
    write_struct(pid, arg, command.layout, out, usize)


def unknown(cmd: int, inst: Instance | None) -> int:
    """The errno for a 0xBA command that is not in this file's table (as the kernel's luo_ioctl):
    a number of this file's with size or direction bits added is ENOTTY; another ``_IO``
    number of LUO's type is EINVAL; anything else is no LUO command at all (ENOTTY)."""
    nr = abi.ioc_nr(cmd)
    mine = {abi.ioc_nr(c) for c, row in abi.SESSION_COMMANDS.items() if row.device == (inst is None)}
    if abi.ioc_type(cmd) != abi.LIVEUPDATE_IOCTL_TYPE:
        return errno.ENOTTY
    if nr in mine:
        return errno.ENOTTY
    return errno.EINVAL if cmd >> 16 == 0 else errno.ENOTTY


class DeviceLock:
    """``/dev/liveupdate`` is exclusive: a second open is EBUSY until the first is closed.

    The kernel's device is root's alone. kexecfs's may be opened by every uid (an owner's
    session adopts the instance root delegated to it), so the lock is one per uid: no
    user can hold the device against root or against another user.

    FUSE sends RELEASE asynchronously, so a process that closes the top-level control and
    another that opens it at once (the selftests fork one process per test) could see
    the old holder still registered. Before answering EBUSY the lock therefore asks
    the kernel whether anyone still has that file open (``/proc/*/fdinfo``: the inode and
    the mount's device); a holder nobody has open any more is a release in flight.
    """

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.device: str | None = None  # "major:minor" of this mount, set once mounted
        self.holders: dict[int, int] = {}  # uid -> the fh of the open that holds it
        # On a connection adopted from a previous daemon, an open of the device made
        # before the restart is not among the holders until it is used: ask the kernel.
        self.restarted = False

    def take(self, fh: int, caller: Caller, handles: dict[int, Any]) -> None:
        holder = self.holders.get(caller.uid)
        held = holder is not None and holder in handles or holder is None and self.restarted
        if held and self._still_open(caller.uid):
            raise fail(errno.EBUSY, f"open of the top-level control by {caller}: /dev/liveupdate is "
                                    f"exclusive, and uid {caller.uid}'s other open of it is not closed yet")
        self.holders[caller.uid] = fh

    def release(self, fh: int) -> None:
        for uid, holder in list(self.holders.items()):
            if holder == fh:
                del self.holders[uid]

    def _still_open(self, uid: int) -> bool:
        if self.device is None:
            return True
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and self._held_by(proc, uid):
                return True
        return False

    def _held_by(self, proc: Any, uid: int) -> bool:
        try:
            if proc.stat().st_uid != uid:  # /proc/PID belongs to the process's effective uid
                return False
            mounts = None
            for info in (proc / "fdinfo").iterdir():
                text = info.read_text()
                if f"\nino:\t{self.ino}\n" not in text:
                    continue
                mounts = mounts or _mount_devices(proc)
                mnt_id = next(line.split()[1] for line in text.splitlines() if line.startswith("mnt_id:"))
                if mounts.get(mnt_id) == self.device:
                    return True
        except (OSError, StopIteration):
            pass  # the process is gone, or not ours to read
        return False


def _mount_devices(proc: Any) -> dict[str, str]:
    """{mount id: "major:minor"} of a process's mount namespace."""
    out = {}
    for line in (proc / "mountinfo").read_text().splitlines():
        fields = line.split()
        out[fields[0]] = fields[2]
    return out


def mount_device(mountpoint: str) -> str | None:
    """The "major:minor" of the mount at ``mountpoint``, from the daemon's own mount table
    (a stat of the mount point would be a request to this daemon)."""
    for line in open("/proc/self/mountinfo").read().splitlines():
        fields = line.split()
        if fields[4] == mountpoint:
            return fields[2]
    return None
