"""The ``control`` files: LUO's ioctls dispatched from one table, as LUO's ``luo_ioctl_ops[]``.

:mod:`kexecfs.abi` holds the numbers and struct layouts; this module holds what each
command does. The C hook calls :func:`dispatch` synchronously in the trio thread for every
FUSE_IOCTL request. Commands that look or register are answered right there (a task per
request would cost more than their work); events of the state machine can take long,
so a task answers them.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable

from .. import abi
from ..core.errors import KexecfsError, fail, refusal
from ..core.instance import Caller, Instance
from . import fusehook
from . import sessions
from .nodes import Scope
from .operations import note_request

from .operations import KexecfsOperations

log = logging.getLogger("kexecfs.fs")

IoctlHandler = Callable[[KexecfsOperations, "Instance | None", Caller, bytes], bytes]


def _target(fs: KexecfsOperations, inst: Instance | None, caller: Caller) -> Instance:
    """The instance an FD ioctl acts on: the control file's, or ``default`` at the top."""
    return inst if inst is not None else fs.machine.default_instance(caller)


def fd_preserve(fs: KexecfsOperations, inst: Instance | None, caller: Caller, data: bytes) -> bytes:
    fd, flags, token = abi.LIVEUPDATE_FD.unpack(data)
    if flags:
        raise fail(errno.EINVAL, f"{caller}: struct liveupdate_fd.flags must be 0, not {flags:#x}")
    fs.machine.preserve(_target(fs, inst, caller), caller, fd, token)
    return b""


def fd_unpreserve(fs: KexecfsOperations, inst: Instance | None, caller: Caller, data: bytes) -> bytes:
    (token,) = abi.TOKEN.unpack(data)
    fs.machine.unpreserve(_target(fs, inst, caller), caller, token)
    return b""


def fd_restore(fs: KexecfsOperations, inst: Instance | None, caller: Caller, data: bytes) -> bytes:
    _fd, _flags, token = abi.LIVEUPDATE_FD.unpack(data)
    target = _target(fs, inst, caller)
    fs.machine.restore(target, caller, token)  # EACCES, ENOENT, EBUSY as /dev/liveupdate would
    raise fail(errno.EOPNOTSUPP, f"{caller}: FD_RESTORE cannot install a descriptor from a FUSE server; "
                                 f"open {target.name}/fds/{token} instead (kexecfs.client does)")


def get_state(fs: KexecfsOperations, inst: Instance | None, caller: Caller, data: bytes) -> bytes:
    state = fs.machine.instance_state(inst) if inst else fs.machine.state
    return abi.STATE.pack(state.number)


#: The commands answered at once; the event commands (``abi.Command.event``) go to the machine.
HANDLERS: dict[int, IoctlHandler] = {
    abi.FD_PRESERVE: fd_preserve,
    abi.FD_UNPRESERVE: fd_unpreserve,
    abi.FD_RESTORE: fd_restore,
    abi.GET_STATE: get_state,
}

# Not a LUO command on a control file (TCGETS from isatty(), ioctls on other files):
# ENOTTY, as any file would answer, and nothing worth a log line.
_NOT_OURS = KexecfsError(errno.ENOTTY, "")


class _Answered(Exception):
    """A resent ioctl that the previous daemon had done before it died: answered 0."""


_ANSWERED = _Answered()


def dispatch(fs: KexecfsOperations, req: int, ino: int, cmd: int, fh: int, flags: int, in_data: bytes,
             out_size: int, arg: int, pid: int, uid: int, gid: int) -> None:
    """The C hook's callback (see :data:`kexecfs.fs.fusehook.IoctlHandler`)."""
    unique = note_request()
    try:
        if (done := fs.answered_before(unique)) is not None:  # resent after a restart, and done then
            raise KexecfsError(done, "") if done else _ANSWERED
        command = abi.COMMANDS.get(cmd)
        h = None
        if not flags & fusehook.FUSE_IOCTL_DIR:
            h = fs.handles.get(fh) or fs.taken_over(fh, ino)
        if h is None or h.node is None or not h.node.control or abi.ioc_type(cmd) != abi.LIVEUPDATE_IOCTL_TYPE:
            raise _NOT_OURS
        inst = fs.live_instance(h) if h.node.scope is Scope.INSTANCE else None
        name = command.name if command else abi.SESSION_COMMANDS[cmd].name if cmd in abi.SESSION_COMMANDS \
            else f"{cmd:#x}"
        caller = Caller(pid, uid, gid, f"{inst.name + '/' if inst else ''}control {name}")
        h.check_opener(caller)
        if command is None:
            _merged_api(fs, req, cmd, inst, caller, arg)
            return
        if command.event:
            assert fs.nursery is not None
            fs.nursery.start_soon(_event, fs, req, inst, caller, command)
            return
        out = HANDLERS[cmd](fs, inst, caller, in_data)
    except _Answered:
        fusehook.reply_ioctl(req, b"")
    except Exception as exc:
        _failed(req, cmd, exc)
    else:
        fusehook.reply_ioctl(req, out)


def _merged_api(fs: KexecfsOperations, req: int, cmd: int, inst: Instance | None, caller: Caller,
                arg: int) -> None:
    """A 0xBA command that is not v1's: the session table, or the kernel's errno for a stray one."""
    if cmd not in abi.SESSION_COMMANDS:
        raise fail(sessions.unknown(cmd, inst), f"{caller}: no such LUO command on this file")
    sessions.handle(fs, cmd, inst, caller, caller.pid, arg)
    fusehook.reply_ioctl(req, b"")


async def _event(fs: KexecfsOperations, req: int, inst: Instance | None, caller: Caller,
                 command: abi.Command) -> None:
    try:
        await fs.run_event(command.event, caller, inst)
    except Exception as exc:
        _failed(req, command.number, exc)
    else:
        fusehook.reply_ioctl(req, b"")


def _failed(req: int, cmd: int, exc: Exception) -> None:
    """Answer a failed ioctl as other requests are answered: errno, one log line."""
    answer = refusal(exc)
    if answer is None:
        log.error("ioctl %#x: unexpected error; answering EIO", cmd, exc_info=exc)
        fusehook.reply_err(req, errno.EIO)
        return
    if answer.message:
        log.warning("ioctl %#x: %s", cmd, answer)
    fusehook.reply_err(req, answer.errno)
