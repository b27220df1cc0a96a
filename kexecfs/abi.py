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
