"""QMP, the QEMU Machine Protocol, spoken by hand over QEMU's unix socket.

QMP is one JSON object per line in each direction. QEMU greets first; the client
answers ``qmp_capabilities`` to leave negotiation mode. From then on every command gets
exactly one reply, ``{"return": ...}`` or ``{"error": {"class", "desc"}}``, matched here
by its ``id``; asynchronous events (``{"event": ...}``) may come between them at any time
and are kept for :meth:`Monitor.wait_event`. A descriptor travels with a command as
SCM_RIGHTS on the same ``sendmsg`` (``getfd``, ``add-fd``), which is how a device-state
file reaches QEMU without a path.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Event = dict[str, Any]


class QmpError(Exception):
    """A command QEMU refused: its error class and description."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc} ({error_class})")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class MonitorClosed(ConnectionError):
    """QEMU closed the monitor: it exited (or crashed) while we waited for it."""


class Monitor:
    """One QMP connection, in command mode."""

    def __init__(self, sock: socket.socket, timeout: float = 30) -> None:
        self.sock = sock
        self.timeout = timeout
        self.events: list[Event] = []
        self.greeting: dict[str, Any] = {}
        self._buffer = b""
        self._next_id = 0

    @classmethod
    def connect(cls, path: Path | str, timeout: float = 30) -> Monitor:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(str(path))
            monitor = cls(sock, timeout)
            monitor.greeting = monitor._read(time.monotonic() + timeout).get("QMP", {})
            monitor.execute("qmp_capabilities")
        except BaseException:
            sock.close()
            raise
        return monitor

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None, fds: Sequence[int] = (),
                timeout: float | None = None) -> Any:
        """Run ``command`` and return its ``return`` value; QmpError if QEMU refused it."""
        self._next_id += 1
        ident = f"kexecfs-{self._next_id}"
        message = {"execute": command, "id": ident, **({"arguments": arguments} if arguments else {})}
        data = json.dumps(message).encode() + b"\n"
        try:
            if fds:
                socket.send_fds(self.sock, [data], list(fds))
            else:
                self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise MonitorClosed(f"QEMU closed its monitor before {command}: {exc}") from None
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            reply = self._read(deadline, command)
            if reply.get("id") != ident:
                continue  # a reply to nobody (QEMU answers unparsable input without an id)
            if "error" in reply:
                err = reply["error"]
                raise QmpError(command, err.get("class", "?"), err.get("desc", "?"))
            return reply.get("return")

    def wait_event(self, name: str, timeout: float, match: Callable[[dict[str, Any]], bool] = lambda _: True
                   ) -> Event:
        """The first event ``name`` whose data ``match``es, among those kept or still to come."""
        deadline = time.monotonic() + timeout
        while True:
            for i, event in enumerate(self.events):
                if event.get("event") == name and match(event.get("data", {})):
                    return self.events.pop(i)
            self._read(deadline, f"event {name}")

    def _read(self, deadline: float, waiting_for: str = "the greeting") -> dict[str, Any]:
        """The next message that is not an event (events are kept); an event itself only
        while waiting for one, so that :meth:`wait_event` sees each as it arrives."""
        while True:
            line, sep, rest = self._buffer.partition(b"\n")
            if sep:
                self._buffer = rest
                message = json.loads(line)
                if "event" in message:
                    self.events.append(message)
                    if waiting_for.startswith("event "):
                        return message
                    continue
                return message
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"QEMU did not answer {waiting_for} in time")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"QEMU did not answer {waiting_for} in time") from None
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise MonitorClosed(f"QEMU closed its monitor while we waited for {waiting_for}")
            self._buffer += chunk
