"""The test harness: everything the tests share but the fixtures (those are in conftest.py).

- Daemons: :class:`Daemon` runs the installed program (``python -m kexecfs mount
  --foreground``) in a child process, with extra options, environment and armed fault
  points (``KEXECFS_FAULTS``) per start; it is killed, restarted and judged by its log.
  :func:`mini_daemon` runs a tiny pyfuse3 file system instead, for the tests of the C
  extension itself (the file system's side is :mod:`minifs`).
- Other uids: :func:`sh` runs a shell as a user would, :func:`as_uid` prefixes a command
  with setpriv; processes of other uids run :data:`OTHERS_PYTHON` on :func:`public_copy`,
  a world-readable copy of what they need, with :func:`others_env`; :func:`public_tmp`
  makes a directory they can reach.
- Payloads (:mod:`payload`, the standard-library half these processes import too):
  files whose every byte is known, and :func:`digest`; :class:`Payload` preserves them
  from the test process and :func:`verify_restored` checks them through a mount.
- Answers: :func:`errno_of` and :func:`refused` for every layer's error type (the core's
  KexecfsError, the operations' FUSEError, a mount's OSError), :func:`write_errno`, the
  mount's state, status and listings, and :func:`watchdog`, which turns a hung request
  into a failure.

No module here loads pyfuse3 or the C extension: the core tier runs without them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kexecfs.core.image import IMAGE_NAME as IMAGE
from payload import MiB, File, digest, fill, make_memfd, make_regular, seals_of

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
NOBODY = 65534
TIMEOUT = 10.0  # seconds a mini daemon has to answer or to exit

# Processes the tests start as other uids (setpriv, unshare) must need nothing inside
# the checkout: a clone may sit where they cannot enter (root's home is 0700 on Debian).
# They run the system python (the venv's may live in that home too) on a world-readable
# copy of these, made once per run below the public base (see public_copy).
OTHERS_PYTHON = "/usr/bin/python3"
PUBLIC_FILES = ("kexecfs", "tests/payload.py", "tests/service.py", "tests/hard/perm_agent.py",
                "tests/hard/load_worker.py", "examples/keep_memfd.py")


def _fuse_usable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse on this machine"
    if os.geteuid() != 0:
        return "kexecfs tests mount FUSE filesystems with allow_other and take descriptors with pidfd_getfd: run as root"
    if not shutil.which("fusermount3"):
        return "fusermount3 is missing (Debian package fuse3; `make test` installs it)"
    return None


FUSE_SKIP = _fuse_usable()  # why the tests that mount cannot run here, or None
needs_fuse = pytest.mark.skipif(bool(FUSE_SKIP), reason=FUSE_SKIP or "")


# ---------------------------------------------------------------------------- shells and uids


def as_uid(uid: int) -> list[str]:
    """The prefix that runs a command as ``uid`` (group ``uid``, no supplementary groups)."""
    return ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]


def sh(script: str, *, uid: int | None = None, check: bool = False, cwd: str | None = None,
       timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash (as ``uid`` if given), the way a user at a shell would."""
    cmd = ["bash", "-c", script]
    if uid is not None:
        cmd = [*as_uid(uid), *cmd]
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

def sh_state_event(mnt: Path, event: str, target: str = "state", uid: int | None = None) -> None:
    """``echo EVENT > mnt/target``, as an operator would; it must succeed."""
    r = sh(f"echo {event} > {mnt}/{target}", uid=uid, timeout=300)
    assert r.returncode == 0, f"echo {event} > {target}: {r.stderr}"


_public_base_path: Path | None = None
_public_copy_path: Path | None = None


def public_base() -> Path:
    """This run's directory in /tmp, made on first use: other uids may traverse it
    (0711) but not list it; removed when the run ends (:func:`remove_public_base`)."""
    global _public_base_path
    if _public_base_path is None:
        _public_base_path = Path(tempfile.mkdtemp(prefix="kexecfs-tests-", dir="/tmp"))
        os.chmod(_public_base_path, 0o711)
    return _public_base_path


def public_tmp(name: str) -> Path:
    """A new directory below the public base that other uids can traverse (0711).

    Not pytest's tmp_path_factory: pytest keeps its temporary directories below a 0700
    directory, which it resets to 0700 whenever a pytest session starts, so a mount in
    there could become unreachable for other uids in the middle of a test."""
    path = Path(tempfile.mkdtemp(prefix=re.sub(r"\W", "_", name)[:40] + "-", dir=public_base()))
    os.chmod(path, 0o711)
    return path


def remove_public_base() -> None:
    """The end of a run: the public base goes, unless a mount is still below it (never
    recurse into a mount)."""
    base = _public_base_path
    if base is not None and str(base) not in Path("/proc/mounts").read_text():
        shutil.rmtree(base, ignore_errors=True)


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


# ---------------------------------------------------------------------------- the kexecfs daemon


class Daemon:
    """A kexecfs daemon serving ``mountpoint`` from a child process; restartable, killable.

    ``extra`` are more options of ``kexecfs mount``, ``env`` more environment for every
    start (NOTIFY_SOCKET, say). Fault points are armed per start (:meth:`start`), so
    that the restart after an injected crash runs clean unless it is told otherwise.

    By default the daemon's connection and descriptors outlive it in a keeper (SPEC
    section 10): a killed daemon leaves its mount waiting for the next :meth:`start`.
    With ``KEXECFS_FD_STORE=none`` in ``env`` nothing outlives it, as after a power cut.
    ``nofile``: the daemon's RLIMIT_NOFILE, soft and hard (its keepers inherit it).
    """

    def __init__(self, mountpoint: Path, image_dir: Path, log: Path, extra: list[str] | None = None, *,
                 env: Mapping[str, str] | None = None, nofile: int | None = None) -> None:
        self.nofile = nofile
        self.mountpoint = mountpoint
        self.image_dir = image_dir
        self.log = log
        self.extra = extra or []
        self.env = dict(env or {})
        self.faults = ""  # armed in the running daemon
        self.proc: subprocess.Popen[bytes] | None = None
        self.expected: list[str] = []  # log fragments that mark an expected traceback

    @classmethod
    def at(cls, tmp_path: Path, name: str = "d", image_dir: Path | None = None, extra: list[str] | None = None, *,
           env: Mapping[str, str] | None = None) -> Daemon:
        """A daemon whose mount point, images and log are ``name``-mnt, -images and .log in
        ``tmp_path``: the hardening tests' daemon.

        Its descriptors outlive it nowhere (``KEXECFS_FD_STORE=none``, unless ``env`` says
        otherwise): a killed daemon takes its mount and every registration with it, and
        the next one has only the image directory, as after a power cut. That is what the
        hardening tests check; hard/test_t4_hard_restart.py kills daemons whose keeper
        keeps everything."""
        mnt = tmp_path / f"{name}-mnt"
        mnt.mkdir(parents=True, exist_ok=True)
        return cls(mnt, image_dir or tmp_path / f"{name}-images", tmp_path / f"{name}.log", extra,
                   env={"KEXECFS_FD_STORE": "none", **(env or {})})

    def start(self, faults: str = "") -> None:
        """Start, with ``faults`` armed (``point[=action[@n]],...``, see kexecfs.core.faults;
        none by default, whatever the tests' own environment says); return once the
        mount answers requests."""
        self.faults = faults
        logf = open(self.log, "ab")
        logged = logf.tell()
        env = {**os.environ, "PYTHONPATH": str(ROOT), **self.env, "KEXECFS_FAULTS": faults}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kexecfs", "mount", str(self.mountpoint), "--image-dir", str(self.image_dir),
             "--foreground", *self.extra],
            stdout=logf, stderr=logf, cwd=ROOT, env=env,
            preexec_fn=(lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile)))
            if self.nofile else None)
        deadline = time.monotonic() + 30
        # Not a look at the mount until the daemon says it serves: the mount of a restarted
        # daemon exists all along, and a request to it waits until some daemon answers.
        while "kexecfs mounted on" not in self.log.read_bytes()[logged:].decode(errors="replace") \
                or not is_mounted(self.mountpoint):
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

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def descriptors(self) -> int:
        """How many descriptors the daemon holds now."""
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def start_expecting_death(self, faults: str) -> None:
        """Start with ``faults`` armed where the daemon dies before it serves (in recovery)."""
        with pytest.raises(RuntimeError, match="exited with"):
            self.start(faults)
        assert self.proc is not None and self.proc.returncode == -signal.SIGKILL, self.log_text()[-3000:]
        self.stop()  # the dead mount, if init() got that far

    def kill(self) -> None:
        """SIGKILL the daemon, as a crash would. With a keeper (the default) its connection
        stays: requests wait, the next :meth:`start` serves them, :meth:`stop` unmounts.
        With ``KEXECFS_FD_STORE=none`` the mount is left answering ENOTCONN."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

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

    def stop(self) -> None:
        """Unmount and wait for the daemon to exit; detach a dead mount. A connection that a
        killed daemon left with its keeper is ended too (aborted): nothing would answer a
        request still waiting on it, and the keeper exits with it."""
        if self.proc is None:
            return
        orphaned = self.proc.poll() is not None
        if not orphaned:
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                orphaned = True
        # A connection still held is aborted while it is mounted here: its number cannot
        # have gone to another mount yet (once unmounted, a new mount may take it).
        connection = fuse_connection(self.mountpoint)
        if orphaned and connection is not None:
            abort_connection(connection)
        if is_mounted(self.mountpoint):
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def unexpected_tracebacks(self) -> list[str]:
        blocks = self.log_text().split("Traceback (most recent call last)")[1:]
        return [b for b in blocks if not any(e in b for e in self.expected)]

    def check_log(self) -> None:
        """Fail if the daemon logged a traceback it was not told to expect: a handler that
        hit an unexpected exception is a bug even when the caller only saw EIO."""
        bad = self.unexpected_tracebacks()
        assert not bad, "the daemon logged unexpected tracebacks:\n" + "\n".join(bad)


@contextlib.contextmanager
def serving(d: Daemon, faults: str = "") -> Iterator[Daemon]:
    """``d`` started for the block, stopped after it (killed first if faults were armed),
    and its log checked once it stopped."""
    d.start(faults)
    try:
        yield d
    finally:
        if d.alive() and d.faults:
            d.kill()
        d.stop()
    d.check_log()


# ---------------------------------------------------------------------------- the mini daemon


def python_env() -> dict[str, str]:
    """Environment for child interpreters: kexecfs from this tree (with the extension
    built in place: `python setup.py build_ext --inplace` or `pip install -e .`) and
    tests/ (for minifs)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), str(TESTS), env.get("PYTHONPATH")]))
    return env


class MiniMount:
    """A mini daemon's mount: its path, its process and its stderr."""

    def __init__(self, path: Path, proc: subprocess.Popen[str], stderr: Path) -> None:
        self.path = path
        self.proc = proc
        self.stderr_path = stderr

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextlib.contextmanager
def mini_daemon(script: str, workdir: Path, mnt: Path, *args: Any) -> Iterator[MiniMount]:
    """Run ``script`` (a pyfuse3 file system built on :mod:`minifs`: it mounts on argv[1],
    prints ``READY`` once serving, exits 0 after an unmount) with ``args``; always unmount
    (lazily if a failed test left a caller stuck in the mount), and fail the test if the
    daemon did not exit 0."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: cannot mount FUSE here")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 not installed (Debian package fuse3)")
    path = workdir / "daemon.py"
    path.write_text(script)
    stderr = workdir / "daemon.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(path), str(mnt), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=python_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if line != "READY\n":
        proc.kill()
        proc.wait()
        # It may have died after mounting (e.g. ensure_live() failed).
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        pytest.fail(f"daemon did not start: {line!r}\n{stderr.read_text()}")
    try:
        yield MiniMount(mnt, proc, stderr)
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon did not exit after unmount\n{stderr.read_text()}")
        # A failing daemon exits non-zero: its traceback is the interesting part.
        assert proc.returncode == 0, stderr.read_text()


def in_fresh_interpreter(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter of this tree: what loads first matters to the C extension."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False, capture_output=True,
                          text=True, timeout=60, env=python_env())


# ---------------------------------------------------------------------------- payloads


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
        """A memfd of ``size`` bytes seeded by ``seed`` (the token by default), see :func:`payload.make_memfd`."""
        fd = make_memfd(f"hard-{instance}-{token}", size, islands=islands, seals=seals, pos=pos,
                        seed=token if seed is None else seed)
        f = File(instance, token, "memfd", fd)
        self.files.append(f)
        return f

    def regular(self, instance: str, token: int, path: Path, size: int, pos: int = 0) -> File:
        f = File(instance, token, "file", make_regular(path, size, pos=pos, seed=token))
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
        return {(f.instance, f.token): f.expected for f in self.files}

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files.clear()


# ---------------------------------------------------------------------------- a mount's answers


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
            size, pos, seals, sha256 = expected[inst, token]
            path = mnt / inst / "fds" / str(token)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                assert os.fstat(fd).st_size == size, f"{inst}/{token}: size"
                assert digest(fd, size) == sha256, f"{inst}/{token}: contents differ"
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


# ---------------------------------------------------------------------------- errno


def refused(fn: Callable[..., Any], *args: Any, error: type[BaseException] = OSError) -> Any:
    """The ``error`` that ``fn(*args)`` must raise (the test fails if it returns)."""
    with pytest.raises(error) as info:
        fn(*args)
    return info.value


def errno_of(fn: Callable[..., Any], *args: Any, error: type[BaseException] = OSError) -> int:
    """The errno of the ``error`` that ``fn(*args)`` raises, 0 if it returns; any other
    exception goes on. Each tier names its layer's error: KexecfsError (the core),
    pyfuse3.FUSEError (the operations), OSError (a mount)."""
    try:
        fn(*args)
    except error as exc:
        return getattr(exc, "errno", None) or -1
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


# ---------------------------------------------------------------------------- restarts


# What the tests of daemon restarts share (SPEC section 10): an update served to a
# container that holds a bind mount of its instance and open files in it, checked
# after every restart (hard/test_t4_hard_restart.py, test_t3_restart_systemd.py).

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


class ContainerAgent:
    """A service in a container: its own mount and pid namespaces, an instance bind-mounted
    in them (the original mount dropped from them), driven by the test one request at a time."""

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
    service: ContainerAgent | None = None
    expected: dict[str, dict[int, str]] = field(default_factory=dict)
    own: list[int] = field(default_factory=list)
    own_by_token: dict[int, int] = field(default_factory=dict)
    counts: Counts = field(default_factory=Counts)
    inos: dict[str, object] = field(default_factory=dict)  # inode numbers the container sees, by path

    def set_up(self) -> None:
        mnt = self.daemon.mountpoint
        sh(f"mkdir {mnt}/svc {mnt}/db", check=True)
        self.service = ContainerAgent(mnt, "svc", self.tmp_path / "bind")
        self.expected = {"svc": {}, "db": {}}
        for token, size in ((1, 3 << 20), (2, 4096), (3, 100_000)):
            self.expected["svc"][token] = str(self.service.ask("preserve", token, size, token * 7))
        for token in (5, 6):
            self.preserve_own(token)
        self.service.ask("hold", "state")
        self.service.ask("hold", "fd_preserve")
        # The instance, one of its files and a preserved file's entry: the kernel keeps
        # dentries and open files by inode number, so a restart must give the same ones.
        self.inos = {path: self.service.ask("ino", path) for path in (".", "state", "fds/1")}

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
        return sorted(listing(self.daemon.mountpoint, instance))

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
        for path, ino in self.inos.items():
            assert self.service.ask("ino", path) == ino, f"svc/{path} got another inode number"

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
        for token, want in self.expected["svc"].items():
            assert self.service.ask("sha", f"fds/{token}") == want, f"svc/fds/{token} differs"
            self.counts.files_restored += 1
        for token, want in self.expected["db"].items():
            assert hashlib.sha256((mnt / "db" / "fds" / str(token)).read_bytes()).hexdigest() == want
            self.counts.files_restored += 1

    def close(self) -> None:
        if self.service is not None:
            self.service.close()
            self.service = None
        for fd in self.own:
            os.close(fd)
        self.own.clear()


@contextlib.contextmanager
def updating(u: Update) -> Iterator[Update]:
    """``u`` for a test's block; then its container and descriptors closed, its daemon
    stopped, and the test failed if the daemon logged a traceback it was not told to expect."""
    try:
        yield u
    finally:
        u.close()
        u.daemon.stop()
    bad = u.daemon.unexpected_tracebacks()
    assert not bad, "the daemon logged unexpected tracebacks:\n" + "\n".join(bad)


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


# A program under ``kexecfs run``: it opens /dev/liveupdate, says "ready", waits for the
# file argv[1] to exist, then makes a CREATE_SESSION and prints its answer
# (test_t3_sessions, test_t3_restart).
WAIT_THEN_CREATE = """
import ctypes, errno, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
dev = os.open("/dev/liveupdate", os.O_RDWR)
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
buf = ctypes.create_string_buffer(struct.pack("=Ii64s", 72, -1, b"late"), 72)
rc = libc.ioctl(dev, 0xBA00, buf)
print("answer", errno.errorcode.get(ctypes.get_errno()) if rc else "ok", flush=True)
"""


# ---------------------------------------------------------------------------- hangs and threads


FUSECTL = Path("/sys/fs/fuse/connections")


def _mountinfo_path(path: Path) -> str:
    """``path`` as /proc/self/mountinfo spells it (octal escapes)."""
    return "".join({" ": "\\040", "\t": "\\011", "\n": "\\012", "\\": "\\134"}.get(c, c) for c in str(path))


def is_mounted(path: Path) -> bool:
    """Whether a filesystem is mounted on ``path``, from the mount table: a stat could wait
    for ever on a connection that no daemon serves (kept for the next one)."""
    target = _mountinfo_path(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == target for line in f)


def fuse_connection(mnt: Path) -> Path | None:
    """/sys/fs/fuse/connections/<dev> of the FUSE mount at ``mnt`` (fusectl mounted if it
    is not), or None if nothing is mounted there."""
    target = _mountinfo_path(mnt)
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == target:
            path = FUSECTL / fields[2].split(":")[1]
            if not path.exists() and not os.path.ismount(FUSECTL):
                subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True)
            return path if path.exists() else None
    return None


def abort_connection(connection: Path) -> None:
    """End a FUSE connection (fusectl's abort): requests still waiting fail ENOTCONN, and a
    keeper holding it exits. Nothing if it has ended already."""
    with contextlib.suppress(OSError):
        (connection / "abort").write_text("1")


def until(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Wait for ``condition`` (polled), failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s"
        time.sleep(0.02)


def keeper_holdings(image_dir: Path) -> dict[str, list[str]]:
    """What each live keeper of ``image_dir`` holds: socket name -> the names it holds
    (asked with the keepers' own LIST; a dead keeper's socket is left out)."""
    import socket

    from kexecfs.fs import keeper

    held: dict[str, list[str]] = {}
    for path in sorted(image_dir.glob("keeper*.sock")):
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            try:
                sock.connect(keeper.socket_address(path))
                keeper.send(sock, "LIST")
                names: list[str] = []
                while (reply := keeper.receive(sock)[0]).startswith("NAMES"):
                    names += reply.split()[1:]
            except OSError:
                continue
            if reply.startswith("DONE"):
                held[path.name] = names
    return held


def stored_files(image_dir: Path) -> dict[str, int]:
    """Each preserved file's name in the keepers -> how many keepers hold it (two, always)."""
    counts: dict[str, int] = {}
    for names in keeper_holdings(image_dir).values():
        for name in names:
            if name not in ("fuse", "fuse-init"):
                counts[name] = counts.get(name, 0) + 1
    return counts


def waiting_requests(connection: Path) -> int:
    """Requests of the connection that no daemon has answered yet (fusectl's ``waiting``)."""
    return int((connection / "waiting").read_text())


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
                abort_connection(conn)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()
    assert not fired.is_set(), f"hang: {what or 'the block'} took more than {seconds} s; connection aborted"


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


__all__ = [
    "ContainerAgent", "Counts", "Daemon", "FUSE_SKIP", "File", "IMAGE", "MiB", "MiniMount", "NOBODY", "OTHERS_PYTHON",
    "PUBLIC_FILES", "Payload", "ROOT", "Racer", "TESTS", "TIMEOUT", "Update", "WAIT_THEN_CREATE", "Writer",
    "abort_connection", "as_uid", "assert_no_temp", "assert_old_state", "digest", "errno_of", "fill",
    "fuse_connection", "in_fresh_interpreter", "instances", "is_mounted", "listing", "make_memfd", "make_regular",
    "mini_daemon", "needs_fuse", "others_env", "public_base", "public_copy", "public_tmp", "python_env", "refused",
    "remove_public_base", "seals_of", "serving", "sh", "sh_state_event", "state", "status", "updating",
    "verify_restored", "waiting_requests", "watchdog", "write_errno",
]
