"""Shared helpers of the hardening tier (tests/hard): daemons with armed fault points,
preserved files whose every byte is known, verification after a recovery, a watchdog
that turns a hung request into a failure instead of a hung test run.

Not a conftest (``tests/conftest.py`` is the one conftest; two would clash as modules
named ``conftest``): test modules import this one by name, as they import conftest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import FUSE_SKIP, NOBODY, OTHERS_PYTHON, Daemon, others_env, public_copy, sh

MiB = 1 << 20
IMAGE = "handover.kximg"

needs_fuse = pytest.mark.skipif(bool(FUSE_SKIP), reason=FUSE_SKIP or "")


def reachable(tmp_path: Path) -> None:
    """Let unprivileged test uids reach paths below pytest's 0700 tmp directories."""
    for p in (tmp_path, *tmp_path.parents):
        if p == Path("/"):
            break
        os.chmod(p, os.stat(p).st_mode | 0o011)


class FaultyDaemon(Daemon):
    """A Daemon whose process gets ``KEXECFS_FAULTS`` (set per start)."""

    def __init__(self, tmp_path: Path, name: str = "d", image_dir: Path | None = None,
                 extra: list[str] | None = None) -> None:
        mnt = tmp_path / f"{name}-mnt"
        mnt.mkdir(parents=True, exist_ok=True)
        reachable(tmp_path)
        super().__init__(mnt, image_dir or tmp_path / f"{name}-images", tmp_path / f"{name}.log", extra)
        self.faults = ""

    def start(self, faults: str = "") -> None:
        self.faults = faults
        saved = os.environ.get("KEXECFS_FAULTS")
        os.environ["KEXECFS_FAULTS"] = faults
        try:
            super().start()
        finally:
            if saved is None:
                del os.environ["KEXECFS_FAULTS"]
            else:
                os.environ["KEXECFS_FAULTS"] = saved

    def start_expecting_death(self, faults: str) -> None:
        """Start with ``faults`` armed where the daemon dies before it serves (in recovery)."""
        with pytest.raises(RuntimeError, match="exited with"):
            self.start(faults)
        assert self.proc is not None and self.proc.returncode == -signal.SIGKILL, self.log_text()[-3000:]
        self.stop()  # the dead mount, if init() got that far

    def wait_killed(self, timeout: float = 30) -> None:
        """The daemon died of an armed ``kill`` (SIGKILL), not of anything else."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the daemon did not die at {self.faults}") from None
        assert code == -signal.SIGKILL, f"daemon exited with {code}, expected SIGKILL at {self.faults}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, faults: str = "") -> None:
        if self.alive():
            self.kill()
        self.stop()
        self.start(faults)

    def check_log(self) -> None:
        bad = self.unexpected_tracebacks()
        assert not bad, "the daemon logged unexpected tracebacks:\n" + "\n".join(bad)


@contextlib.contextmanager
def daemon_at(tmp_path: Path, name: str = "d", faults: str = "", **kw) -> Iterator[FaultyDaemon]:
    d = FaultyDaemon(tmp_path, name, **kw)
    d.start(faults)
    try:
        yield d
    finally:
        if d.alive() and d.faults:
            d.kill()
        d.stop()
    d.check_log()


# ---------------------------------------------------------------------------- payloads


def sha256_fd(fd: int, size: int, step: int = 4 * MiB) -> str:
    h = hashlib.sha256()
    off = 0
    while off < size:
        chunk = os.pread(fd, min(step, size - off), off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


@dataclass
class File:
    """One file the test preserved: its own descriptor and what it must come back as."""

    instance: str
    token: int
    kind: str  # memfd | file
    fd: int
    size: int = 0
    pos: int = 0
    seals: int = 0
    sha256: str = ""

    def snapshot(self) -> None:
        """Record what the file holds now: what a recovery must give back."""
        self.size = os.fstat(self.fd).st_size
        self.sha256 = sha256_fd(self.fd, self.size)
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        if self.kind == "memfd":
            self.seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS)


@dataclass
class Payload:
    """Files held by the test process itself and preserved from it (root), in instances."""

    mnt: Path
    files: list[File] = field(default_factory=list)
    instances: dict[str, int] = field(default_factory=dict)  # name: owner uid

    def instance(self, name: str, uid: int = 0) -> None:
        os.mkdir(self.mnt / name)
        if uid:
            os.chown(self.mnt / name, uid, uid)
        self.instances[name] = uid

    def memfd(self, instance: str, token: int, size: int, *, islands: int = 0, seals: int = 0, pos: int = 0,
              seed: int | None = None) -> File:
        """A memfd of ``size`` bytes: random data, or ``islands`` 4 KiB islands in a sea of holes."""
        rng = random.Random(seed if seed is not None else token)
        fd = os.memfd_create(f"hard-{instance}-{token}", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
        if islands:
            for i in range(islands):
                off = min(size - 4096, i * (size // islands)) // 4096 * 4096
                os.pwrite(fd, rng.randbytes(4096), off)
        else:
            fill(fd, 0, size, rng)
        os.lseek(fd, pos, os.SEEK_SET)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        f = File(instance, token, "memfd", fd)
        self.files.append(f)
        return f

    def regular(self, instance: str, token: int, path: Path, size: int, pos: int = 0) -> File:
        path.write_bytes(random.Random(token).randbytes(size))
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        os.lseek(fd, pos, os.SEEK_SET)
        f = File(instance, token, "file", fd)
        self.files.append(f)
        return f

    def preserve(self, *files: File) -> None:
        for f in files or self.files:
            with open(self.mnt / f.instance / "fd_preserve", "w") as out:
                out.write(f"{f.fd} {f.token}\n")

    def snapshot(self) -> dict[tuple[str, int], tuple[int, int, int, str]]:
        for f in self.files:
            f.snapshot()
        return self.expected()

    def expected(self) -> dict[tuple[str, int], tuple[int, int, int, str]]:
        return {(f.instance, f.token): (f.size, f.pos, f.seals, f.sha256) for f in self.files}

    def close(self) -> None:
        for f in self.files:
            with contextlib.suppress(OSError):
                os.close(f.fd)
        self.files.clear()


def fill(fd: int, start: int, length: int, rng: random.Random, step: int = 4 * MiB) -> None:
    off = start
    while off < start + length:
        n = min(step, start + length - off)
        os.pwrite(fd, rng.randbytes(n), off)
        off += n


# ---------------------------------------------------------------------------- checks


def state(mnt: Path) -> str:
    return (mnt / "state").read_text().strip()


def status(mnt: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in (mnt / "status").read_text().splitlines() if ": " in line)


def instances(mnt: Path) -> list[str]:
    return sorted(p.name for p in mnt.iterdir() if p.is_dir())


def listing(mnt: Path, instance: str) -> list[int]:
    return [int(line.split()[0]) for line in (mnt / instance / "fd_preserve").read_text().splitlines()]


def verify_restored(mnt: Path, expected: dict[tuple[str, int], tuple[int, int, int, str]],
                    owners: dict[str, int] | None = None, subset: bool = False) -> int:
    """After a recovery: exactly the ``expected`` files, each restored byte for byte
    through ``fds/<token>`` with its size, position and seals. Returns the bytes checked.
    With ``subset``, other instances may exist as well."""
    want_instances = sorted({inst for inst, _ in expected} | set(owners or {}))
    if subset:
        assert set(want_instances) <= set(instances(mnt))
    else:
        assert instances(mnt) == want_instances
    checked = 0
    for inst in want_instances:
        tokens = sorted(t for i, t in expected if i == inst)
        assert listing(mnt, inst) == tokens, f"{inst}: preserved tokens differ"
        if owners is not None:
            assert os.stat(mnt / inst).st_uid == owners[inst]
        for token in tokens:
            size, pos, seals, digest = expected[inst, token]
            path = mnt / inst / "fds" / str(token)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert os.fstat(fd).st_size == size, f"{inst}/{token}: size"
                assert sha256_fd(fd, size) == digest, f"{inst}/{token}: contents differ"
                assert int(os.getxattr(path, "user.kexecfs.pos")) == pos, f"{inst}/{token}: position"
                kind = os.getxattr(path, "user.kexecfs.kind").decode()
                if kind == "memfd":
                    assert int(os.getxattr(path, "user.kexecfs.seals")) == seals, f"{inst}/{token}: seals"
            finally:
                os.close(fd)
            checked += size
    return checked


def assert_old_state(d: Daemon) -> None:
    """The daemon came back with nothing handed over: normal, no instances, no image,
    and no half-written image left behind."""
    assert state(d.mountpoint) == "normal"
    assert instances(d.mountpoint) == []
    assert not (d.image_dir / IMAGE).exists()
    assert_no_temp(d.image_dir)


def assert_no_temp(image_dir: Path) -> None:
    left = [p.name for p in image_dir.glob(".*.tmp")]
    assert not left, f"temporary image files left behind: {left}"


def errno_of(fn, *args) -> int:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except OSError as exc:
        return exc.errno or -1
    return 0


def write_errno(path: Path, data: bytes) -> int:
    """errno of one write(2) of ``data`` to ``path`` (0 if it worked)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno or -1
    try:
        os.write(fd, data)
        return 0
    except OSError as exc:
        return exc.errno or -1
    finally:
        os.close(fd)


def fuse_connection(mnt: Path) -> Path | None:
    """/sys/fs/fuse/connections/<dev> of the mount at ``mnt``."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            minor = fields[2].split(":")[1]
            path = Path("/sys/fs/fuse/connections") / minor
            return path if path.exists() else None
    return None


@contextlib.contextmanager
def watchdog(mnt: Path, seconds: float, what: str = "") -> Iterator[None]:
    """Abort the FUSE connection if the block takes longer than ``seconds``: a request the
    daemon never answers then fails (ENOTCONN) instead of hanging the test run, and the
    test fails saying so."""
    conn = fuse_connection(mnt)
    fired = threading.Event()
    done = threading.Event()

    def watch() -> None:
        if not done.wait(seconds):
            fired.set()
            if conn is not None:
                with contextlib.suppress(OSError):
                    (conn / "abort").write_text("1")

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
    assert not fired.is_set(), f"hang: {what or 'the block'} took more than {seconds} s; connection aborted"


__all__ = ["FUSE_SKIP", "IMAGE", "MiB", "NOBODY", "OTHERS_PYTHON", "Daemon", "FaultyDaemon", "File", "Payload",
           "Racer", "assert_no_temp", "assert_old_state", "daemon_at", "errno_of", "fill", "instances", "listing",
           "needs_fuse", "others_env", "public_copy", "reachable", "sh", "sh_state_event", "sha256_fd", "state",
           "status", "verify_restored", "watchdog", "write_errno"]


def sh_state_event(mnt: Path, event: str, target: str = "state", uid: int | None = None) -> None:
    """``echo EVENT > mnt/target``, as an operator would; it must succeed."""
    r = sh(f"echo {event} > {mnt}/{target}", uid=uid, timeout=300)
    assert r.returncode == 0, f"echo {event} > {target}: {r.stderr}"


class Racer(threading.Thread):
    """A thread whose failure fails the test: join() re-raises what it raised (a plain
    thread's assertion would only be a warning)."""

    def __init__(self, target, *args) -> None:  # type: ignore[no-untyped-def]
        super().__init__(target=target, args=args, daemon=True)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            super().run()
        except BaseException as exc:  # noqa: BLE001 - handed to join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
