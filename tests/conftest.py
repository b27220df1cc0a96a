"""Fixtures: a real kexecfs mount served by a daemon in a child process.

The daemon is the installed program (``python -m kexecfs mount --foreground``), its log
goes to a file, and teardown fails the test if the daemon logged a traceback it was
not told to expect: a handler that hit an unexpected exception is a bug even when the
caller only saw EIO.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534

# Processes the tests start as other uids (setpriv, unshare) must need nothing inside
# the checkout: a clone may sit where they cannot enter (root's home is 0700 on Debian).
# They run the system python (the venv's may live in that home too) on a world-readable
# copy of these, made once per run below the public base (see public_copy).
OTHERS_PYTHON = "/usr/bin/python3"
PUBLIC_FILES = ("kexecfs", "tests/service.py", "tests/hard/perm_agent.py", "tests/hard/load_worker.py",
                "examples/keep_memfd.py")


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "kexecfs tests mount FUSE filesystems with allow_other and take descriptors with pidfd_getfd: run as root"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing (Debian package fuse3; `make test` installs it)"
    return None


FUSE_SKIP = _fuse_usable()


def sh(script: str, *, uid: int | None = None, check: bool = False, cwd: str | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash (as ``uid`` if given), the way a user at a shell would."""
    cmd = ["bash", "-c", script]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=cwd, timeout=timeout)


def in_kernel_with_kexec(*cmd: str, loaded: str | None = "0", env: dict[str, str] | None = None,
                         ) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` where /sys/kernel/kexec_loaded reads ``loaded`` (None: is missing, as in a
    kernel without kexec): a tmpfs over /sys/kernel in a mount namespace of its own, so
    that what kexecfs check finds does not depend on the kernel the tests run on."""
    setup = "mount -t tmpfs tmpfs /sys/kernel" + ("" if loaded is None else f" && echo {loaded} > /sys/kernel/kexec_loaded")
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"',
                           "sh", *cmd], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env=env or {**os.environ, "PYTHONPATH": str(ROOT)})


class Daemon:
    """A kexecfs daemon serving ``mountpoint``; restartable, killable."""

    def __init__(self, mountpoint: Path, image_dir: Path, log: Path, extra: list[str] | None = None) -> None:
        self.mountpoint = mountpoint
        self.image_dir = image_dir
        self.log = log
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected: list[str] = []  # log fragments that mark an expected traceback

    def start(self) -> None:
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kexecfs", "mount", str(self.mountpoint), "--image-dir", str(self.image_dir),
             "--foreground", *self.extra],
            stdout=logf, stderr=logf, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        deadline = time.monotonic() + 30
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise RuntimeError(f"kexecfs daemon exited with {self.proc.returncode}:\n{self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kexecfs did not mount within 30 s:\n{self.log.read_text()}")
            time.sleep(0.02)
        # The mount exists once init() returns; wait until requests are answered too.
        while True:
            try:
                (self.mountpoint / "state").read_text()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would; the mount is left answering ENOTCONN."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mountpoint) or _is_dead_mount(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def unexpected_tracebacks(self) -> list[str]:
        blocks = self.log_text().split("Traceback (most recent call last)")[1:]
        return [b for b in blocks if not any(e in b for e in self.expected)]


def _is_dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError:
        return True


_public_base_path: Path | None = None
_public_copy_path: Path | None = None


def public_base() -> Path:
    """This run's directory in /tmp, made on first use: other uids may traverse it
    (0711) but not list it; removed when the run ends."""
    global _public_base_path
    if _public_base_path is None:
        _public_base_path = Path(tempfile.mkdtemp(prefix="kexecfs-tests-", dir="/tmp"))
        os.chmod(_public_base_path, 0o711)
    return _public_base_path


def public_copy(rel: str = "") -> Path:
    """The copy of ``rel`` (one of PUBLIC_FILES, a path in the checkout) that every uid
    can read; with no argument, the copy's top, to put on PYTHONPATH.

    The modes are set, not copied: a checkout cloned under umask 077 has 0600 files."""
    global _public_copy_path
    if _public_copy_path is None:
        top = public_base() / "checkout"
        for name in PUBLIC_FILES:
            src, dst = ROOT / name, top / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
            else:
                shutil.copyfile(src, dst)
        for path in (top, *top.rglob("*")):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        _public_copy_path = top
    if rel and rel not in PUBLIC_FILES:
        raise ValueError(f"{rel} is not copied for other uids: add it to PUBLIC_FILES")
    return _public_copy_path / rel


def others_env() -> dict[str, str]:
    """The environment of a process run as another uid: the public copy of kexecfs on
    its path, nothing of the checkout or the venv."""
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "PYTHONPATH": str(public_copy())}


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    base = _public_base_path
    if base is not None and str(base) not in Path("/proc/mounts").read_text():  # never recurse into a mount
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Path:
    """A per-test directory the unprivileged test uids can traverse.

    Replaces pytest's own: pytest keeps its temporary directories below a 0700
    directory, which it resets to 0700 whenever a pytest session starts, so a test's
    mount could become unreachable for other uids in the middle of the test.
    """
    path = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "_", request.node.name)[:40] + "-", dir=public_base()))
    os.chmod(path, 0o711)
    return path


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log")
    d.start()
    try:
        yield d
    finally:
        d.stop()
    bad = d.unexpected_tracebacks()
    assert not bad, "the daemon logged unexpected tracebacks:\n" + "\n".join(bad)


@pytest.fixture
def mnt(daemon: Daemon) -> Path:
    return daemon.mountpoint
