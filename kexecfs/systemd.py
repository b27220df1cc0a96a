"""What kexecfs tells systemd, without libsystemd: readiness and progress over the
notify socket (sd_notify(3)), and log records with fields of their own over the
journal's native protocol (systemd.journal-fields(7), "Native Journal Protocol").

Standard library only: the shutdown hook and the client commands use it too.

- :func:`sd_notify` sends one message (``READY=1``, ``STATUS=...``) if ``NOTIFY_SOCKET``
  is set, and does nothing otherwise.
- :class:`ServiceProgress` turns the progress of a long phase (recovery, prepare, freeze)
  into ``STATUS=`` lines and ``EXTEND_TIMEOUT_USEC=``, so that a start or stop timeout
  only fires when the phase stops making headway, however large the image is.
- :class:`JournalHandler` is a logging handler that sends each record as a journal
  entry: MESSAGE, PRIORITY, SYSLOG_IDENTIFIER, CODE_*, and every attribute of the record
  spelled as a journal field (``log.info(..., extra={"INSTANCE": "db", "TOKEN": 3})``),
  so ``journalctl INSTANCE=db`` finds what happened to one instance.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import logging
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "kexecfs"
# journald's trusted fields start with "_"; ours must be upper case, digits and "_" (<= 64).
_FIELD = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def sd_notify(message: str) -> bool:
    """Send ``message`` to the service manager (Type=notify); False if there is none."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False  # a notification lost must never stop the daemon
    return True


class ServiceProgress:
    """``STATUS=`` and ``EXTEND_TIMEOUT_USEC=`` for the long phases of the daemon.

    :meth:`report` is called with the phase's progress ("recovery: 512 MiB of 1024 MiB")
    and sends it at most every ``interval`` seconds, each time granting systemd's timeout
    ``extension`` more seconds. One large file is copied without intermediate reports, so
    :meth:`keepalive` also extends the timeout every few seconds while the process's I/O
    counters move: a recovery that stalls (a hung disk) still times out, one that copies
    30 GB at disk speed does not.
    """

    def __init__(self, interval: float = 1.0, extension: float = 30.0,
                 idle_status: Callable[[], str] = lambda: "starting") -> None:
        self.interval = interval
        self.extension = extension
        self.idle_status = idle_status  # the STATUS= line once a phase has ended
        self.last_text = ""
        self._last_sent = float("-inf")
        self._lock = threading.Lock()

    def _send(self, text: str) -> None:
        sd_notify(f"STATUS={text}\nEXTEND_TIMEOUT_USEC={int(self.extension * 1e6)}")

    def report(self, text: str) -> None:
        """The progress of the phase under way; "" when it ended."""
        with self._lock:
            if not text:
                self.last_text = ""
                sd_notify(f"STATUS={self.idle_status()}")
                return
            first = not self.last_text
            self.last_text = text
            now = time.monotonic()
            if first or now - self._last_sent >= self.interval:
                self._last_sent = now
                self._send(text)

    @contextlib.contextmanager
    def keepalive(self, beat: float = 5.0) -> Iterator[None]:
        """Extend the timeout every ``beat`` seconds while I/O goes on, until the block ends."""
        if not os.environ.get("NOTIFY_SOCKET"):
            yield
            return
        done = threading.Event()

        def beats() -> None:
            seen = _io_counters()
            while not done.wait(beat):
                now = _io_counters()
                if now != seen:
                    seen = now
                    with self._lock:
                        self._send(self.last_text or "working")
        thread = threading.Thread(target=beats, name="kexecfs-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def _io_counters() -> tuple[int, ...]:
    """Bytes this process read and wrote so far (rchar, wchar, read_bytes, write_bytes)."""
    try:
        with open("/proc/self/io") as f:
            return tuple(int(line.split()[1]) for line in f if line.split()[0].rstrip(":") in
                         ("rchar", "wchar", "read_bytes", "write_bytes"))
    except OSError:
        return ()


def journal_stream_is_stderr() -> bool:
    """systemd connected our stderr to the journal (JOURNAL_STREAM names its device:inode)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(n) for n in value.split(":"))
        st = os.fstat(2)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def journal_entry(fields: dict[str, str]) -> bytes:
    """Fields in the native protocol: ``KEY=value\\n``, or for a value holding a newline
    ``KEY\\n`` + its length (64-bit little endian) + the value + ``\\n``."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode(errors="replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Log records as journal entries over the native protocol (no libsystemd)."""

    def __init__(self, path: str = JOURNAL_SOCKET, identifier: str = IDENTIFIER) -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        fields = {"MESSAGE": self.format(record), "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                  "SYSLOG_IDENTIFIER": self.identifier, "LOGGER": record.name,
                  "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno), "CODE_FUNC": record.funcName}
        for key, value in vars(record).items():  # extra={"INSTANCE": ...}: fields of the entry
            if _FIELD.fullmatch(key) and value is not None:
                fields[key] = str(value)
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.send(journal_entry(self.fields(record)))
        except Exception:
            self.handleError(record)

    def send(self, entry: bytes) -> None:
        try:
            self.sock.sendto(entry, self.path)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:  # a long traceback; anything else is journald's absence
                raise
            self._send_large(entry)

    def _send_large(self, entry: bytes) -> None:
        """An entry larger than a datagram travels in a sealed memfd (the protocol's way)."""
        fd = os.memfd_create("journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(fd, entry)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
                        | fcntl.F_SEAL_SEAL)
            self.sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()
        super().close()
