"""A small client library for services: the kexecfs tree behind a typed API.

It uses the LUO ioctls on ``control`` where they fit (preserve, unpreserve, state) and
the files where a FUSE server cannot do what ``/dev/liveupdate`` does (restore opens
``fds/<token>``, then puts back the file position the image recorded)::

    kx = Kexecfs("/run/kexecfs")
    svc = kx.instance("vm-42")              # or kx.create_instance("vm-42")
    svc.preserve(memfd, token=1)
    ...                                     # prepare, freeze, kexec (operator)
    fd = svc.restore(1)                     # after the kexec
    svc.finish()
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import abi
from .core.names import directory_name
from .core.syscalls import FUSE_SUPER_MAGIC, statfs_type
from .defaults import DEFAULT_MOUNTPOINT

STATES = {number: word for word, number in abi.STATE_NUMBERS.items()}
_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]


class NotKexecfs(OSError):
    """The path is not a kexecfs mount (perhaps the daemon is not running)."""


@dataclass(frozen=True)
class Preserved:
    """A line of ``fd_preserve``."""

    token: int
    kind: str
    size: int
    flags: str


def _check_mount(path: Path) -> None:
    # Without the mount, "echo 5 > /run/kexecfs/x/fd_preserve" would quietly create a
    # plain file; a FUSE filesystem with our top-level files is kexecfs.
    try:
        fs_type = statfs_type(str(path))
    except OSError as exc:
        raise NotKexecfs(exc.errno, f"{path}: {exc.strerror} (is the kexecfs daemon running?)") from None
    if fs_type != FUSE_SUPER_MAGIC or not (path / "state").exists():
        raise NotKexecfs(errno.ENOTCONN, f"{path} is not a kexecfs mount")


def _wait(state_file: Path, want: str | None, timeout: float | None) -> str:
    """Sleep in poll() on a state file until it reads ``want`` (or changes, if None)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    fd = os.open(state_file, os.O_RDONLY | os.O_CLOEXEC)
    try:
        first = current = os.pread(fd, 64, 0).decode().strip()
        poller = select.poll()
        poller.register(fd, select.POLLPRI | select.POLLERR)
        while (current == first) if want is None else (current != want):
            left = None if deadline is None else max(0, deadline - time.monotonic())
            if left == 0 or not poller.poll(None if left is None else int(left * 1000)):
                raise TimeoutError(f"{state_file} is still {current!r}")
            current = os.pread(fd, 64, 0).decode().strip()
        return current
    finally:
        os.close(fd)


class InstanceDir:
    """One instance directory: what a service holds, the way a LUO session does."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = path.name

    def _ioctl(self, cmd: int, arg: bytes | bytearray = b"") -> bytearray:
        buf = bytearray(arg)
        fd = os.open(self.path / "control", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if buf:
                fcntl.ioctl(fd, cmd, buf)
            else:
                fcntl.ioctl(fd, cmd)
        finally:
            os.close(fd)
        return buf

    def preserve(self, fd: int, token: int | None = None) -> int:
        """Preserve ``fd`` (of this process) under ``token`` (lowest free if None); return the token."""
        while True:
            chosen = self._free_token() if token is None else token
            try:
                self._ioctl(abi.FD_PRESERVE, abi.LIVEUPDATE_FD.pack(fd, 0, chosen))
                return chosen
            except FileExistsError:
                if token is not None:
                    raise  # the caller's own token is taken; a free one was taken by a racer

    def unpreserve(self, token: int) -> None:
        self._ioctl(abi.FD_UNPRESERVE, abi.TOKEN.pack(token))

    def preserved(self) -> list[Preserved]:
        out = []
        for line in (self.path / "fd_preserve").read_text().splitlines():
            token, kind, size, flags = line.split()
            out.append(Preserved(int(token), kind, int(size), flags))
        return out

    def _free_token(self) -> int:
        used = {p.token for p in self.preserved()}
        return next(t for t in range(len(used) + 1) if t not in used)

    def state(self) -> str:
        (number,) = abi.STATE.unpack(self._ioctl(abi.GET_STATE, bytes(abi.STATE.size)))
        return STATES.get(number, "undefined")

    def wait_for_state(self, want: str | None = None, timeout: float | None = None) -> str:
        return _wait(self.path / "state", want, timeout)

    def restore(self, token: int, flags: int | None = None) -> int:
        """After a kexec: a descriptor of the restored file, at its preserved position.

        ``flags`` default to the preserved descriptor's access (``r``, ``w``, ``rw``, with
        O_APPEND for ``a``): asking for more is EACCES, as a restore never grants more.
        """
        path = self.path / "fds" / str(token)
        if flags is None:
            flags = _open_flags(next((p.flags for p in self.preserved() if p.token == token), "rw"))
        fd = os.open(path, flags | os.O_CLOEXEC)
        try:
            pos = 0 if flags & os.O_APPEND else _preserved_position(path)
            if pos:
                os.lseek(fd, pos, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def seals(self, token: int) -> int:
        """The seals the preserved memfd had (F_GET_SEALS cannot be asked of a FUSE file)."""
        return int(os.getxattr(self.path / "fds" / str(token), "user.kexecfs.seals"))

    def finish(self) -> None:
        (self.path / "state").write_text("finish\n")


class Kexecfs:
    """A kexecfs mount."""

    def __init__(self, mount: str | os.PathLike[str] = DEFAULT_MOUNTPOINT) -> None:
        self.path = Path(mount)
        _check_mount(self.path)

    def create_instance(self, name: str) -> InstanceDir:
        (self.path / name).mkdir()
        return InstanceDir(self.path / name)

    def create_session(self, name: str | bytes) -> Session:
        """CREATE_SESSION: a new session (any name LUO takes: 1-63 bytes without NUL)."""
        return _open_session(self.path, abi.RUN_CREATE_SESSION, name)

    def retrieve_session(self, name: str | bytes) -> Session:
        """RETRIEVE_SESSION, after a kexec: the session of that name, once."""
        return _open_session(self.path, abi.RUN_RETRIEVE_SESSION, name)

    def instance(self, name: str) -> InstanceDir:
        if not (self.path / name).is_dir():
            raise FileNotFoundError(errno.ENOENT, f"no instance {name!r} in {self.path}")
        return InstanceDir(self.path / name)

    def delete_instance(self, name: str) -> None:
        (self.path / name).rmdir()

    def instances(self) -> list[str]:
        return sorted(p.name for p in self.path.iterdir() if p.is_dir())

    def state(self) -> str:
        return (self.path / "state").read_text().strip()

    def event(self, event: str) -> str:
        """Send a global event (root): prepare, freeze, cancel, kexec, finish."""
        (self.path / "state").write_text(event + "\n")
        return self.state()

    def wait_for_state(self, want: str | None = None, timeout: float | None = None) -> str:
        return _wait(self.path / "state", want, timeout)

    def status(self) -> dict[str, str]:
        lines = (self.path / "status").read_text().splitlines()
        return dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in lines)


class Session:
    """A LUO session (Linux 6.19's API) on kexecfs: an instance used through its session fd.

    Where ``/dev/liveupdate`` would hand back descriptors, this process does it itself
    (what ``kexecfs run`` does for unmodified programs): it asks the daemon with kexecfs
    run's numbers, then opens the session's ``control`` or ``fds/<token>``. Closing a
    created session unpreserves its files; closing a retrieved one finishes it::

        with Kexecfs().create_session("db") as db:
            db.preserve(memfd, 0x1A)
            ...                            # kept open across prepare/freeze/kexec
        with Kexecfs().retrieve_session("db") as db:   # after the kexec
            fd = db.retrieve(0x1A)
            db.finish()
    """

    def __init__(self, mount: Path, directory: str, fd: int) -> None:
        self.path = mount / directory
        self.fd = fd  # the session fd: an open instance control, bound to this session

    def preserve(self, fd: int, token: int) -> None:
        _session_ioctl(self.fd, abi.SESSION_PRESERVE_FD, abi.SESSION_FD, (abi.SESSION_FD.size, fd, token))

    def retrieve(self, token: int) -> int:
        """A new descriptor (O_CLOEXEC) of restored file ``token``, at offset 0: the file
        itself, sent by the daemon (``fds/<token>`` for a file preserved O_APPEND)."""
        mine, daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with mine, daemons:
            out = _session_ioctl(self.fd, abi.RUN_RETRIEVE_FD, abi.SESSION_FD,
                                 (abi.SESSION_FD.size, daemons.fileno(), token))
            if out[1] == 0:
                return socket.recv_fds(mine, 16, 1, socket.MSG_CMSG_CLOEXEC)[1][0]
        access = next((p.flags for p in InstanceDir(self.path).preserved() if p.token == token), "rw")
        return os.open(self.path / "fds" / str(token), _open_flags(access) | os.O_CLOEXEC)

    def finish(self) -> None:
        _session_ioctl(self.fd, abi.SESSION_FINISH, abi.SESSION_FINISH_ARG, (abi.SESSION_FINISH_ARG.size, 0))

    def name(self) -> bytes:
        out = _session_ioctl(self.fd, abi.SESSION_GET_NAME, abi.SESSION_NAME, (abi.SESSION_NAME.size, 0, b""))
        return out[2].split(b"\0", 1)[0]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _session_ioctl(fd: int, cmd: int, layout: Any, values: tuple[Any, ...]) -> tuple[Any, ...]:
    """An ``_IO`` command whose struct the daemon reads and writes in this process's memory."""
    buf = ctypes.create_string_buffer(layout.pack(*values), layout.size)
    if _libc.ioctl(fd, cmd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return layout.unpack(buf.raw)


def _open_session(mount: Path, cmd: int, name: str | bytes) -> Session:
    raw = name.encode() if isinstance(name, str) else name
    directory = directory_name(raw)  # EINVAL for a name LUO refuses, before asking
    top = os.open(mount / "control", os.O_RDWR | os.O_CLOEXEC)  # /dev/liveupdate: exclusive, so briefly
    try:
        _session_ioctl(top, cmd, abi.SESSION, (abi.SESSION.size, -1, raw))
        return Session(mount, directory, os.open(mount / directory / "control", os.O_RDWR | os.O_CLOEXEC))
    finally:
        os.close(top)


def _open_flags(access: str) -> int:
    """open(2) flags for a ``fd_preserve`` flags column (``r``, ``w``, ``rw``, ``a`` for O_APPEND)."""
    mode = {"r": os.O_RDONLY, "w": os.O_WRONLY}.get(access.rstrip("a"), os.O_RDWR)
    return mode | (os.O_APPEND if access.endswith("a") else 0)


def _preserved_position(path: Path) -> int:
    try:
        return int(os.getxattr(path, "user.kexecfs.pos"))
    except PermissionError:
        # A write-only file's mode (0200) lets the kernel refuse user xattrs to its owner:
        # it restores at offset 0.
        return 0
