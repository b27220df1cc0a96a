"""Where the daemon's descriptors outlive the daemon: systemd's fd store, or a keeper.

Both are one interface, :class:`DescriptorStore`: ``keep`` a copy of a descriptor under
a name, ``release`` it, ``retrieve`` everything held when the daemon starts, and ``end``
when the filesystem ends (an unmount: nothing is to be kept any more). The daemon picks
one at start (:func:`open_store`):

- under systemd (``KEXECFS_FD_STORE=systemd`` in the unit, or ``$FDSTORE``, which
  systemd >= 254 sets when the unit has a FileDescriptorStoreMax=): ``FDSTORE=1`` with
  ``FDNAME=`` on the notify socket, and back through ``LISTEN_FDS``/``LISTEN_FDNAMES``;
  kexecfs.service sets ``FileDescriptorStorePreserve=yes`` so the store outlives a stop;
- otherwise a keeper process (:mod:`.keeper`), started by the first daemon of a mount
  and found again through its socket in the image directory;
- ``KEXECFS_FD_STORE=none``: nothing outlives the daemon, as before kexecfs had a store.
  A crash ends the mount (ENOTCONN) and the next daemon recovers from the image alone,
  as after a power cut; the crash tests of the image use it.
"""

from __future__ import annotations

import array
import io
import logging
import logging.handlers
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

from . import keeper
from ..systemd import JournalHandler

log = logging.getLogger("kexecfs.fdstore")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START


class StoreError(RuntimeError):
    """The store cannot be reached or refuses the daemon (another daemon serves)."""


class DescriptorStore(Protocol):
    kind: str

    def retrieve(self) -> dict[str, int]: ...

    def keep(self, name: str, fd: int, watch: bool = False) -> None: ...

    def release(self, name: str) -> None: ...

    def end(self) -> None: ...


# ---------------------------------------------------------------------------- systemd


def notify_address(value: str) -> str:
    return "\0" + value[1:] if value.startswith("@") else value


class SystemdStore:
    """systemd's fd store for this service (sd_notify(3), sd_listen_fds_with_names(3))."""

    kind = "systemd"

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        address = self.environ.get("NOTIFY_SOCKET")
        if not address:
            raise StoreError("KEXECFS_FD_STORE=systemd, but there is no NOTIFY_SOCKET: not started by systemd")
        self.address = notify_address(address)
        self.names: set[str] = set()

    def retrieve(self) -> dict[str, int]:
        """The descriptors systemd handed over (once: the variables are unset after)."""
        env = self.environ
        if env.get("LISTEN_PID") != str(os.getpid()):
            return {}
        count = int(env.get("LISTEN_FDS", "0"))
        names = env.get("LISTEN_FDNAMES", "").split(":") if count else []
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(var, None)
        held: dict[str, int] = {}
        for i in range(count):
            fd = LISTEN_FDS_START + i
            os.set_inheritable(fd, False)
            name = names[i] if i < len(names) else "unknown"
            if name in held:  # FDSTORE keeps every copy sent under one name: the last one counts
                os.close(held[name])
            held[name] = fd
        self.names = set(held)
        return held

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        if name in self.names:
            self.release(name)  # systemd would keep both under one name
        # FDPOLL=0 but for the connection: systemd drops a stored descriptor that reports
        # POLLHUP or POLLERR, which is right for a dead connection only.
        self._notify(f"FDSTORE=1\nFDNAME={name}" + ("" if watch else "\nFDPOLL=0"), [fd])
        self.names.add(name)

    def release(self, name: str) -> None:
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self.names.discard(name)

    def end(self) -> None:
        for name in sorted(self.names):
            self.release(name)

    def _notify(self, text: str, fds: list[int] | None = None) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([text.encode()], ancillary, 0, self.address)


# ---------------------------------------------------------------------------- keeper


class KeeperStore:
    """The keeper of this image directory: connected to, or started if there is none."""

    kind = "keeper"

    def __init__(self, image_dir: Path) -> None:
        self.path = image_dir / keeper.SOCKET_NAME
        self.image_dir = image_dir
        self._hello()

    def _hello(self) -> None:
        answer = None
        sock = self._connect()
        if sock is not None:
            answer = self._greet(sock)  # None: a keeper that is dying or dead (its socket is left)
        if answer is None:
            sock = self._start()
            answer = self._greet(sock)
        if answer is None:
            raise StoreError(f"the keeper started for {self.path} does not answer")
        self.sock = sock
        if answer.startswith("BUSY"):
            raise StoreError(f"another kexecfs daemon (pid {answer.split()[1]}) serves this mount with the "
                             f"image directory {self.image_dir}")
        self.keeper_pid = int(answer.split()[1])

    @staticmethod
    def _greet(sock: socket.socket) -> str | None:
        try:
            keeper.send(sock, f"HELLO {os.getpid()}")
            answer, _ = keeper.receive(sock)
        except (ConnectionResetError, BrokenPipeError):
            answer = ""
        if not answer:
            sock.close()
            return None
        return answer

    def replace_keeper(self) -> None:
        """The keeper died: a new one, empty (the caller stores everything again)."""
        self.sock.close()
        self._hello()

    def _connect(self) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.connect(keeper.socket_address(self.path))
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            return None

    def _start(self) -> socket.socket:
        """A new keeper: it returns once its socket is bound, and lives on in the background."""
        target, stderr = keeper_log()
        subprocess.run([sys.executable, "-m", "kexecfs.fs.keeper", str(self.path)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                            keeper.LOG_TARGET: target})
        if isinstance(stderr, io.IOBase):
            stderr.close()
        sock = self._connect()
        if sock is None:
            raise StoreError(f"the keeper started for {self.path} does not answer")
        log.info("started a keeper for %s", self.path)
        return sock

    def retrieve(self) -> dict[str, int]:
        keeper.send(self.sock, "FETCH")
        held: dict[str, int] = {}
        while True:
            text, fds = keeper.receive(self.sock)
            verb, _, rest = text.partition(" ")
            if verb == "DONE":
                return held
            if verb != "FDS" or len(rest.split()) != len(fds):
                raise StoreError(f"the keeper answered {text[:80]!r}")
            held.update(zip(rest.split(), fds))

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        keeper.send(self.sock, f"STORE {name}", [fd])

    def release(self, name: str) -> None:
        keeper.send(self.sock, f"REMOVE {name}")

    def end(self) -> None:
        try:
            keeper.send(self.sock, "END")
        except OSError:
            pass  # gone already: a keeper also ends when the connection does
        self.sock.close()


def keeper_log() -> tuple[str, Any]:
    """Where a keeper started now logs: where the daemon does (its journal, syslog or log
    file; its stderr only if that is a file). Never a pipe: one held open by the keeper
    would keep whoever reads the daemon's output waiting for its end."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, JournalHandler):
            return "journal", subprocess.DEVNULL
        if isinstance(handler, logging.handlers.SysLogHandler):
            return "syslog", subprocess.DEVNULL
        if isinstance(handler, logging.FileHandler):
            return "stderr", open(handler.baseFilename, "ab")
    return "stderr", 2 if stat.S_ISREG(os.fstat(2).st_mode) else subprocess.DEVNULL


class NoStore:
    """Nothing outlives the daemon (``KEXECFS_FD_STORE=none``)."""

    kind = "none"

    def retrieve(self) -> dict[str, int]:
        return {}

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        pass

    def release(self, name: str) -> None:
        pass

    def end(self) -> None:
        pass


def open_store(image_dir: Path, environ: dict[str, str] | None = None) -> DescriptorStore:
    env = os.environ if environ is None else environ
    choice = env.get("KEXECFS_FD_STORE") or ("systemd" if env.get("FDSTORE") else "keeper")
    if choice == "systemd":
        return SystemdStore(env)
    if choice == "none":
        return NoStore()
    if choice != "keeper":
        raise StoreError(f"KEXECFS_FD_STORE={choice!r}: expected 'systemd', 'keeper' or 'none'")
    return KeeperStore(image_dir)
