"""The keeper: a small process that holds the daemon's descriptors while the daemon
restarts, as systemd's fd store does for a service (used where there is no systemd).

What it holds, each under a name: the FUSE connection (``/dev/fuse``), the record of the
connection's FUSE_INIT, and preserved files. It is their owner: the daemon fetches a
copy of a file's descriptor only while it works on the file (``GET``), so the files a
mount preserves are bounded by no one process's RLIMIT_NOFILE. A mount has as many
keepers as its files need, each holding at most a share well under its own limit, and
each file is held by two of them (see :class:`kexecfs.fs.fdstore.KeeperStore`). A daemon
that is killed, crashes or is replaced by a new version loses none of them: the next
daemon finds the keepers again and serves the same connection (:mod:`kexecfs.fs.restart`).

The keeper does nothing else, so that there is nothing in it to crash: it imports only
the standard library (and kexecfs.systemd's journal client, itself no more, to log to
the journal as the daemon does), never reads or writes the files it holds, and knows no FUSE. It
exits when the filesystem ends: when the daemon says so (``END``, after an unmount), or
when the connection dies under it (``/dev/fuse`` reports POLLERR once the kernel has
aborted the connection, e.g. after ``umount`` while no daemon ran; looked at every
second). A keeper that never
got a connection exits with its last client.

Protocol: a SOCK_SEQPACKET unix socket in the image directory (0700, and the peer must be
the keeper's own uid). Each message is one ASCII command, with descriptors attached as
SCM_RIGHTS::

    HELLO <pid>        -> OK <keeper pid> <held>   or  BUSY <pid> (another daemon serves)
    STORE <name>...    one descriptor attached per name (at most BATCH); replaces descriptors of those names
    REMOVE <name>...   closes those it holds (at most BATCH names a message)
    FETCH              -> FDS <name>... (with those descriptors, at most BATCH a message)..., DONE <n>
    GET <name>...      -> FDS <name>... of those it holds (at most BATCH asked), with their descriptors
    LIST               -> NAMES <name>... (as many messages as needed)..., DONE <n>
    END                the filesystem ended: close everything and exit

``STORE`` and ``REMOVE`` are not answered: a message is in the keeper's queue once
``sendmsg()`` returns, and stays there if the daemon dies right after, so the daemon may
count it as done (and journal it) without waiting.

    python -m kexecfs.fs.keeper SOCKET     binds SOCKET, then goes to the background
"""

from __future__ import annotations

import array
import errno
import logging
import logging.handlers
import os
import resource
import select
import signal
import socket
import struct
import sys
from pathlib import Path

log = logging.getLogger("kexecfs.keeper")

SOCKET_NAME = "keeper.sock"
CONNECTION = "fuse"  # the name the daemon stores /dev/fuse under: watched for its death
CONNECTION_NAMES = frozenset({CONNECTION, "fuse-init"})  # the connection's; every other name is a preserved file
BATCH = 250  # descriptors per message (the kernel's SCM_MAX_FD is 253)
MESSAGE = 1 << 16
_HUNG_UP = select.POLLERR | select.POLLHUP | select.POLLNVAL
# How often (ms) a keeper looks whether the connection ended. Not by waiting on it with
# the sockets: /dev/fuse wakes every poller of it at each request the kernel queues,
# whatever events it asked for, and each woken keeper cost tens of microseconds of CPU
# per request of the mount, times the keepers (two per shard) on the daemon's cores.
CONNECTION_CHECK_MS = 1000


def socket_address(path: Path) -> str:
    """``path`` as a unix socket address: sun_path holds 107 bytes, an image directory's path
    may be longer, and a path through /proc/self/fd of the open directory is short."""
    if len(os.fsencode(path)) < 100:
        return str(path)
    dirfd = os.open(path.parent, os.O_PATH | os.O_CLOEXEC)  # left open: it is the address
    return f"/proc/self/fd/{dirfd}/{path.name}"


def send(sock: socket.socket, text: str, fds: list[int] | None = None) -> None:
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([text.encode()], ancillary)


def receive(sock: socket.socket) -> tuple[str, list[int]]:
    """One message and its descriptors; ("", []) at the end of the connection."""
    fds = array.array("i")
    msg, ancdata, flags, _addr = sock.recvmsg(MESSAGE, socket.CMSG_SPACE(BATCH * fds.itemsize),
                                              socket.MSG_CMSG_CLOEXEC)
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise OSError(errno.EMSGSIZE, "a keeper message was truncated")
    return msg.decode(), list(fds)


class Keeper:
    """The held descriptors, and the daemons talking to the keeper."""

    def __init__(self, listener: socket.socket) -> None:
        self.listener = listener
        self.held: dict[str, int] = {}
        self.clients: dict[int, socket.socket] = {}
        self.serving: socket.socket | None = None  # the daemon that said HELLO last
        self.poller = select.poll()
        self.poller.register(listener, select.POLLIN)
        self.connection = select.poll()  # the connection alone, looked at without waiting (see CONNECTION_CHECK_MS)
        self.done = False

    def run(self) -> None:
        while not self.done:
            for fd, events in self.poller.poll(CONNECTION_CHECK_MS):
                if fd == self.listener.fileno():
                    self._accept()
                elif fd in self.clients:
                    self._serve(self.clients[fd], events)
            if CONNECTION in self.held and any(ev & _HUNG_UP for _fd, ev in self.connection.poll(0)):
                log.info("keeper: the FUSE connection ended; releasing %d descriptor(s)", len(self.held))
                self.done = True
            if not self.clients and CONNECTION not in self.held:
                log.info("keeper: no connection was ever kept and no daemon is left; exiting")
                self.done = True
        for fd in self.held.values():
            os.close(fd)

    def _accept(self) -> None:
        sock, _ = self.listener.accept()
        uid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            sock.close()  # only the daemon's own uid may take what it holds
            return
        self.clients[sock.fileno()] = sock
        self.poller.register(sock, select.POLLIN)

    def _serve(self, sock: socket.socket, events: int) -> None:
        try:
            text, fds = receive(sock) if events & select.POLLIN else ("", [])
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                log.warning("keeper: %s", exc)
                text, fds = "", []
            else:
                # A descriptor the kernel could not install: this keeper is at its RLIMIT_NOFILE.
                # Hanging up would only make the daemon start another keeper that fails alike.
                log.error("keeper: a descriptor sent to it was not received (it holds %d; RLIMIT_NOFILE %d): "
                          "that file is not kept across a restart", len(self.held),
                          resource.getrlimit(resource.RLIMIT_NOFILE)[0])
                return
        if not text:
            self._hang_up(sock)
            return
        verb, _, arg = text.partition(" ")
        if verb == "STORE" and arg and len(arg.split()) == len(fds):
            for name, fd in zip(arg.split(), fds):
                self._store(name, fd)
            return
        for fd in fds:  # only STORE brings a descriptor
            os.close(fd)
        if verb == "HELLO":
            self._hello(sock, arg)
        elif verb == "REMOVE":
            for name in arg.split():
                if name in self.held:
                    self._forget(name)
        elif verb == "FETCH":
            self._fetch(sock)
        elif verb == "GET":
            found = [n for n in arg.split()[:BATCH] if n in self.held]
            send(sock, "FDS " + " ".join(found), [self.held[n] for n in found])
        elif verb == "LIST":
            self._list(sock)
        elif verb == "END":
            log.info("keeper: the filesystem ended; releasing %d descriptor(s)", len(self.held))
            self.done = True

    def _hello(self, sock: socket.socket, pid: str) -> None:
        other = self.serving
        if other is not None and other is not sock and other.fileno() >= 0 and not _peer_gone(other):
            send(sock, f"BUSY {_peer_pid(other)}")
            return
        self.serving = sock
        send(sock, f"OK {os.getpid()} {len(self.held)}")

    def _store(self, name: str, fd: int) -> None:
        if name in self.held:
            self._forget(name)
        self.held[name] = fd
        if name == CONNECTION:
            self.connection.register(fd, 0)  # POLLERR and POLLHUP are reported unasked

    def _forget(self, name: str) -> None:
        fd = self.held.pop(name)
        if name == CONNECTION:
            self.connection.unregister(fd)
        os.close(fd)

    def _fetch(self, sock: socket.socket) -> None:
        names = list(self.held)
        for start in range(0, len(names), BATCH):
            batch = names[start:start + BATCH]
            send(sock, "FDS " + " ".join(batch), [self.held[n] for n in batch])
        send(sock, f"DONE {len(names)}")

    def _list(self, sock: socket.socket) -> None:
        line: list[str] = []
        size = 0
        for name in self.held:
            if size + len(name) + 1 > MESSAGE - 16:
                send(sock, "NAMES " + " ".join(line))
                line, size = [], 0
            line.append(name)
            size += len(name) + 1
        if line:
            send(sock, "NAMES " + " ".join(line))
        send(sock, f"DONE {len(self.held)}")

    def _hang_up(self, sock: socket.socket) -> None:
        self.poller.unregister(sock)
        del self.clients[sock.fileno()]
        if self.serving is sock:
            self.serving = None
        sock.close()


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the other end closed (a daemon that died: its HELLO no longer counts)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLRDHUP)
    return any(ev & (select.POLLRDHUP | select.POLLHUP) for _, ev in poller.poll(0))


def _peer_pid(sock: socket.socket) -> int:
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]


def listen(path: Path) -> socket.socket:
    """The keeper's socket at ``path``, replacing one a dead keeper left."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    old = os.umask(0o077)
    try:
        sock.bind(socket_address(path))
    finally:
        os.umask(old)
    sock.listen(16)
    return sock


# Where the keeper logs, as the daemon that starts it does: "journal" (the native protocol),
# "syslog", or anything else for its stderr (which the daemon makes its log file or
# /dev/null, never a pipe of the caller).
LOG_TARGET = "KEXECFS_KEEPER_LOG"


def setup_logging(target: str) -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if target == "journal":
        from ..systemd import JournalHandler  # the standard library only, like this module

        handler = JournalHandler()  # journalctl -t kexecfs: the daemon and its keeper (LOGGER= tells them apart)
    elif target == "syslog" and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = "kexecfs[%(process)d]: " + fmt
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def main(argv: list[str]) -> int:
    path = Path(argv[0])
    setup_logging(os.environ.get(LOG_TARGET, ""))
    listener = listen(path)
    bound = os.stat(path).st_ino
    # In the background from here: the caller's wait for this process ends once the
    # socket can be connected to, and the keeper belongs to no terminal or session.
    if os.fork():
        os._exit(0)
    os.setsid()
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the daemon gives each keeper a share well under it
    keeper = Keeper(listener)
    try:
        keeper.run()
    finally:
        try:
            if os.stat(path).st_ino == bound:  # not a newer keeper's socket
                path.unlink()
        except OSError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
