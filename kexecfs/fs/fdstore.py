"""Where the daemon's descriptors outlive the daemon: keepers, and systemd's fd store.

All are one interface, :class:`DescriptorStore`: ``keep`` a copy of a descriptor under
a name, ``release`` it, ``retrieve`` what is held when the daemon starts (the
connection's descriptors; -1 for each file, which stays in the store), and ``end`` when
the filesystem ends (an unmount: nothing is to be kept any more). A store of keepers
also has ``fetch`` (a copy of one file's descriptor, on demand) and ``fetch_many``: it
owns the preserved descriptors, and the daemon holds a bounded few copies
(``kexecfs.core.descriptors``). The daemon picks one at start (:func:`open_store`):

- without systemd, keeper processes (:mod:`.keeper`, :class:`KeeperStore`):
  sharded, two per shard, started by the daemon as the files need them and found again
  through their sockets in the image directory;
- under systemd (``KEXECFS_FD_STORE=systemd`` in the unit, or ``$FDSTORE``, which
  systemd >= 254 sets when the unit has a FileDescriptorStoreMax=): the connection goes
  to the fd store (``FDSTORE=1`` with ``FDNAME=`` on the notify socket, back through
  ``LISTEN_FDS``/``LISTEN_FDNAMES``; kexecfs.service sets
  ``FileDescriptorStorePreserve=yes`` so the store outlives a stop), the files to keepers
  (systemd gives descriptors back only at a start, all at once: see :class:`SystemdStore`);
- ``KEXECFS_FD_STORE=none``: nothing outlives the daemon, as before kexecfs had a store.
  A crash ends the mount (ENOTCONN) and the next daemon recovers from the image alone,
  as after a power cut; the crash tests of the image use it. The daemon holds every
  preserved descriptor itself then, and its RLIMIT_NOFILE bounds them.
"""

from __future__ import annotations

import array
import io
import logging
import logging.handlers
import errno
import os
import resource
import socket
import stat
import subprocess
import sys
import threading
from dataclasses import dataclass
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

    def connection_known(self, name: str, fd: int) -> None: ...


# ---------------------------------------------------------------------------- systemd


def notify_address(value: str) -> str:
    return "\0" + value[1:] if value.startswith("@") else value


class SystemdStore:
    """systemd's fd store for this service (sd_notify(3), sd_listen_fds_with_names(3)),
    for the connection; keepers for the preserved files.

    systemd gives stored descriptors back only when it starts the service, all at once
    through LISTEN_FDS: a daemon that got every preserved file that way would hold one
    descriptor per file again, which its RLIMIT_NOFILE bounds. So systemd stores the
    connection (``fuse``, ``fuse-init``) and the files go to keepers (:class:`KeeperStore`,
    ``files_only``), which give a file's descriptor back on demand. kexecfs.service has
    ``KillMode=process`` so that a restart of the service leaves the keepers running.
    Files a daemon of an older kexecfs stored in systemd's store come back as before
    and stay there.
    """

    kind = "systemd"

    def __init__(self, environ: dict[str, str] | None = None, image_dir: Path | None = None) -> None:
        self.environ = os.environ if environ is None else environ
        address = self.environ.get("NOTIFY_SOCKET")
        if not address:
            raise StoreError("KEXECFS_FD_STORE=systemd, but there is no NOTIFY_SOCKET: not started by systemd")
        self.address = notify_address(address)
        self.names: set[str] = set()
        self.keepers = KeeperStore(image_dir, files_only=True) if image_dir is not None else None

    def _to_keepers(self, name: str) -> bool:
        return self.keepers is not None and name not in keeper.CONNECTION_NAMES and name not in self.names

    def fetch(self, name: str) -> int:
        if self.keepers is None:
            raise OSError(errno.ENOENT, f"no keeper holds {name!r}")
        return self.keepers.fetch(name)

    def fetch_many(self, names: list[str]) -> dict[str, int]:
        return self.keepers.fetch_many(names) if self.keepers is not None else {}

    def keep_many(self, items: list[tuple[str, int]]) -> None:
        for name, fd in items:
            self.keep(name, fd)

    def release_many(self, names: list[str]) -> None:
        if self.keepers is None:
            for name in names:
                self.release(name)
            return
        theirs = {n for n in names if self._to_keepers(n)}
        self.keepers.release_many([n for n in names if n in theirs])
        for name in names:
            if name not in theirs:
                self.release(name)

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
        if self.keepers is not None:
            held = {**self.keepers.retrieve(), **held}
        return held

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        if self._to_keepers(name):
            self.keepers.keep(name, fd)  # type: ignore[union-attr]
            return
        if name in self.names:
            self.release(name)  # systemd would keep both under one name
        # FDPOLL=0 but for the connection: systemd drops a stored descriptor that reports
        # POLLHUP or POLLERR, which is right for a dead connection only.
        self._notify(f"FDSTORE=1\nFDNAME={name}" + ("" if watch else "\nFDPOLL=0"), [fd])
        self.names.add(name)
        if name in keeper.CONNECTION_NAMES:
            self.connection_known(name, fd)

    def release(self, name: str) -> None:
        if self._to_keepers(name):
            self.keepers.release(name)  # type: ignore[union-attr]
            return
        self._notify(f"FDSTOREREMOVE=1\nFDNAME={name}")
        self.names.discard(name)
        if self.keepers is not None and name in keeper.CONNECTION_NAMES:
            self.keepers.connection.pop(name, None)

    def connection_known(self, name: str, fd: int) -> None:
        """The keepers get the connection too, only to end with it."""
        if self.keepers is not None:
            self.keepers.connection_known(name, fd)

    def end(self) -> None:
        for name in sorted(self.names):
            self.release(name)
        if self.keepers is not None:
            self.keepers.end()

    def _notify(self, text: str, fds: list[int] | None = None) -> None:
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendmsg([text.encode()], ancillary, 0, self.address)


# ---------------------------------------------------------------------------- keeper


def keeper_capacity() -> int:
    """Preserved files one keeper holds at most: well under its RLIMIT_NOFILE (it inherits
    the daemon's hard limit and takes it all), with room for its sockets and the connection."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return max(16, hard * 3 // 4 - 64)


@dataclass
class Member:
    """One keeper process: the socket the daemon talks on, and a second connection on which
    nothing is ever said, so that it becomes readable only when the keeper dies."""

    path: Path
    sock: socket.socket
    watch: socket.socket
    pid: int

    def gone(self) -> bool:
        return self.sock.fileno() < 0 or keeper._peer_gone(self.watch)

    def close(self) -> None:
        self.sock.close()
        self.watch.close()


class KeeperStore:
    """The keepers of this image directory: connected to, or started if there are none.

    The store is the owner of preserved descriptors; the daemon fetches a copy while it
    works on a file (:meth:`fetch`, into :class:`kexecfs.core.descriptors.DescriptorCache`).
    Files are spread over shards of at most :func:`keeper_capacity` files, a shard being
    two keepers that each hold all of its files: a keeper that dies (killed by someone)
    loses nothing, the daemon copies the shard from the other into a new one. A shard is
    started when the ones before it are full. Every keeper also holds the connection
    (``fuse``, ``fuse-init``): any of them gives it back, and each ends with it.

    Sockets: ``keeper.sock`` is shard 0's first keeper (the one a daemon greets first: it
    answers BUSY if another daemon serves); ``keeper.<shard>.<n>.sock`` are the others.
    ``files_only``: under systemd, whose fd store holds the connection.
    """

    kind = "keeper"

    def __init__(self, image_dir: Path, capacity: int | None = None, files_only: bool = False) -> None:
        self.image_dir = image_dir
        self.path = image_dir / keeper.SOCKET_NAME
        self.capacity = capacity or keeper_capacity()
        self.files_only = files_only
        self.lock = threading.Lock()  # one request and its answer at a time (prepare fetches from a thread)
        self.shards: list[list[Member | None]] = []
        self.where: dict[str, int] = {}  # name of a file -> its shard
        self.counts: list[int] = []
        self.connection: dict[str, int] = {}  # the daemon's own fuse and fuse-init: for keepers started later
        first = self._member(0, 0, start=True)
        assert first is not None
        self.keeper_pid = first.pid
        self.sock = first.sock
        shards = {0}
        for path in image_dir.glob("keeper.*.*.sock"):
            parts = path.name.split(".")
            if parts[1].isdigit() and parts[2] in ("0", "1"):
                shards.add(int(parts[1]))
        self.shards = [[first, None]] + [[None, None] for _ in range(max(shards))]
        self.counts = [0] * len(self.shards)
        for shard in range(len(self.shards)):
            for n in (0, 1):
                if self.shards[shard][n] is None and self.socket_path(shard, n).exists():
                    self.shards[shard][n] = self._member(shard, n, start=False)
        self._learn_names()

    def socket_path(self, shard: int, n: int) -> Path:
        return self.path if (shard, n) == (0, 0) else self.image_dir / f"keeper.{shard}.{n}.sock"

    # ------------------------------------------------------------------ keepers

    def _member(self, shard: int, n: int, start: bool) -> Member | None:
        """The keeper at its socket; started if there is none and ``start``; None if dead."""
        path = self.socket_path(shard, n)
        sock = _connect(path)
        answer = _greet(sock) if sock is not None else None  # None: dying or dead (its socket is left)
        if answer is None and start:
            sock = self._start(path)
            answer = _greet(sock)
            if answer is None:
                raise StoreError(f"the keeper started for {path} does not answer")
        if answer is None or sock is None:
            return None
        if answer.startswith("BUSY"):
            sock.close()
            raise StoreError(f"another kexecfs daemon (pid {answer.split()[1]}) serves this mount with the "
                             f"image directory {self.image_dir}")
        watch = _connect(path)
        if watch is None:
            sock.close()
            return None
        return Member(path, sock, watch, int(answer.split()[1]))

    def _start(self, path: Path) -> socket.socket:
        """A new keeper: it returns once its socket is bound, and lives on in the background."""
        target, stderr = keeper_log()
        subprocess.run([sys.executable, "-m", "kexecfs.fs.keeper", str(path)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                       env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                            keeper.LOG_TARGET: target})
        if isinstance(stderr, io.IOBase):
            stderr.close()
        sock = _connect(path)
        if sock is None:
            raise StoreError(f"the keeper started for {path} does not answer")
        log.info("started a keeper for %s", path)
        return sock

    def _new_member(self, shard: int, n: int) -> Member:
        member = self._member(shard, n, start=True)
        assert member is not None
        for name, fd in self.connection.items():
            self._send(member, f"STORE {name}", [fd])
        self.shards[shard][n] = member
        return member

    def members(self) -> list[Member]:
        return [m for shard in self.shards for m in shard if m is not None]

    def dead_members(self) -> list[tuple[int, int, Member]]:
        return [(s, n, m) for s, shard in enumerate(self.shards) for n, m in enumerate(shard)
                if m is not None and m.gone()]

    def replace(self, shard: int, n: int) -> Member:
        """A keeper died: a new one in its place, given the connection and its shard's files
        (from the other keeper of the shard, a batch at a time)."""
        old = self.shards[shard][n]
        if old is not None:
            old.close()
        self.shards[shard][n] = None
        member = self._new_member(shard, n)
        if shard == 0 and n == 0:
            self.keeper_pid, self.sock = member.pid, member.sock
        self._copy_shard(shard)
        return member

    def _copy_shard(self, shard: int) -> None:
        """Give each keeper of ``shard`` the files of it that it lacks (the other has them)."""
        names = [n for n, s in self.where.items() if s == shard]
        a, b = self.shards[shard]
        for target, source in ((a, b), (b, a)):
            if target is None or source is None:
                continue
            have = set(self._list(target))
            missing = [name for name in names if name not in have]
            for start in range(0, len(missing), keeper.BATCH):
                for name, fd in self._get(source, missing[start:start + keeper.BATCH]).items():
                    self._send(target, f"STORE {name}", [fd])
                    os.close(fd)
        lost = [name for name in names if not any(m is not None and not m.gone() for m in (a, b))]
        if lost:
            log.error("shard %d: both keepers died; %d preserved descriptor(s) are lost", shard, len(lost))

    def _learn_names(self) -> None:
        """Which shard holds each file (a restarted daemon's), and both keepers of each shard
        hold all of it (a daemon killed while copying a shard left one keeper short)."""
        for shard, pair in enumerate(self.shards):
            for member in pair:
                if member is None:
                    continue
                for name in self._list(member):
                    if name not in keeper.CONNECTION_NAMES:
                        self.where[name] = shard
            self.counts[shard] = sum(1 for s in self.where.values() if s == shard)
            if self.counts[shard]:
                for n in (0, 1):
                    if pair[n] is None:
                        self._new_member(shard, n)
                self._copy_shard(shard)

    # ------------------------------------------------------------------ the protocol

    def _send(self, member: Member, text: str, fds: list[int] | None = None) -> None:
        try:
            keeper.send(member.sock, text, fds)
        except OSError as exc:
            log.warning("keeper pid %d: %s (replaced once its death is seen)", member.pid, exc)

    def _ask(self, member: Member, text: str) -> list[tuple[str, list[int]]]:
        """Send ``text`` and read the answers up to DONE (or the one FDS answer of GET)."""
        answers = []
        with self.lock:
            keeper.send(member.sock, text)
            while True:
                reply, fds = keeper.receive(member.sock)
                if not reply:
                    raise ConnectionResetError(errno.ECONNRESET, f"keeper pid {member.pid} hung up")
                answers.append((reply, fds))
                if text.startswith("GET") or reply.startswith("DONE"):
                    return answers

    def _list(self, member: Member) -> list[str]:
        names: list[str] = []
        for reply, _fds in self._ask(member, "LIST"):
            if reply.startswith("NAMES "):
                names += reply.split()[1:]
        return names

    def _get(self, member: Member, names: list[str]) -> dict[str, int]:
        [(reply, fds)] = self._ask(member, "GET " + " ".join(names))
        found = reply.split()[1:]
        if len(found) != len(fds):
            for fd in fds:
                os.close(fd)
            raise StoreError(f"the keeper answered {reply[:80]!r}")
        return dict(zip(found, fds))

    # ------------------------------------------------------------------ DescriptorStore

    def retrieve(self) -> dict[str, int]:
        """The connection's descriptors (from the first keeper that has them), and each file
        stored as -1: it stays in its keepers until fetched."""
        held: dict[str, int] = {name: -1 for name in self.where}
        if not self.files_only:
            for member in self.members():
                try:
                    got = self._get(member, sorted(keeper.CONNECTION_NAMES))
                except OSError:
                    continue
                if len(got) == len(keeper.CONNECTION_NAMES):
                    held.update(got)
                    break
                for fd in got.values():
                    os.close(fd)
        return held

    def fetch(self, name: str) -> int:
        shard = self.where.get(name)
        if shard is None:
            raise OSError(errno.ENOENT, f"the keepers hold no descriptor {name!r}")
        for member in self.shards[shard]:
            if member is None:
                continue
            try:
                fd = self._get(member, [name]).get(name)
            except OSError:
                continue  # dead: the other keeper of the shard has it too
            if fd is not None:
                return fd
        raise OSError(errno.ENOENT, f"no keeper of shard {shard} gives descriptor {name!r}")

    def fetch_many(self, names: list[str]) -> dict[str, int]:
        """Those of ``names`` the keepers hold: one GET per shard and batch of 250."""
        by_shard: dict[int, list[str]] = {}
        for name in names:
            if name in self.where:
                by_shard.setdefault(self.where[name], []).append(name)
        got: dict[str, int] = {}
        for shard, wanted in by_shard.items():
            for start in range(0, len(wanted), keeper.BATCH):
                batch = wanted[start:start + keeper.BATCH]
                for member in self.shards[shard]:
                    if member is None:
                        continue
                    try:
                        got.update(self._get(member, batch))
                        break
                    except OSError:
                        continue  # dead: the other keeper of the shard has them too
        return got

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        if name in keeper.CONNECTION_NAMES:
            self.connection_known(name, fd)
            return
        self.keep_many([(name, fd)])

    def keep_many(self, items: list[tuple[str, int]]) -> None:
        """Store files, each in a shard with room (started if none has), one message per
        shard and batch to each of its keepers."""
        by_shard: dict[int, list[tuple[str, int]]] = {}
        for name, fd in items:
            if name in self.where:
                self.release(name)
            shard = next((s for s, count in enumerate(self.counts) if count < self.capacity), None)
            if shard is None:
                shard = len(self.shards)
                self.shards.append([None, None])
                self.counts.append(0)
                log.info("keepers: shard %d is started (%d files a shard)", shard, self.capacity)
            by_shard.setdefault(shard, []).append((name, fd))
            self.where[name] = shard
            self.counts[shard] += 1
        for shard, stored in by_shard.items():
            pair = self.shards[shard]
            for n in (0, 1):
                member = pair[n] or self._new_member(shard, n)  # a shard's second keeper comes with its first file
                for start in range(0, len(stored), keeper.BATCH):
                    batch = stored[start:start + keeper.BATCH]
                    self._send(member, "STORE " + " ".join(name for name, _fd in batch), [fd for _name, fd in batch])

    def connection_known(self, name: str, fd: int) -> None:
        """The daemon's descriptor of the connection (``fuse``, ``fuse-init``): every keeper
        holds it, the ones started later too."""
        self.connection[name] = fd
        for member in self.members():
            self._send(member, f"STORE {name}", [fd])

    def release(self, name: str) -> None:
        if name in keeper.CONNECTION_NAMES:
            self.connection.pop(name, None)
            for member in self.members():
                self._send(member, f"REMOVE {name}")
            return
        self.release_many([name])

    def release_many(self, names: list[str]) -> None:
        """Let go of files: one REMOVE per shard and batch of 250 to each of its keepers
        (a simulated kexec releases every file of the old kernel at once)."""
        by_shard: dict[int, list[str]] = {}
        for name in names:
            if name in keeper.CONNECTION_NAMES:
                self.release(name)
                continue
            shard = self.where.pop(name, None)
            if shard is not None:
                self.counts[shard] -= 1
                by_shard.setdefault(shard, []).append(name)
        for shard, gone in by_shard.items():
            for member in self.shards[shard]:
                if member is None:
                    continue
                for start in range(0, len(gone), keeper.BATCH):
                    self._send(member, "REMOVE " + " ".join(gone[start:start + keeper.BATCH]))

    def end(self) -> None:
        for member in self.members():
            try:
                keeper.send(member.sock, "END")
            except OSError:
                pass  # gone already: a keeper also ends when the connection does
            member.close()


def _connect(path: Path) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(keeper.socket_address(path))
        return sock
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None


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

    def connection_known(self, name: str, fd: int) -> None:
        pass


def open_store(image_dir: Path, environ: dict[str, str] | None = None) -> DescriptorStore:
    env = os.environ if environ is None else environ
    choice = env.get("KEXECFS_FD_STORE") or ("systemd" if env.get("FDSTORE") else "keeper")
    if choice == "systemd":
        return SystemdStore(env, image_dir)
    if choice == "none":
        return NoStore()
    if choice != "keeper":
        raise StoreError(f"KEXECFS_FD_STORE={choice!r}: expected 'systemd', 'keeper' or 'none'")
    return KeeperStore(image_dir)
