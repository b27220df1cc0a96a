"""The LUO PATCH v1 ioctl ABI (June 2025), byte for byte, as carried by ``control`` files.

Ioctl type 0xBA. The one argument structure::

    struct liveupdate_fd {      /* 16 bytes, native byte order (little-endian on x86-64) */
        __s32 fd;               /* @0  the caller's descriptor (FD_PRESERVE); out: restored fd */
        __u32 flags;            /* @4  reserved, must be 0 */
        __aligned_u64 token;    /* @8  the caller's name for the file, unique per instance */
    };

GET_STATE writes a ``__u32`` state: UNDEFINED=0, NORMAL=1, PREPARED=2, FROZEN=3, UPDATED=4.

+-------------------------------+------------+-------------------+----------------------------+
| command                       | number     | argument          | errors                     |
+===============================+============+===================+============================+
| LIVEUPDATE_IOCTL_FD_PRESERVE  | 0x4010ba00 | liveupdate_fd in  | EBADF EBUSY ENOENT EEXIST  |
| LIVEUPDATE_IOCTL_FD_UNPRESERVE| 0x4008ba01 | u64 token in      | EBUSY ENOENT               |
| LIVEUPDATE_IOCTL_FD_RESTORE   | 0xc010ba02 | liveupdate_fd i/o | EBUSY ENOENT EOPNOTSUPP    |
| LIVEUPDATE_IOCTL_GET_STATE    | 0x8004ba03 | u32 out           |                            |
| LIVEUPDATE_IOCTL_PREPARE      | 0x0000ba04 | none              | EINVAL EPERM               |
| LIVEUPDATE_IOCTL_FREEZE       | 0x0000ba05 | none              | EINVAL EPERM               |
| LIVEUPDATE_IOCTL_CANCEL       | 0x0000ba06 | none              | ENOENT EPERM               |
| LIVEUPDATE_IOCTL_FINISH       | 0x0000ba07 | none              | EINVAL EPERM               |
+-------------------------------+------------+-------------------+----------------------------+

Any other command answers ENOTTY. ``include/kexecfs.h`` holds the same definitions for C.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

LIVEUPDATE_IOCTL_TYPE = 0xBA

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (LIVEUPDATE_IOCTL_TYPE << 8) | nr


def ioc_size(cmd: int) -> int:
    return (cmd >> 16) & 0x3FFF


LIVEUPDATE_FD = struct.Struct("=iIQ")  # struct liveupdate_fd
TOKEN = struct.Struct("=Q")
STATE = struct.Struct("=I")
STATE_UNDEFINED = 0
#: The state words of ``state`` files and the numbers GET_STATE reports for them.
STATE_NUMBERS = {"normal": 1, "prepared": 2, "frozen": 3, "updated": 4}
#: The events a ``state`` file takes (SPEC section 2); PREPARE..FINISH send the same.
EVENTS = ("prepare", "cancel", "freeze", "kexec", "finish")

FD_PRESERVE = _ioc(_IOC_WRITE, 0, LIVEUPDATE_FD.size)
FD_UNPRESERVE = _ioc(_IOC_WRITE, 1, TOKEN.size)
FD_RESTORE = _ioc(_IOC_READ | _IOC_WRITE, 2, LIVEUPDATE_FD.size)
GET_STATE = _ioc(_IOC_READ, 3, STATE.size)
PREPARE = _ioc(_IOC_NONE, 4, 0)
FREEZE = _ioc(_IOC_NONE, 5, 0)
CANCEL = _ioc(_IOC_NONE, 6, 0)
FINISH = _ioc(_IOC_NONE, 7, 0)


@dataclass(frozen=True)
class Command:
    """A row of the ioctl table: what the number is (kexecfs.fs.control says what it does)."""

    name: str
    number: int
    event: str = ""  # for the state-machine commands: the event they send (answered from a task)


COMMANDS: dict[int, Command] = {c.number: c for c in (
    Command("LIVEUPDATE_IOCTL_FD_PRESERVE", FD_PRESERVE),
    Command("LIVEUPDATE_IOCTL_FD_UNPRESERVE", FD_UNPRESERVE),
    Command("LIVEUPDATE_IOCTL_FD_RESTORE", FD_RESTORE),
    Command("LIVEUPDATE_IOCTL_GET_STATE", GET_STATE),
    Command("LIVEUPDATE_IOCTL_PREPARE", PREPARE, "prepare"),
    Command("LIVEUPDATE_IOCTL_FREEZE", FREEZE, "freeze"),
    Command("LIVEUPDATE_IOCTL_CANCEL", CANCEL, "cancel"),
    Command("LIVEUPDATE_IOCTL_FINISH", FINISH, "finish"),
)}

assert (FD_PRESERVE, FD_UNPRESERVE, FD_RESTORE, GET_STATE) == (0x4010BA00, 0x4008BA01, 0xC010BA02, 0x8004BA03)


# ---------------------------------------------------------------------------- the merged API
#
# Linux 6.19 merged a session-based LUO API (include/uapi/linux/liveupdate.h), beside which
# kexecfs keeps v1 above. Every command is ``_IO(0xBA, nr)``: the number carries no size,
# FUSE passes only the raw pointer, and the struct starts with its own ``__u32 size``
# (extensible-struct rules, see :func:`kexecfs.fs.control` and SPEC 6b). A session is an
# instance: the top-level ``control`` is ``/dev/liveupdate``; an instance's ``control``, or
# the descriptor CREATE/RETRIEVE_SESSION return, is the session fd.

SESSION_NAME_LENGTH = 64  # with the terminating NUL

#: struct liveupdate_ioctl_create_session / _retrieve_session: {u32 size; s32 fd out; u8 name[64]}
SESSION = struct.Struct("=Ii64s")
#: struct liveupdate_session_preserve_fd / _retrieve_fd: {u32 size; s32 fd; aligned u64 token}
SESSION_FD = struct.Struct("=IiQ")
#: struct liveupdate_session_finish: {u32 size; u32 reserved}
SESSION_FINISH_ARG = struct.Struct("=II")
#: struct liveupdate_session_get_name: {u32 size; u32 reserved; u8 name[64] out}
SESSION_NAME = struct.Struct("=II64s")

CREATE_SESSION = _ioc(_IOC_NONE, 0x00, 0)
RETRIEVE_SESSION = _ioc(_IOC_NONE, 0x01, 0)
SESSION_PRESERVE_FD = _ioc(_IOC_NONE, 0x40, 0)
SESSION_RETRIEVE_FD = _ioc(_IOC_NONE, 0x41, 0)
SESSION_FINISH = _ioc(_IOC_NONE, 0x42, 0)
SESSION_GET_NAME = _ioc(_IOC_NONE, 0x43, 0)

# kexecfs run's own numbers: the launcher forwards a call it intercepted (one that must
# return a descriptor, which a FUSE server cannot install) with the same struct, and the
# daemon knows the launcher will open the file and install it. A call with LUO's own
# number that reaches the daemon was not intercepted: EOPNOTSUPP, naming kexecfs run.
RUN_CREATE_SESSION = _ioc(_IOC_NONE, 0x80, 0)
RUN_RETRIEVE_SESSION = _ioc(_IOC_NONE, 0x81, 0)
RUN_RETRIEVE_FD = _ioc(_IOC_NONE, 0x82, 0)


@dataclass(frozen=True)
class SessionCommand:
    """A row of the merged API's table: where the number is answered and its struct."""

    name: str
    number: int
    layout: struct.Struct
    device: bool  # answered on the top-level control (/dev/liveupdate), else on a session fd
    returns_fd: bool = False  # needs kexecfs run (seccomp) to hand its descriptor back


SESSION_COMMANDS: dict[int, SessionCommand] = {c.number: c for c in (
    SessionCommand("LIVEUPDATE_IOCTL_CREATE_SESSION", CREATE_SESSION, SESSION, True, True),
    SessionCommand("LIVEUPDATE_IOCTL_RETRIEVE_SESSION", RETRIEVE_SESSION, SESSION, True, True),
    SessionCommand("LIVEUPDATE_SESSION_PRESERVE_FD", SESSION_PRESERVE_FD, SESSION_FD, False),
    SessionCommand("LIVEUPDATE_SESSION_RETRIEVE_FD", SESSION_RETRIEVE_FD, SESSION_FD, False, True),
    SessionCommand("LIVEUPDATE_SESSION_FINISH", SESSION_FINISH, SESSION_FINISH_ARG, False),
    SessionCommand("LIVEUPDATE_SESSION_GET_NAME", SESSION_GET_NAME, SESSION_NAME, False),
    SessionCommand("KEXECFS_RUN_CREATE_SESSION", RUN_CREATE_SESSION, SESSION, True),
    SessionCommand("KEXECFS_RUN_RETRIEVE_SESSION", RUN_RETRIEVE_SESSION, SESSION, True),
    SessionCommand("KEXECFS_RUN_RETRIEVE_FD", RUN_RETRIEVE_FD, SESSION_FD, False),
)}

#: What ``kexecfs run``'s seccomp filter sends to the launcher: the calls that return a
#: descriptor (v1's FD_RESTORE included), and the launcher's own number for each.
INTERCEPTED = {CREATE_SESSION: RUN_CREATE_SESSION, RETRIEVE_SESSION: RUN_RETRIEVE_SESSION,
               SESSION_RETRIEVE_FD: RUN_RETRIEVE_FD, FD_RESTORE: RUN_RETRIEVE_FD}


def ioc_nr(cmd: int) -> int:
    return cmd & 0xFF


def ioc_type(cmd: int) -> int:
    return (cmd >> 8) & 0xFF


assert (CREATE_SESSION, SESSION_GET_NAME, SESSION.size, SESSION_FD.size) == (0xBA00, 0xBA43, 72, 16)
