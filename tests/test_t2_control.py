"""The control files: LUO's ioctl ABI byte for byte, from C (include/kexecfs.h) and Python."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from harness import NOBODY, OTHERS_PYTHON, ROOT, sh
from kexecfs import abi
from kexecfs.client import Kexecfs

C_TEST = ROOT / "tests" / "c" / "luo_abi.c"


@pytest.fixture(scope="module")
def luo_abi_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (Debian package gcc; `make test` installs it)")
    out = tmp_path_factory.mktemp("c") / "luo_abi"
    subprocess.run([cc, "-std=c11", "-Wall", "-Wextra", "-Werror", "-o", str(out), str(C_TEST)], check=True)
    return out


def test_abi_numbers_match_the_spec() -> None:
    assert [abi.FD_PRESERVE, abi.FD_UNPRESERVE, abi.FD_RESTORE, abi.GET_STATE, abi.PREPARE, abi.FREEZE,
            abi.CANCEL, abi.FINISH] == [0x4010BA00, 0x4008BA01, 0xC010BA02, 0x8004BA03, 0xBA04, 0xBA05, 0xBA06,
                                        0xBA07]
    assert abi.LIVEUPDATE_FD.size == 16
    assert abi.LIVEUPDATE_FD.pack(-1, 0, 1 << 63) == b"\xff\xff\xff\xff\0\0\0\0" + (1 << 63).to_bytes(8, "little")


def test_c_program_exercises_every_ioctl(mnt: Path, luo_abi_binary: Path) -> None:
    r = subprocess.run([str(luo_abi_binary), str(mnt)], capture_output=True, text=True, timeout=60)
    failed = [line for line in r.stdout.splitlines() if line.startswith("not ok")]
    assert r.returncode == 0 and not failed, r.stdout + r.stderr
    assert r.stdout.count("\nok ") >= 35, r.stdout


def ioctl(fd: int, cmd: int, arg: bytes = b"") -> bytearray:
    buf = bytearray(arg)
    if buf:
        fcntl.ioctl(fd, cmd, buf)
    else:
        fcntl.ioctl(fd, cmd)
    return buf


def ioctl_errno(fd: int, cmd: int, arg: bytes = b"") -> int:
    try:
        ioctl(fd, cmd, arg)
    except OSError as exc:
        return exc.errno or 0
    return 0


def state_of(fd: int) -> int:
    return abi.STATE.unpack(ioctl(fd, abi.GET_STATE, bytes(4)))[0]


def test_python_ioctls_every_row(mnt: Path) -> None:
    (mnt / "py").mkdir()
    ctl = os.open(mnt / "py/control", os.O_RDONLY)
    top = os.open(mnt / "control", os.O_RDONLY)
    memfd = os.memfd_create("py")
    os.write(memfd, b"hello")
    r, w = os.pipe()
    fd_arg = lambda fd, token, flags=0: abi.LIVEUPDATE_FD.pack(fd, flags, token)  # noqa: E731
    try:
        assert state_of(ctl) == 1
        assert ioctl_errno(ctl, abi.FD_PRESERVE, fd_arg(memfd, 5)) == 0
        assert ioctl_errno(ctl, abi.FD_PRESERVE, fd_arg(memfd, 5)) == errno.EEXIST
        assert ioctl_errno(ctl, abi.FD_PRESERVE, fd_arg(-1, 6)) == errno.EBADF
        assert ioctl_errno(ctl, abi.FD_PRESERVE, fd_arg(r, 6)) == errno.ENOENT
        assert ioctl_errno(ctl, abi.FD_UNPRESERVE, abi.TOKEN.pack(6)) == errno.ENOENT
        assert ioctl_errno(ctl, abi.FD_RESTORE, fd_arg(-1, 5)) == errno.EBUSY
        assert ioctl_errno(ctl, abi.CANCEL) == errno.ENOENT
        assert ioctl_errno(ctl, abi.FREEZE) == errno.EINVAL
        assert ioctl_errno(ctl, abi.FINISH) == errno.EINVAL
        assert ioctl_errno(ctl, 0x8004BA2A, bytes(4)) == errno.ENOTTY
        assert ioctl_errno(ctl, termios.TCGETS, bytes(64)) == errno.ENOTTY
        assert ioctl_errno(ctl, abi.PREPARE) == 0 and state_of(ctl) == 2
        assert ioctl_errno(ctl, abi.FD_PRESERVE, fd_arg(memfd, 7)) == errno.EBUSY
        assert ioctl_errno(ctl, abi.FD_UNPRESERVE, abi.TOKEN.pack(5)) == errno.EBUSY
        assert ioctl_errno(ctl, abi.PREPARE) == errno.EINVAL
        assert ioctl_errno(top, abi.FREEZE) == 0 and state_of(top) == 3
        assert ioctl_errno(top, abi.CANCEL) == 0 and state_of(top) == 1
        assert ioctl_errno(top, abi.PREPARE) == 0
        (mnt / "state").write_text("kexec\n")
        assert state_of(ctl) == 4
        assert ioctl_errno(ctl, abi.FD_RESTORE, fd_arg(-1, 5)) == errno.EOPNOTSUPP
        assert ioctl_errno(ctl, abi.FD_RESTORE, fd_arg(-1, 99)) == errno.ENOENT
        assert ioctl_errno(top, abi.FINISH) == 0 and state_of(ctl) == 1
        assert ioctl_errno(top, abi.FD_PRESERVE, fd_arg(memfd, 1)) == 0
        assert (mnt / "default/fd_preserve").read_text() == "1 memfd 5 rw\n"
    finally:
        for fd in (ctl, top, memfd, r, w):
            os.close(fd)


def test_unprivileged_owner_uses_its_own_control_only(mnt: Path) -> None:
    sh(f"mkdir {mnt}/mine {mnt}/theirs && chown {NOBODY}:{NOBODY} {mnt}/mine", check=True)
    code = f"""
import errno, fcntl, os, struct
m = os.memfd_create("x")
ctl = os.open("{mnt}/mine/control", os.O_RDONLY)
fcntl.ioctl(ctl, 0x4010BA00, bytearray(struct.pack("=iIQ", m, 0, 3)))
try:
    os.open("{mnt}/theirs/control", os.O_RDONLY)
    print("opened theirs")
except PermissionError:
    print("theirs refused")
try:
    fcntl.ioctl(ctl, 0xBA04)
    print("prepared")
except OSError as e:  # an owner may only finish through its instance (SPEC 3), as a session fd (6b)
    print("prepare refused" if e.errno == errno.EINVAL else e)
"""
    r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                        OTHERS_PYTHON, "-c", code], capture_output=True, text=True)
    assert r.stdout.split("\n")[:2] == ["theirs refused", "prepare refused"], r.stdout + r.stderr
    assert (mnt / "mine/fd_preserve").read_text() == "3 memfd 0 rw\n"
    assert (mnt / "state").read_text() == "normal\n"


def test_client_round_trip(mnt: Path) -> None:
    """kexecfs.client end to end: preserve, (operator) prepare + kexec, restore, finish."""
    kx = Kexecfs(mnt)
    svc = kx.create_instance("client")
    memfd = os.memfd_create("client")
    os.write(memfd, b"x" * 10_000)
    os.lseek(memfd, 1234, os.SEEK_SET)
    assert svc.preserve(memfd) == 0 and svc.preserve(memfd) == 1
    svc.unpreserve(1)
    assert [p.token for p in svc.preserved()] == [0]
    kx.event("prepare")
    assert kx.event("kexec") == "updated" and svc.state() == "updated"
    fd = svc.restore(0)
    assert os.lseek(fd, 0, os.SEEK_CUR) == 1234 and os.pread(fd, 20_000, 0) == b"x" * 10_000
    os.close(fd)
    svc.finish()
    assert kx.wait_for_state("normal", timeout=5) == "normal"


def test_client_refuses_a_path_that_is_not_kexecfs(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="not a kexecfs mount"):
        Kexecfs(tmp_path)


def test_client_wait_for_state_sleeps_until_a_transition(mnt: Path) -> None:
    code = f"import sys; sys.path.insert(0, {str(ROOT)!r}); from kexecfs.client import Kexecfs; " \
           f"print(Kexecfs({str(mnt)!r}).wait_for_state(timeout=20))"
    waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            waiter.wait(0.5)
        (mnt / "state").write_text("prepare\n")
        assert waiter.communicate(timeout=10)[0].strip() == "prepared"
    finally:
        waiter.kill()
        (mnt / "state").write_text("cancel\n")


@pytest.mark.parametrize("door", ["echo finish > db/state", "FINISH ioctl on db/control"])
def test_finish_through_an_instance_means_that_instance_for_root_too(mnt: Path, door: str) -> None:
    """One event door: "finish" through an instance's file ends that instance's update
    only, whether root writes it to the state file or sends the ioctl (LUO's
    SESSION_FINISH ends one session); the machine is normal once every instance finished."""
    sh(f"mkdir {mnt}/db {mnt}/vm", check=True)
    memfds = [os.memfd_create(n) for n in ("db", "vm")]
    for name, fd in zip(("db", "vm"), memfds):
        (mnt / name / "fd_preserve").write_text(str(fd))
    sh(f"echo prepare > {mnt}/state; echo kexec > {mnt}/state", check=True)
    if door.startswith("echo"):
        sh(f"echo finish > {mnt}/db/state", check=True)
    else:
        ctl = os.open(mnt / "db" / "control", os.O_RDWR)
        assert ioctl_errno(ctl, abi.FINISH) == 0
        os.close(ctl)
    assert [(mnt / n / "state").read_text() for n in ("db", "vm")] == ["normal\n", "updated\n"]
    assert (mnt / "state").read_text() == "updated\n"
    sh(f"echo finish > {mnt}/vm/state", check=True)
    assert (mnt / "state").read_text() == "normal\n"
    for fd in memfds:
        os.close(fd)
