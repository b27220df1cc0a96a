"""Tier 3: the merged LUO API (6.19 sessions) and ``kexecfs run``, through a real mount.

The C program tests/c/luo_sessions.c covers every errno row in its own words (directly
on the control files, and under ``kexecfs run`` around a kexec); this file drives it,
and adds what needs processes around it: a daemon restart, an unprivileged owner, the
Python client, and a launcher or daemon that dies under a waiting caller.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from harness import NOBODY, OTHERS_PYTHON, ROOT, WAIT_THEN_CREATE, Daemon, others_env, public_copy, sh
from kexecfs.client import Kexecfs

C_SOURCE = ROOT / "tests" / "c" / "luo_sessions.c"


@pytest.fixture(scope="module")
def luo_sessions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = public_copy() / "luo_sessions"  # other uids run it too
    if not out.exists():
        subprocess.run(["cc", "-Wall", "-Wextra", "-Werror", "-O1", "-o", str(out), str(C_SOURCE)], check=True)
        os.chmod(out, 0o755)
    return out


def kexecfs_run(mnt: Path, *argv: str, uid: int | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``kexecfs run -- ARGV`` as root with the project's python, or as ``uid`` with the
    system python and the public copy of kexecfs (as an unprivileged user would run it).
    Output goes through files: the programs leave children holding their sessions, and
    those would keep a pipe open long after the launcher returned."""
    if uid is None:
        cmd = [sys.executable, "-m", "kexecfs", "--mount", str(mnt), "run", "--", *argv]
        env, cwd = None, str(ROOT)
    else:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", OTHERS_PYTHON, "-m", "kexecfs",
               "--mount", str(mnt), "run", "--", *argv]
        env, cwd = others_env(), "/"
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        done = subprocess.run(cmd, stdout=out, stderr=err, text=True, timeout=timeout, env=env, cwd=cwd)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(cmd, done.returncode, out.read(), err.read())


def tap(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The TAP lines; fails on any 'not ok', a crash or an incomplete plan."""
    lines = result.stdout.splitlines()
    failed = [line for line in lines if line.startswith("not ok")]
    assert not failed and result.returncode == 0, result.stdout + result.stderr
    assert any(line.startswith("1..") for line in lines), result.stdout + result.stderr
    return [line for line in lines if line.startswith("ok")]


def kill_holders(name: str) -> None:
    """What a kexec does to the processes that held sessions before it."""
    subprocess.run(["pkill", "-KILL", "-f", name], capture_output=True)


def test_every_row_directly_on_the_control_files(mnt: Path, luo_sessions: Path, daemon: Daemon) -> None:
    ok = tap(subprocess.run([str(luo_sessions), "direct", str(mnt)], capture_output=True, text=True, timeout=60))
    assert len(ok) >= 20
    assert "run the program under 'kexecfs run'" in daemon.log_text()


@pytest.mark.parametrize("how", ["simulated kexec", "daemon SIGKILL after freeze"])
def test_sessions_across_an_update_under_kexecfs_run(daemon: Daemon, luo_sessions: Path, how: str) -> None:
    mnt = daemon.mountpoint
    before = tap(kexecfs_run(mnt, str(luo_sessions), "before", str(mnt)))
    assert len(before) == 14
    names = sorted(p.name for p in mnt.iterdir() if p.is_dir())
    assert names == ["kx-a", "kx-child", "odd%20name%2Fwith%20spaces"], names
    if how == "simulated kexec":
        sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    else:
        sh(f"echo prepare > {mnt}/state && echo freeze > {mnt}/state", check=True)
        daemon.kill()
        daemon.start()
        assert (mnt / "state").read_text() == "frozen\n", "a restart is not a kexec: nothing is lost"
        sh(f"echo kexec > {mnt}/state", check=True)
    kill_holders(f"{luo_sessions} before")
    assert (mnt / "state").read_text() == "updated\n"
    after = tap(kexecfs_run(mnt, str(luo_sessions), "after", str(mnt)))
    assert len(after) == 15
    # Each session was finished (by SESSION_FINISH, or by closing the retrieved fd) and ended.
    assert sorted(p.name for p in mnt.iterdir() if p.is_dir()) == []
    assert (mnt / "state").read_text() == "normal\n"


def test_an_unprivileged_owner_adopts_the_instance_root_delegated(daemon: Daemon) -> None:
    """Only root creates instances; root makes one and delegates it, and the owner's
    unmodified program gets it as its session (kexecfs run in a user namespace)."""
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/svc && chown -R {NOBODY}:{NOBODY} {mnt}/svc", check=True)
    program = public_copy() / "session_program.py"
    program.write_text(SESSION_PROGRAM)
    os.chmod(program, 0o644)
    out = kexecfs_run(mnt, OTHERS_PYTHON, str(program), "create", "svc", uid=NOBODY)
    assert out.stdout.split() == ["created", "preserved", "other:", "EPERM"], out.stdout + out.stderr
    sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    kill_holders(f"{program} create")
    out = kexecfs_run(mnt, OTHERS_PYTHON, str(program), "retrieve", "svc", uid=NOBODY)
    assert out.stdout.split() == ["retrieved", "kept", "across", "the", "kexec"], out.stdout + out.stderr


SESSION_PROGRAM = r'''
import ctypes, errno, os, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
def call(fd, cmd, layout, *values):
    buf = ctypes.create_string_buffer(struct.pack(layout, *values), struct.calcsize(layout))
    if libc.ioctl(fd, cmd, buf) != 0:
        return errno.errorcode[ctypes.get_errno()], None
    return "ok", struct.unpack(layout, buf.raw)
dev = os.open("/dev/liveupdate", os.O_RDWR)
what, name = sys.argv[1], sys.argv[2].encode()
if what == "create":
    res, out = call(dev, 0xBA00, "=Ii64s", 72, -1, name)
    print("created" if res == "ok" else res)
    m = os.memfd_create("svc")
    os.write(m, b"kept across the kexec")
    print("preserved" if call(out[1], 0xBA40, "=IiQ", 16, m, 5)[0] == "ok" else "not preserved")
    print("other:", call(dev, 0xBA00, "=Ii64s", 72, -1, b"not-delegated")[0])
    sys.stdout.flush()
    if os.fork() == 0:
        while True:
            time.sleep(60)
else:
    res, out = call(dev, 0xBA01, "=Ii64s", 72, -1, name)
    print("retrieved" if res == "ok" else res)
    res, got = call(out[1], 0xBA41, "=IiQ", 16, -1, 5)
    print(os.read(got[1], 100).decode() if res == "ok" else res)
'''


def test_the_python_client_speaks_sessions(mnt: Path) -> None:
    kx = Kexecfs(mnt)
    memfd = os.memfd_create("client")
    os.write(memfd, b"from kexecfs.client")
    held = kx.create_session("client session/1")
    held.preserve(memfd, 0x1A)
    assert held.name() == b"client session/1"
    assert (mnt / "client%20session%2F1" / "fd_preserve").read_text().startswith("26 memfd")
    with kx.create_session("closed") as closed:
        closed.preserve(os.memfd_create("gone"), 1)
    # FUSE sends RELEASE after close() returns: wait for it, without a speed to meet.
    deadline = time.monotonic() + 30
    while (mnt / "closed").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not (mnt / "closed").exists(), "closing a created session ends it"
    kx.event("prepare")
    kx.event("kexec")
    with kx.retrieve_session(b"client session/1") as again:
        fd = again.retrieve(0x1A)
        assert os.pread(fd, 100, 0) == b"from kexecfs.client" and os.lseek(fd, 0, os.SEEK_CUR) == 0
        again.finish()
    assert kx.state() == "normal"
    held.close()  # the pre-kexec session fd: it belongs to the old boot, and changes nothing now
    assert kx.state() == "normal"


@pytest.mark.parametrize("who", ["launcher", "daemon"])
def test_no_caller_hangs_when_something_dies(tmp_path: Path, who: str) -> None:
    """The program is about to CREATE_SESSION when the launcher (SIGKILL: the kernel then
    answers its notified calls ENOSYS) or the daemon (SIGKILL; with nothing kept outside
    it, its connection dies and the forwarded call fails ENOTCONN) dies; the call fails
    with that errno instead of hanging. (A daemon whose keeper keeps the connection is
    replaced without the call failing: test_t3_restart.py.)"""
    daemon = Daemon(tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log", env={"KEXECFS_FD_STORE": "none"})
    daemon.mountpoint.mkdir()
    daemon.start()
    mnt, go = daemon.mountpoint, tmp_path / "go"
    program = tmp_path / "wait_then_create.py"
    program.write_text(WAIT_THEN_CREATE)
    launcher = subprocess.Popen([sys.executable, "-m", "kexecfs", "--mount", str(mnt), "run", "--", sys.executable,
                                 str(program), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert launcher.stdout is not None
    try:
        assert launcher.stdout.readline().strip() == "ready"
        if who == "launcher":
            launcher.send_signal(signal.SIGKILL)
            launcher.wait()
        else:
            daemon.kill()
        go.touch()
        # The program writes to the pipe the test reads, whoever of the others is dead.
        answer = launcher.stdout.readline().split()
        assert answer == ["answer", "ENOSYS" if who == "launcher" else "ENOTCONN"], answer
    finally:
        launcher.kill()
        launcher.wait()
        daemon.stop()


def test_rows_from_python_directly_on_the_control_files(mnt: Path) -> None:
    """The struct rules and stray numbers from Python with ctypes (the C program has them too)."""
    import ctypes
    import struct

    libc = ctypes.CDLL(None, use_errno=True)
    libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

    def errno_of(fd: int, cmd: int, arg: object) -> int:
        return 0 if libc.ioctl(fd, cmd, arg) == 0 else ctypes.get_errno()

    dev = os.open(mnt / "control", os.O_RDWR)
    try:
        packed = struct.pack("=Ii64s", 72, -1, b"py")
        assert errno_of(dev, 0xBA00, ctypes.create_string_buffer(packed, 72)) == 95  # EOPNOTSUPP: no kexecfs run
        assert errno_of(dev, 0xBA80, ctypes.create_string_buffer(struct.pack("=Ii64s", 71, -1, b"py"), 72)) == 22
        tail = ctypes.create_string_buffer(struct.pack("=Ii64s", 80, -1, b"py") + b"\0" * 7 + b"\1", 80)
        assert errno_of(dev, 0xBA80, tail) == 7  # E2BIG
        assert errno_of(dev, 0xBA80, ctypes.c_void_p(16)) == 14  # EFAULT
        assert errno_of(dev, 0xBA42, ctypes.create_string_buffer(8)) == 22  # a session's number on the device
        assert errno_of(dev, 0x4048BA00, ctypes.create_string_buffer(72)) == 25  # size bits: ENOTTY
        assert errno_of(dev, 0xBA80, ctypes.create_string_buffer(packed, 72)) == 0
        assert (mnt / "py").is_dir()
    finally:
        os.close(dev)


def test_a_release_in_flight_is_no_spurious_ebusy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/liveupdate is exclusive, and FUSE sends RELEASE asynchronously: a process that
    opens it right after another closed it and exited must not get EBUSY. The daemon holds
    every RELEASE half a second here, so the second open always arrives first."""
    monkeypatch.setenv("KEXECFS_FAULTS", "release=delay")
    d = Daemon(tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log")
    (tmp_path / "mnt").mkdir()
    d.start()
    try:
        opener = f"import os; os.close(os.open({str(d.mountpoint / 'control')!r}, os.O_RDWR))"
        for _ in range(3):
            subprocess.run([OTHERS_PYTHON, "-c", opener], check=True, timeout=30)
        holder = os.open(d.mountpoint / "control", os.O_RDWR)
        busy = subprocess.run([OTHERS_PYTHON, "-c", opener], capture_output=True, text=True, timeout=30)
        os.close(holder)
        assert busy.returncode != 0 and "Device or resource busy" in busy.stderr, "while it is open, it is exclusive"
    finally:
        d.stop()
