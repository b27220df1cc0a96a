"""Tier 2: the tree through a real mount, driven the way users drive it: bash, cat, echo, ls."""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness import NOBODY, OTHERS_PYTHON, Daemon, sh





def with_memfd(script: str, data: bytes = b"guest memory\n", fd: int = 5, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in bash with a memfd holding ``data`` open as descriptor ``fd``."""
    launcher = (f"import os,sys; m=os.memfd_create('guest-ram', os.MFD_ALLOW_SEALING); os.write(m,{data!r}); "
                f"os.dup2(m,{fd}); os.execvp('bash',['bash','-c',sys.argv[1]])")
    return sh(f"exec {OTHERS_PYTHON} -c {_q(launcher)} {_q(script)}", **kw)


def _q(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_tree_and_initial_state(mnt: Path) -> None:
    out = sh(f"ls {mnt}; cat {mnt}/state; mkdir {mnt}/svc; ls {mnt}/svc; cat {mnt}/svc/state", check=True).stdout
    assert out.split() == ["control", "state", "status", "normal",
                           "bytes.max", "control", "fd_preserve", "fd_unpreserve", "fds", "files.max", "state",
                           "normal"]
    status = (mnt / "status").read_text()
    assert "state: normal\n" in status and "instances: 1\n" in status


@pytest.mark.parametrize("name", [".hidden", "state", "x" * 64, "a b"])
def test_bad_instance_names(mnt: Path, name: str) -> None:
    r = sh(f"mkdir {_q(str(mnt / name))}")
    assert r.returncode != 0 and ("Invalid argument" in r.stderr or "File exists" in r.stderr), r.stderr


def test_mkdir_existing_is_eexist(mnt: Path) -> None:
    sh(f"mkdir {mnt}/svc", check=True)
    assert "File exists" in sh(f"mkdir {mnt}/svc").stderr


def test_state_machine_errnos_from_the_shell(mnt: Path) -> None:
    """Every row of SPEC section 2's errno table, as bash reports it."""
    def event(word: str, target: str = "state") -> str:
        r = sh(f"echo {word} > {mnt}/{target}")
        return r.stderr.strip().rsplit(": ", 1)[-1] if r.returncode else "ok"

    assert event("freeze") == "Invalid argument"
    assert event("finish") == "Invalid argument"
    assert event("cancel") == "No such file or directory"
    assert event("bogus") == "Invalid argument"
    assert event("prepare") == "ok" and (mnt / "state").read_text() == "prepared\n"
    assert event("prepare") == "Invalid argument"
    assert event("finish") == "Invalid argument"
    assert event("cancel") == "ok" and (mnt / "state").read_text() == "normal\n"
    assert event("prepare") == "ok"
    assert event("freeze") == "ok" and (mnt / "state").read_text() == "frozen\n"
    assert event("freeze") == "Invalid argument"
    assert event("prepare") == "Invalid argument"
    assert event("cancel") == "ok" and (mnt / "state").read_text() == "normal\n"
    # Whitespace around a command is ignored; two commands in one write are not one command.
    assert sh(f"printf '  prepare \\n' > {mnt}/state").returncode == 0
    assert event("cancel") == "ok"
    fd = os.open(mnt / "state", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, b"prepare\ncancel\n")
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    assert (mnt / "state").read_text() == "normal\n"


def test_global_events_are_root_only(mnt: Path) -> None:
    r = sh(f"echo prepare > {mnt}/state", uid=NOBODY)
    assert "Permission denied" in r.stderr  # the file is 0644 root: the kernel refuses the open


def test_preserve_from_the_shell(mnt: Path) -> None:
    sh(f"mkdir {mnt}/svc", check=True)
    script = f"""
        set -u
        echo 5 > {mnt}/svc/fd_preserve || exit 1
        echo "5 42" > {mnt}/svc/fd_preserve || exit 2
        echo "5 42" > {mnt}/svc/fd_preserve 2>/tmp/eexist.$$ && exit 3
        grep -q 'File exists' /tmp/eexist.$$ || exit 4
        exec 6< <(true)
        {{ echo 6 > {mnt}/svc/fd_preserve; }} 2>&1 | grep -q 'No such file or directory' || exit 5
        exec 7>&-
        {{ echo 7 > {mnt}/svc/fd_preserve; }} 2>&1 | grep -q 'Bad file descriptor' || exit 6
        {{ echo "5 nope" > {mnt}/svc/fd_preserve; }} 2>&1 | grep -q 'Invalid argument' || exit 7
        {{ echo "5 18446744073709551616" > {mnt}/svc/fd_preserve; }} 2>&1 | grep -q 'Invalid argument' || exit 8
        rm -f /tmp/eexist.$$
    """
    r = with_memfd(script, data=b"x" * 4096)
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert (mnt / "svc/fd_preserve").read_text() == "0 memfd 4096 rw\n42 memfd 4096 rw\n"
    ls = sh(f"ls -l {mnt}/svc/fds", check=True).stdout.splitlines()[1:]
    assert [(line.split()[2], line.split()[4], line.split()[-1]) for line in ls] == [
        ("root", "4096", "0"), ("root", "4096", "42")]
    assert "Device or resource busy" in sh(f"rmdir {mnt}/svc").stderr
    sh(f"echo 42 > {mnt}/svc/fd_unpreserve; echo 0 > {mnt}/svc/fd_unpreserve", check=True)
    assert "No such file or directory" in sh(f"echo 42 > {mnt}/svc/fd_unpreserve").stderr
    assert (mnt / "svc/fd_preserve").read_text() == ""
    sh(f"rmdir {mnt}/svc", check=True)
    assert not (mnt / "svc").exists()


def test_preserve_a_regular_file_keeps_offset_and_mode(mnt: Path, tmp_path: Path) -> None:
    data = tmp_path / "db"
    data.write_bytes(b"0123456789")
    sh(f"mkdir {mnt}/svc", check=True)
    sh(f"exec 5>>{data}; echo '5 9' > {mnt}/svc/fd_preserve", check=True)
    assert (mnt / "svc/fd_preserve").read_text() == "9 file 10 wa\n"


def test_ownership_and_delegation(mnt: Path) -> None:
    sh(f"mkdir {mnt}/svc", check=True)
    r = with_memfd(f"echo 5 > {mnt}/svc/fd_preserve", uid=NOBODY)
    assert "Permission denied" in r.stderr, r.stderr
    sh(f"chown -R {NOBODY}:{NOBODY} {mnt}/svc", check=True)
    assert sh(f"stat -c '%u %g' {mnt}/svc {mnt}/svc/fd_preserve {mnt}/svc/fds", check=True).stdout.split() == \
        [str(NOBODY)] * 6
    r = with_memfd(f"echo '5 7' > {mnt}/svc/fd_preserve && cat {mnt}/svc/fd_preserve", uid=NOBODY)
    assert r.returncode == 0 and r.stdout == "7 memfd 13 rw\n", r.stderr
    # Delegation is root's: the owner cannot give the instance away.
    assert "Operation not permitted" in sh(f"chown 0 {mnt}/svc", uid=NOBODY).stderr
    # Another unprivileged uid may look but not touch.
    r = with_memfd(f"echo '5 8' > {mnt}/svc/fd_preserve", uid=NOBODY - 1)
    assert "Permission denied" in r.stderr


def test_owner_checks_are_made_by_the_daemon_too(mnt: Path) -> None:
    """Mode bits are the first gate; the handler checks the caller's uid as well, so a
    file mode widened by the owner (or a bind mount) does not widen who may preserve."""
    sh(f"mkdir {mnt}/svc && chown {NOBODY} {mnt}/svc && chmod 0777 {mnt}/svc", check=True)
    r = with_memfd(f"echo 5 > {mnt}/svc/fd_preserve", uid=1000)
    assert "Permission denied" in r.stderr


def test_preserve_from_a_thread(mnt: Path) -> None:
    """FUSE reports the writing *thread*: its descriptor table is its process's."""
    sh(f"mkdir {mnt}/svc", check=True)
    code = f"""
import os, threading
fd = os.memfd_create("threaded")
os.write(fd, b"abc")
def work():
    with open("{mnt}/svc/fd_preserve", "w") as f:
        f.write(f"{{fd}} 3")
t = threading.Thread(target=work); t.start(); t.join()
print(open("{mnt}/svc/fd_preserve").read(), end="")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout == "3 memfd 3 rw\n", r.stderr


def test_preserve_from_another_pid_namespace(mnt: Path) -> None:
    sh(f"mkdir {mnt}/svc", check=True)
    r = with_memfd(f"exec unshare --pid --fork --mount-proc bash -c "
                   f"'echo \"5 11\" > {mnt}/svc/fd_preserve && cat {mnt}/svc/fd_preserve'")
    assert r.returncode == 0 and r.stdout == "11 memfd 13 rw\n", r.stderr


def test_echo_truncate_is_accepted_and_cat_honours_offsets(mnt: Path) -> None:
    # "echo x > f" opens with O_TRUNC: a no-op on pseudo files.
    sh(f"echo prepare > {mnt}/state && echo cancel > {mnt}/state", check=True)
    with open(mnt / "status", "rb") as f:
        whole = f.read()
        f.seek(7)
        assert f.read(6) == whole[7:13]
        f.seek(len(whole))
        assert f.read() == b""


def test_poll_wakes_on_a_transition(mnt: Path) -> None:
    with open(mnt / "state", "rb", buffering=0) as f:
        f.read()
        poller = select.poll()
        poller.register(f, select.POLLPRI | select.POLLIN)
        assert poller.poll(200) == [], "nothing changed yet: poll must sleep"
        threading.Timer(0.3, lambda: sh(f"echo prepare > {mnt}/state", check=True)).start()
        started = time.monotonic()
        events = poller.poll(10_000)
        assert events and events[0][1] & select.POLLPRI, events
        assert time.monotonic() - started < 9
        f.seek(0)
        assert f.read() == b"prepared\n"
        assert poller.poll(100) == [], "after reading the new state, poll sleeps again"
    sh(f"echo cancel > {mnt}/state", check=True)


def test_unexpected_error_is_eio_and_daemon_keeps_serving(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "m", tmp_path / "img", tmp_path / "log")
    d.mountpoint.mkdir()
    d.start(faults="show_status")
    d.expected.append("injected fault at show_status")
    try:
        r = sh(f"cat {d.mountpoint}/status")
        assert "Input/output error" in r.stderr
        assert (d.mountpoint / "state").read_text() == "normal\n"
        sh(f"mkdir {d.mountpoint}/still-serving", check=True)
        assert "injected fault at show_status" in d.log_text()
    finally:
        d.stop()


def test_removed_instance_files_answer_enodev(mnt: Path) -> None:
    sh(f"mkdir {mnt}/svc", check=True)
    with open(mnt / "svc/state", "rb", buffering=0) as f:
        sh(f"rmdir {mnt}/svc", check=True)
        with pytest.raises(OSError) as info:
            f.read()
        assert info.value.errno == errno.ENODEV


def inode_numbers(mnt: Path, inst: str) -> dict[str, int]:
    """The inode numbers of instance ``inst`` and of every file in it (fds/<token> too).

    From readdir as well as stat: the kernel may answer stat from its cache for a
    while, readdir always asks the daemon; both must agree."""
    listed = {e.name: e.inode() for e in os.scandir(mnt)}
    numbers = {".": listed[inst]}
    for sub, prefix in ((mnt / inst, ""), (mnt / inst / "fds", "fds/")):
        numbers.update({prefix + e.name: e.inode() for e in os.scandir(sub)})
    for name, ino in numbers.items():
        assert os.stat(mnt / inst / name).st_ino == ino, f"{inst}/{name}: stat and readdir differ"
    return numbers


def test_instance_inode_numbers_are_stable(mnt: Path) -> None:
    """An instance's inode number and its files' stay the same for the life of the mount:
    while other instances come and go, and across a simulated kexec that keeps it (a
    container's bind mount of an instance must go on naming it). A removed instance's
    number is not given to another: the kernel may still hold its inode (an open file
    answering ENODEV)."""
    sh(f"mkdir {mnt}/gone {mnt}/a", check=True)
    removed = {os.stat(mnt / "gone").st_ino}
    sh(f"rmdir {mnt}/gone", check=True)  # so "a" is not the number a fresh count starts from
    memfd = os.memfd_create("kept")
    try:
        os.write(memfd, b"kept across the kexec")
        (mnt / "a/fd_preserve").write_text(f"{memfd} 3\n")
    finally:
        os.close(memfd)
    before = inode_numbers(mnt, "a")
    assert sorted(before) == [".", "bytes.max", "control", "fd_preserve", "fd_unpreserve", "fds", "fds/3", "files.max",
                              "state"]
    assert len(set(before.values())) == len(before)

    sh(f"mkdir {mnt}/b {mnt}/c", check=True)
    removed.add(os.stat(mnt / "c").st_ino)
    sh(f"rmdir {mnt}/c && mkdir {mnt}/d", check=True)
    assert inode_numbers(mnt, "a") == before, "other instances' mkdir and rmdir renumbered 'a'"
    taken = {os.stat(mnt / n).st_ino for n in ("b", "d")} & (removed | set(before.values()))
    assert not taken, f"new instances took numbers already given: {taken}"

    sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    assert (mnt / "state").read_text() == "updated\n"
    assert inode_numbers(mnt, "a") == before, "the simulated kexec renumbered 'a'"
    assert (mnt / "a/fds/3").read_bytes() == b"kept across the kexec"


def test_a_token_is_looked_up_without_a_getattr(tmp_path: Path) -> None:
    """A stat of fds/<token> is one LOOKUP, a restore a LOOKUP and an OPEN: the attributes
    the LOOKUP answered serve the permission check and the stat of the same call (a zero
    attribute timeout made the kernel ask again with a GETATTR every time, a quarter of a
    restore's requests). Counted in libfuse's request log; a LOOKUP and its open more than
    a jiffy apart may still ask, hence the margin."""
    d = Daemon(tmp_path / "m", tmp_path / "img", tmp_path / "log", ["--debug"])
    d.mountpoint.mkdir()
    d.start()
    try:
        mnt, token = d.mountpoint, d.mountpoint / "svc/fds/7"
        sh(f"mkdir {mnt}/svc", check=True)
        r = with_memfd(f"echo '5 7' > {mnt}/svc/fd_preserve")
        assert r.returncode == 0, r.stderr
        ino, times = os.stat(token).st_ino, 20

        def requests_during(action) -> list[str]:
            before = d.log_text().count(f"nodeid: {ino},")
            for _ in range(times):
                action()
            return [line.split("opcode: ")[1].split()[0] for line in d.log_text().splitlines()
                    if f"nodeid: {ino}," in line][before:]

        stats = requests_during(lambda: os.stat(token))
        assert stats.count("GETATTR") <= times // 4, f"a GETATTR per stat: {stats}"
        sh(f"for e in prepare freeze kexec; do echo $e > {mnt}/state; done", check=True)
        assert os.stat(token).st_ino == ino
        opens = requests_during(lambda: os.close(os.open(token, os.O_RDONLY)))
        assert opens.count("OPEN") == times, opens
        assert opens.count("GETATTR") <= times // 4, f"a GETATTR per open: {opens}"
    finally:
        d.stop()
