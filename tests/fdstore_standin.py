#!/usr/bin/python3
"""A stand-in for systemd as a service manager of one Type=notify service with an fd
store, for the tests of kexecfs's systemd path (no systemd runs in the test machine).

    fdstore_standin.py -- COMMAND [ARGS]

It does what systemd does for kexecfs.service (FileDescriptorStoreMax=,
FileDescriptorStorePreserve=yes, Restart=on-failure), after sd_notify(3) and
sd_listen_fds(3) and systemd's service_add_fd_store():

- the service gets NOTIFY_SOCKET; a datagram "FDSTORE=1" with descriptors (SCM_RIGHTS)
  stores them under FDNAME= (default "stored"); a descriptor that is the same open file
  as one stored already is not stored again (systemd compares them with kcmp); unless
  FDPOLL=0, a stored descriptor that reports POLLHUP or POLLERR is dropped;
  "FDSTOREREMOVE=1" drops every descriptor of FDNAME=; READY=1 is reported;
- each start of the service gets the store as descriptors 3.. with LISTEN_FDS,
  LISTEN_FDNAMES (colon-separated) and LISTEN_PID (its own pid), and keeps it;
- the service dying of a signal or a non-zero exit is restarted (Restart=on-failure).

Commands on stdin, one a line: "restart [COMMAND...]" (SIGTERM, wait, start again; a
new COMMAND stands for an upgraded package), "kill" (SIGKILL; restarted as on a crash),
"stop" (SIGTERM, no restart; the store stays: FileDescriptorStorePreserve=yes), "start",
"names" (prints the stored names). Events are printed on stdout, one a line:
"started PID FDS", "ready PID", "exited PID CODE", "names N1 N2 ...".
"""

from __future__ import annotations

import array
import ctypes
import fcntl
import os
import select
import signal
import socket
import sys
import tempfile

KCMP_FILE = 0
SYS_KCMP = 312  # x86-64
libc = ctypes.CDLL(None, use_errno=True)


def same_file(a: int, b: int) -> bool:
    pid = os.getpid()
    return libc.syscall(SYS_KCMP, pid, pid, KCMP_FILE, a, b) == 0


class Manager:
    def __init__(self, command: list[str]) -> None:
        self.command = command
        self.store: list[tuple[str, int, bool]] = []  # (name, fd, polled), in the order stored
        self.dir = tempfile.mkdtemp(prefix="standin-")
        self.address = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.sock.bind(self.address)
        self.pid = 0
        self.restart_on_failure = True

    def say(self, text: str) -> None:
        print(text, flush=True)

    def start(self) -> None:
        pid = os.fork()
        if pid == 0:
            self._exec()
        self.pid = pid
        self.say(f"started {pid} {len(self.store)}")

    def _exec(self) -> None:
        """In the child: the store at 3.., as systemd lays it out, then the service."""
        above = 3 + len(self.store) + 16  # out of the way of 3.. first
        fds = [fcntl.fcntl(fd, fcntl.F_DUPFD, above) for _, fd, _ in self.store]
        for i, fd in enumerate(fds):
            os.dup2(fd, 3 + i, inheritable=True)
        env = dict(os.environ, NOTIFY_SOCKET=self.address, LISTEN_PID=str(os.getpid()),
                   LISTEN_FDS=str(len(self.store)), LISTEN_FDNAMES=":".join(n for n, _, _ in self.store))
        if not self.store:
            for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
                env.pop(key)
        os.dup2(2, 1)  # stdout is the manager's event stream
        os.closerange(3 + len(self.store), 65536)
        os.execvpe(self.command[0], self.command, env)

    def drain(self) -> None:
        """Every notification sent so far, before anything else happens: a command of the
        test (names) or a start must see the store as the service left it."""
        while True:
            try:
                self.notified()
            except BlockingIOError:
                return

    def notified(self) -> None:
        fds = array.array("i")
        msg, anc, _flags, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(253 * fds.itemsize),
                                                socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        fields = dict(line.split("=", 1) for line in msg.decode().splitlines() if "=" in line)
        name = fields.get("FDNAME", "stored")
        if fields.get("READY") == "1":
            self.say(f"ready {self.pid}")
        if fields.get("FDSTOREREMOVE") == "1":
            for entry in [e for e in self.store if e[0] == name]:
                os.close(entry[1])
                self.store.remove(entry)
        for fd in fds:
            if fields.get("FDSTORE") != "1" or any(same_file(fd, other) for _, other, _ in self.store):
                os.close(fd)  # systemd: "Suppressing duplicate fd in fd store."
            else:
                self.store.append((name, fd, fields.get("FDPOLL") != "0"))

    def drop_hung_up(self) -> None:
        poller = select.poll()
        for _, fd, polled in self.store:
            if polled:
                poller.register(fd, 0)
        hung = {fd for fd, ev in poller.poll(0) if ev & (select.POLLHUP | select.POLLERR)}
        for entry in [e for e in self.store if e[1] in hung]:
            os.close(entry[1])
            self.store.remove(entry)

    def reap(self) -> None:
        if not self.pid:
            return
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        if pid == 0:
            return
        code = os.waitstatus_to_exitcode(status)
        self.say(f"exited {pid} {code}")
        self.pid = 0
        if code != 0 and self.restart_on_failure:
            self.drain()  # what it sent before it died
            self.start()

    def stop(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGTERM)
            _, status = os.waitpid(self.pid, 0)
            self.say(f"exited {self.pid} {os.waitstatus_to_exitcode(status)}")
            self.pid = 0
            self.drain()  # what it sent while stopping

    def command_line(self, line: str) -> None:
        verb, *rest = line.split()
        if verb == "restart":
            self.stop()
            if rest:
                self.command = rest
            self.start()
        elif verb == "kill" and self.pid:
            os.kill(self.pid, signal.SIGKILL)
        elif verb == "stop":
            self.stop()
        elif verb == "start":
            self.start()
        elif verb == "names":
            self.say("names " + " ".join(n for n, _, _ in self.store))

    def run(self) -> None:
        self.start()
        pending, ended = b"", False  # stdin read unbuffered: select() must see every line
        while not ended:
            ready, _, _ = select.select([self.sock, sys.stdin], [], [], 0.05)
            self.drain()
            if sys.stdin in ready:
                chunk = os.read(sys.stdin.fileno(), 65536)
                ended = not chunk
                pending += chunk
            while b"\n" in pending or (ended and pending):
                line, _, pending = pending.partition(b"\n")
                if line.strip():
                    self.command_line(line.decode())
                self.drain()
            self.drop_hung_up()
            self.reap()
        self.restart_on_failure = False
        self.stop()


if __name__ == "__main__":
    args = sys.argv[1:]
    Manager(args[1:] if args[:1] == ["--"] else args).run()
