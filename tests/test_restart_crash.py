"""SIGKILL of the daemon at every fault point of an update, and at random moments, while
a container holds a bind mount of its instance and open files in it (issue 16).

After each restart: the bind mount serves; every registration is there; the operation
the daemon died in completes for its caller as if nothing had happened (the kernel
resends it and the journal answers it or it is done now); the open files answer (their
contents, or a clear errno, never ENOTCONN); and a full update afterwards restores every
file byte for byte through the old bind mount.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FUSE_SKIP, Daemon, sh

pytestmark = pytest.mark.skipif(bool(FUSE_SKIP), reason=FUSE_SKIP or "")

# The service in the container: bind-mounts its instance, preserves memfds through the
# bind mount, keeps files open, and answers the test's questions (one JSON per line).
AGENT = r"""
import hashlib, json, os, subprocess, sys
mnt, inst, bind = sys.argv[1:4]
subprocess.run(["mount", "--bind", f"{mnt}/{inst}", bind], check=True)
subprocess.run(["umount", "-l", mnt], check=True)
held, memfds = {}, {}

def content(seed, size):
    out, i = bytearray(), 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:size])

def answer(fn):
    try:
        return {"ok": fn()}
    except OSError as exc:
        return {"errno": exc.errno}

def preserve(token, size, seed):
    fd = os.memfd_create(f"svc-{token}")
    os.write(fd, content(seed, size))
    memfds[token] = fd
    with open(f"{bind}/fd_preserve", "w") as f:
        f.write(f"{fd} {token}")
    return hashlib.sha256(content(seed, size)).hexdigest()

def hold(path):
    held[path] = os.open(f"{bind}/{path}", os.O_RDONLY)
    return path

def read_held(path):
    return os.pread(held[path], 1 << 16, 0).decode(errors="replace")

def sha(path):
    with open(f"{bind}/{path}", "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()

def cat(path):
    with open(f"{bind}/{path}") as f:
        return f.read()

ops = {"preserve": preserve, "hold": hold, "read_held": read_held, "sha": sha, "cat": cat,
       "ino": lambda path: os.stat(f"{bind}/{path}").st_ino}
print(json.dumps({"ok": "ready"}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    print(json.dumps(answer(lambda: ops[req["op"]](*req["args"]))), flush=True)
"""


class Service:
    """The container: its own mount and pid namespaces, the instance bind-mounted in them."""

    def __init__(self, mnt: Path, instance: str, bind: Path) -> None:
        bind.mkdir()
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
             sys.executable, "-c", AGENT, str(mnt), instance, str(bind)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self._reply() == {"ok": "ready"}

    def _reply(self, timeout: float = 60) -> dict[str, object]:
        assert self.proc.stdout is not None
        # A request nobody serves waits for ever: fail instead (the agent answers at once).
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, f"the container got no answer from the mount within {timeout} s"
        line = self.proc.stdout.readline()
        assert line, "the container died"
        return json.loads(line)

    def ask(self, op: str, *args: object) -> object:
        """The answer, or ("errno", n)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        reply = self._reply()
        return reply["ok"] if "ok" in reply else ("errno", reply["errno"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Counts:
    """What one run checked, for the totals a test prints."""

    restarts: int = 0
    registrations: int = 0
    handles: int = 0
    files_restored: int = 0


@dataclass
class Update:
    """One instance served to a container, a second one to the test itself, and the steps
    of an update; ``expected`` is every registration (token -> sha256 of its contents)."""

    daemon: Daemon
    tmp_path: Path
    service: Service | None = None
    expected: dict[str, dict[int, str]] = field(default_factory=dict)
    own: list[int] = field(default_factory=list)
    own_by_token: dict[int, int] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    ino: object = None  # the instance directory's inode number, as the container sees it

    def set_up(self) -> None:
        mnt = self.daemon.mountpoint
        sh(f"mkdir {mnt}/svc {mnt}/db", check=True)
        self.service = Service(mnt, "svc", self.tmp_path / "bind")
        self.expected = {"svc": {}, "db": {}}
        for token, size in ((1, 3 << 20), (2, 4096), (3, 100_000)):
            self.expected["svc"][token] = str(self.service.ask("preserve", token, size, token * 7))
        for token in (5, 6):
            self.preserve_own(token)
        self.service.ask("hold", "state")
        self.service.ask("hold", "fd_preserve")
        self.ino = self.service.ask("ino", ".")

    def preserve_own(self, token: int) -> None:
        fd = os.memfd_create(f"db-{token}")
        data = os.urandom(50_000 + token)
        os.write(fd, data)
        self.own.append(fd)
        self.own_by_token[token] = fd
        with open(self.daemon.mountpoint / "db" / "fd_preserve", "w") as f:
            f.write(f"{fd} {token}")
        self.expected["db"][token] = hashlib.sha256(data).hexdigest()

    def write_while_prepared(self) -> None:
        """A service goes on writing between prepare and freeze (freeze rewrites that chunk)."""
        fd = self.own_by_token[5]
        os.pwrite(fd, b"written while prepared" * 100, 1000)
        self.expected["db"][5] = hashlib.sha256(os.pread(fd, 1 << 20, 0)).hexdigest()

    def restore_all(self) -> None:
        """Open every file once (a restore): finish keeps restored files, drops the others."""
        assert self.service is not None
        for token in self.expected["svc"]:
            assert self.service.ask("sha", f"fds/{token}") == self.expected["svc"][token]
        for token in self.expected["db"]:
            (self.daemon.mountpoint / "db" / "fds" / str(token)).read_bytes()

    def listing(self, instance: str) -> list[int]:
        text = (self.daemon.mountpoint / instance / "fd_preserve").read_text()
        return sorted(int(line.split()[0]) for line in text.splitlines())

    def check_after_restart(self) -> None:
        """The bind mount serves, the registrations are all there, the open files answer."""
        assert self.service is not None
        assert self.service.ask("cat", "state") in ("normal\n", "prepared\n", "frozen\n", "updated\n")
        for instance, files in self.expected.items():
            assert self.listing(instance) == sorted(files), f"{instance}: registrations changed"
            self.counts.registrations += len(files)
        # Files the container opened before the restart: served by the new daemon, as new ones.
        state = (self.daemon.mountpoint / "svc" / "state").read_text()
        assert self.service.ask("read_held", "state") == state, "an open state file does not answer"
        listing = (self.daemon.mountpoint / "svc" / "fd_preserve").read_text()
        assert self.service.ask("read_held", "fd_preserve") == listing, "an open fd_preserve does not answer"
        self.counts.handles += 2
        assert self.service.ask("ino", ".") == self.ino, "the instance got another inode number"

    def finish_update(self) -> None:
        """From whatever state the restart left: on to a kexec, restore everything through
        the container's bind mount (and the test's own instance), byte for byte."""
        mnt = self.daemon.mountpoint
        state = (mnt / "state").read_text().strip()
        if state == "updated":  # an update the crash did not stop: end it, keeping every file
            self.restore_all()
            sh(f"echo finish > {mnt}/state", check=True)
            state = "normal"
        events = {"normal": ["prepare", "freeze", "kexec"], "prepared": ["freeze", "kexec"],
                  "frozen": ["kexec"]}[state]
        for event in events:
            sh(f"echo {event} > {mnt}/state", check=True)
        assert (mnt / "state").read_text() == "updated\n"
        assert self.service is not None
        for token, digest in self.expected["svc"].items():
            assert self.service.ask("sha", f"fds/{token}") == digest, f"svc/fds/{token} differs"
            self.counts.files_restored += 1
        for token, digest in self.expected["db"].items():
            assert hashlib.sha256((mnt / "db" / "fds" / str(token)).read_bytes()).hexdigest() == digest
            self.counts.files_restored += 1

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None
        for fd in self.own:
            os.close(fd)
        self.own.clear()


@pytest.fixture
def update(tmp_path: Path) -> Iterator[Update]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    u = Update(Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log"), tmp_path)
    try:
        yield u
    finally:
        u.close()
        u.daemon.stop()
    bad = u.daemon.unexpected_tracebacks()
    assert not bad, "the daemon logged unexpected tracebacks:\n" + "\n".join(bad)


def start(d: Daemon, faults: str = "") -> None:
    d.env["KEXECFS_FAULTS"] = faults
    d.start()


class Writer(threading.Thread):
    """One command written to a file of the mount (or, with ``command`` None, one open for
    reading), in a thread: it may outlive a daemon."""

    def __init__(self, path: Path, command: str | None) -> None:
        super().__init__(daemon=True)
        self.path, self.command, self.errno = path, command, -1

    def run(self) -> None:
        try:
            with open(self.path, "r" if self.command is None else "w") as f:
                if self.command is not None:
                    f.write(self.command)
            self.errno = 0
        except OSError as exc:
            self.errno = exc.errno or -1


# Each step of an update, and the fault points a crash in it can hit. The daemon is
# restarted (SIGTERM, itself a restart) with the point armed right before its step, so
# "@n" counts from there: the n-th pass (journal.rewrite@1 is the new daemon's own
# snapshot at start, @2 the step's).
STEPS = ("preserve", "prepare", "freeze", "kexec", "restore", "finish")
FAULT_POINTS = [
    ("preserve", "journal.append"), ("preserve", "journal.durable"),
    ("prepare", "journal.append"), ("prepare", "prepare.file@3"), ("prepare", "image.copy_window@2"),
    ("prepare", "journal.rewrite@2"),
    ("freeze", "freeze.file@2"), ("freeze", "image.refresh_window@1"), ("freeze", "commit.before_fsync"),
    ("freeze", "commit.before_rename"), ("freeze", "commit.after_rename"), ("freeze", "journal.rewrite@2"),
    ("kexec", "journal.append"), ("kexec", "recover.file@2"), ("kexec", "journal.rewrite@2"),
    ("restore", "journal.durable"),
    ("finish", "journal.append"), ("finish", "retire.before_rename"), ("finish", "journal.rewrite@2"),
]
COUNTS = Counts()


def step(u: Update, name: str) -> Writer | None:
    """Start step ``name``; returns its writer (None for a step done by the container)."""
    mnt = u.daemon.mountpoint
    if name == "preserve":
        fd = os.memfd_create("db-late")
        data = b"late" * 3000
        os.write(fd, data)
        u.own.append(fd)
        u.expected["db"][9] = hashlib.sha256(data).hexdigest()
        return Writer(mnt / "db" / "fd_preserve", f"{fd} 9")
    if name == "restore":
        return Writer(mnt / "db" / "fds" / "5", None)  # the first open restores it (journaled: opened)
    return Writer(mnt / "state", name)


def after(u: Update, name: str) -> None:
    """What services do once a step is through."""
    if name == "prepare":
        u.write_while_prepared()
    elif name == "restore":
        u.restore_all()


def restarted_with(u: Update, faults: str) -> None:
    """Stop the daemon as systemctl restart does (SIGTERM) and start the next one."""
    d = u.daemon
    d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert d.proc.wait(30) == 0  # type: ignore[union-attr]
    start(d, faults)
    u.counts.restarts += 1
    u.check_after_restart()


def run_with_kill(u: Update, kill_in: str, point: str) -> str:
    """The update's steps, with ``point`` armed for step ``kill_in``, where the daemon must die."""
    d = u.daemon
    start(d)
    u.set_up()
    for name in STEPS:
        if name == kill_in:
            restarted_with(u, f"{point.partition('@')[0]}=kill@{point.partition('@')[2] or 1}")
        writer = step(u, name)
        assert writer is not None
        writer.start()
        while writer.is_alive() and d.proc.poll() is None:  # type: ignore[union-attr]
            writer.join(0.05)
        if d.proc.poll() is not None:  # type: ignore[union-attr]
            assert name == kill_in, f"the daemon died in {name}, not in {kill_in} ({point})"
            assert d.proc.returncode == -signal.SIGKILL, d.log_text()[-2000:]  # type: ignore[union-attr]
            start(d)
            u.counts.restarts += 1
            writer.join(30)
            assert not writer.is_alive(), f"{name} was never answered after the restart"
            assert writer.errno == 0, f"{name} failed after the restart: {os.strerror(writer.errno)}"
            u.check_after_restart()
            after(u, name)
            return name
        assert writer.errno == 0, f"{name}: {os.strerror(writer.errno)}"
        after(u, name)
    raise AssertionError(f"the daemon never died at {point}")


@pytest.mark.parametrize("kill_in,point", FAULT_POINTS, ids=[f"{s}-{p}" for s, p in FAULT_POINTS])
def test_kill_at_a_fault_point_loses_nothing(update: Update, kill_in: str, point: str) -> None:
    run_with_kill(update, kill_in, point)
    update.finish_update()
    _add(update.counts)


def _add(c: Counts) -> None:
    COUNTS.restarts += c.restarts
    COUNTS.registrations += c.registrations
    COUNTS.handles += c.handles
    COUNTS.files_restored += c.files_restored
    print(f"\nso far: {COUNTS.restarts} restarts, {COUNTS.registrations} registrations and {COUNTS.handles} "
          f"open files checked after them, {COUNTS.files_restored} files restored byte for byte")


def kill_at_random(u: Update, rng: random.Random, kills: int) -> None:
    """Kill the daemon ``kills`` times at random moments of the steps, restarting it each time."""
    d = u.daemon
    start(d)
    u.set_up()
    for name in STEPS:
        writer = step(u, name)
        assert writer is not None
        writer.start()
        if kills and rng.random() < 0.7:
            writer.join(rng.uniform(0, 0.05))
            d.kill()
            kills -= 1
            start(d)
            u.counts.restarts += 1
        writer.join(30)
        assert not writer.is_alive() and writer.errno == 0, f"{name}: errno {writer.errno}"
        u.check_after_restart()
        after(u, name)
    u.finish_update()


def test_kill_at_random_moments_fast(update: Update) -> None:
    kill_at_random(update, random.Random(16), kills=4)
    assert update.counts.restarts >= 1
    _add(update.counts)


@pytest.mark.nondeterministic
def test_kill_at_random_moments(tmp_path: Path) -> None:
    rng = random.Random()
    for i in range(8):
        mnt = tmp_path / str(i) / "mnt"
        mnt.mkdir(parents=True)
        u = Update(Daemon(mnt, tmp_path / str(i) / "images", tmp_path / str(i) / "daemon.log"), tmp_path / str(i))
        try:
            kill_at_random(u, rng, kills=6)
        finally:
            u.close()
            u.daemon.stop()
        _add(u.counts)
