"""Daemon restarts nobody notices (SPEC section 10): the FUSE connection outlives the
daemon in the keeper, and a restarted daemon serves that very connection.

A container (``unshare --mount --pid``) holds a bind mount made before the daemon dies;
after the restart it must serve again, and a request made or read while no daemon ran
must be answered by the next one, never with ENOTCONN.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (ROOT, WAIT_THEN_CREATE, Daemon, abort_connection, digest, fuse_connection, is_mounted,
                     make_memfd, needs_fuse, serving, until, waiting_requests)
from kexecfs.client import Kexecfs

pytestmark = needs_fuse


HELD = range(3, 11)  # descriptors the container's shell holds open on request ("hold", "drop")


class Container:
    """A process in its own mount and pid namespaces that bind-mounted the kexecfs mount
    (and dropped the original from its namespace), then reads files there on request."""

    def __init__(self, mnt: Path, bind: Path) -> None:
        bind.mkdir()
        held = " ".join(f"{fd}<{bind}/{'state' if fd % 2 else 'status'}" for fd in HELD)
        closed = " ".join(f"{fd}<&-" for fd in HELD)
        script = (f"mount --bind {mnt} {bind} && umount -l {mnt} && echo ready && "
                  f"while read -r f; do case $f in hold) exec {held};; drop) exec {closed};; "
                  f"*) cat {bind}/$f 2>&1 || echo \"failed $?\";; esac; echo .; done")
        self.proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "--kill-child", "--propagation", "private",
                                      "bash", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.read_line() == "ready"

    def read_line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().rstrip("\n")

    def ask(self, name: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()

    def answer(self) -> str:
        lines = []
        while (line := self.read_line()) != ".":
            lines.append(line)
        return "\n".join(lines)

    def cat(self, name: str) -> str:
        self.ask(name)
        return self.answer()

    def close(self) -> None:
        """The container ends, and its bind mount (which kept the mount's superblock) with it."""
        if self.proc.poll() is None:
            self.proc.kill()  # --kill-child: its pid 1 goes too
            self.proc.wait()


@pytest.fixture
def container(daemon: Daemon, tmp_path: Path) -> Iterator[Container]:
    c = Container(daemon.mountpoint, tmp_path / "bind")
    try:
        yield c
    finally:
        c.close()


def keeper_pids(image_dir: Path) -> list[int]:
    """The keepers holding the connection of ``image_dir``'s mount."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"kexecfs.fs.keeper" in cmdline and str(image_dir / "keeper.sock").encode() in cmdline:
            pids.append(int(proc.name))
    return pids


def test_a_bind_mount_serves_again_after_kill_9(daemon: Daemon, container: Container) -> None:
    assert container.cat("state") == "normal"
    connection = fuse_connection(daemon.mountpoint)
    assert connection is not None
    daemon.kill()
    container.ask("state")  # waits while no daemon runs: no ENOTCONN
    until(lambda: waiting_requests(connection) > 0, "the container's read reached the connection")
    daemon.start()
    assert container.answer() == "normal"
    assert container.cat("status").startswith("state: normal")
    assert "adopted the FUSE connection" in daemon.log_text()
    assert "answers FUSE_INIT differently" not in daemon.log_text(), "the replayed INIT got another reply"


def test_files_the_old_daemon_opened_do_not_take_the_new_daemons_handles(daemon: Daemon,
                                                                        container: Container) -> None:
    """The kernel keeps sending an open file's handle number to the daemon that serves it
    next; the restarted daemon must not give a number of those to an open of its own, or
    the old file's release would close the new one."""
    container.cat("hold")
    daemon.kill()
    daemon.start()
    mine = [open(daemon.mountpoint / name) for name in ("state", "status") * 4]
    try:
        container.cat("drop")  # the old files' releases reach the new daemon
        for f in mine:
            assert f.read().split(maxsplit=1)[0] in ("normal", "state:"), f
    finally:
        for f in mine:
            f.close()


def test_the_shutdown_hook_of_a_restart_does_not_wait_for_the_next_daemon(daemon: Daemon) -> None:
    """kexecfs-freeze.service Requires= kexecfs.service, so a restart of the daemon stops the
    freeze unit and runs its hook while no daemon serves the mount; systemd starts the next
    daemon only after that stop. A hook that read the mount before looking for a
    kexec.target job waited for a daemon that waited for it (found under a real systemd)."""
    daemon.kill()
    hook = subprocess.run([sys.executable, "-m", "kexecfs", "--mount", str(daemon.mountpoint), "shutdown-hook"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert hook.returncode == 0 and "not a kexec" in hook.stdout, hook.stdout + hook.stderr
    daemon.start()
    assert (daemon.mountpoint / "state").read_text() == "normal\n"


def test_a_kexec_of_more_files_than_half_the_descriptor_limit_keeps_every_one(tmp_path: Path) -> None:
    """After a simulated kexec the keeper gets the next boot's memfds. If it still held the
    old kernel's files, it would need twice the descriptors: 250 files under a limit of 400
    overflowed it, and the files it could not receive were lost at the next restart (the
    bench found this with 10,000 files under 20,000)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    count = 250
    d = Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log", nofile=400)
    with serving(d):
        (mnt / "svc").mkdir()
        fds = [make_memfd(f"f{t}", 4096, seed=t) for t in range(count)]
        expected = [digest(fd) for fd in fds]
        try:
            with open(mnt / "svc" / "fd_preserve", "w") as preserve:
                for t, fd in enumerate(fds):
                    preserve.write(f"{fd} {t}\n")
                    preserve.flush()
        finally:
            for fd in fds:
                os.close(fd)
        for event in ("prepare", "freeze", "kexec"):
            (mnt / "state").write_text(event + "\n")
        d.kill()
        d.start()
        assert "lost" not in d.log_text() and "not received" not in d.log_text(), d.log_text()[-2000:]
        assert len((mnt / "svc" / "fd_preserve").read_text().splitlines()) == count
        for t in range(count):
            assert digest(mnt / "svc" / "fds" / str(t)) == expected[t], f"token {t}"


def test_the_daemon_that_mounted_is_not_the_one_that_unmounts(daemon: Daemon, container: Container) -> None:
    """Three restarts in a row, then an unmount by the third daemon ends the keeper too."""
    for _ in range(3):
        daemon.kill()
        daemon.start()
        assert container.cat("state") == "normal"
    assert len(keeper_pids(daemon.image_dir)) == 1
    container.close()
    daemon.stop()
    until(lambda: not keeper_pids(daemon.image_dir), "the keeper exits after the unmount")
    assert not (daemon.image_dir / "keeper.sock").exists()


def context_switches(pid: int) -> int:
    fields = dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


def test_requests_to_the_mount_do_not_wake_the_keeper(daemon: Daemon) -> None:
    """A keeper looks at the connection for its end once a second. Waiting on /dev/fuse
    instead, it was woken by every request the kernel queued (whatever events it asked
    for): tens of microseconds of CPU each, times two keepers a shard, on the daemon's
    cores (the scale bench's restores spent half as much CPU again in keepers)."""
    [pid] = keeper_pids(daemon.image_dir)
    before = context_switches(pid)
    for _ in range(500):
        (daemon.mountpoint / "state").read_text()  # open, read, flush, release: all reach the daemon
    assert context_switches(pid) - before < 20


def test_sigterm_stops_the_daemon_and_keeps_the_mount(daemon: Daemon, container: Container) -> None:
    """systemctl restart and an upgrade stop the daemon with SIGTERM: the mount stays."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(15) == 0
    assert is_mounted(daemon.mountpoint)
    daemon.start()
    assert container.cat("state") == "normal"


def test_a_request_the_dead_daemon_had_read_is_answered_by_the_next(tmp_path: Path) -> None:
    """The daemon dies while serving a read (it had taken the request from the kernel): the
    kernel resends it to the restarted daemon (FUSE_NOTIFY_RESEND), and the caller gets
    an answer instead of waiting forever."""
    d = Daemon(tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log")
    d.mountpoint.mkdir()
    d.start("show_status=kill")
    connection = fuse_connection(d.mountpoint)
    assert connection is not None
    outcome: list[str] = []
    reader = threading.Thread(target=lambda: outcome.append(_read_or_errno(d.mountpoint / "status")), daemon=True)
    try:
        reader.start()
        d.wait_killed(60)  # in the read
        d.start()
        reader.join(60)
        assert not reader.is_alive(), "the read the dead daemon had taken was never answered"
        assert outcome and "ENOTCONN" not in outcome[0], outcome
    finally:
        if reader.is_alive():
            abort_connection(connection)  # else the stuck reader keeps the mount alive for ever
        d.stop()


def _read_or_errno(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        return f"errno {exc.errno}: {os.strerror(exc.errno or 0)}"


def test_a_restored_file_open_across_a_restart_opens_again(daemon: Daemon) -> None:
    """FUSE passthrough: the kernel serves an open fds/<token> itself, from a backing
    registration of the connection, and refuses (EIO) an open of the same inode with
    another one. The restarted daemon reuses the registrations of the previous one."""
    mnt = daemon.mountpoint
    (mnt / "svc").mkdir()
    memfd = os.memfd_create("ram")
    os.write(memfd, b"before the restart".ljust(8192, b"."))
    (mnt / "svc" / "fd_preserve").write_text(f"{memfd} 7")
    for event in ("prepare", "kexec"):
        (mnt / "state").write_text(event)
    if "restore: passthrough" not in (mnt / "status").read_text():
        pytest.skip("FUSE passthrough is not available on this kernel (Linux >= 6.9 and CAP_SYS_ADMIN)")
    old = os.open(mnt / "svc" / "fds" / "7", os.O_RDWR)
    try:
        daemon.kill()
        daemon.start()
        new = os.open(mnt / "svc" / "fds" / "7", os.O_RDWR)  # EIO with another registration
        try:
            os.pwrite(new, b"after", 0)
            assert os.pread(old, 18, 0) == b"aftere the restart", "the two opens are not the same file"
        finally:
            os.close(new)
    finally:
        os.close(old)
        os.close(memfd)


def test_a_restored_file_the_daemon_serves_answers_across_a_restart(tmp_path: Path) -> None:
    """Without passthrough the daemon serves every read and write of fds/<token> itself:
    the restarted one takes over the handles opened before it (their access checked
    again from the open flags), reading and writing the same memfd."""
    d = Daemon(tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log", ["--no-passthrough"])
    d.mountpoint.mkdir()
    with serving(d):
        mnt = d.mountpoint
        (mnt / "svc").mkdir()
        memfd = os.memfd_create("ram")
        os.write(memfd, b"before the restart".ljust(3 * 4096 + 100, b"."))
        (mnt / "svc" / "fd_preserve").write_text(f"{memfd} 7")
        os.close(memfd)
        for event in ("prepare", "kexec"):
            (mnt / "state").write_text(event)
        assert "restore: proxy" in (mnt / "status").read_text()
        rw = os.open(mnt / "svc" / "fds" / "7", os.O_RDWR)
        ro = os.open(mnt / "svc" / "fds" / "7", os.O_RDONLY)
        try:
            assert os.pread(rw, 6, 0) == b"before"
            d.kill()
            d.start()
            assert os.pwrite(rw, b"after", 3 * 4096) == 5
            assert os.pread(ro, 18, 0) == b"before the restart"
            assert os.pread(ro, 8, 3 * 4096) == b"after..."
            assert (mnt / "svc" / "fds" / "7").read_bytes()[3 * 4096:3 * 4096 + 5] == b"after"
            assert "took over open file" in d.log_text()
        finally:
            os.close(rw)
            os.close(ro)


def test_a_program_under_kexecfs_run_does_not_notice_a_restart(daemon: Daemon, tmp_path: Path) -> None:
    """Its /dev/liveupdate (the top-level control) and the launcher's forwarding were
    opened before the daemon died; the CREATE_SESSION it makes after is served."""
    go = tmp_path / "go"
    program = tmp_path / "wait_then_create.py"
    program.write_text(WAIT_THEN_CREATE)
    launcher = subprocess.Popen([sys.executable, "-m", "kexecfs", "--mount", str(daemon.mountpoint), "run", "--",
                                 sys.executable, str(program), str(go)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert launcher.stdout is not None
    try:
        assert launcher.stdout.readline().strip() == "ready"
        daemon.kill()
        daemon.start()
        go.touch()
        assert launcher.stdout.readline().split() == ["answer", "ok"]
        assert (daemon.mountpoint / "late").is_dir()
    finally:
        launcher.kill()
        launcher.wait()
        subprocess.run(["pkill", "-KILL", "-f", str(program)], capture_output=True)  # it holds the mount


def test_a_session_fd_held_across_a_restart_keeps_its_session(daemon: Daemon) -> None:
    """A LUO session fd (kexecfs.client, as a program under kexecfs run holds one) opened
    before the daemon died: it still preserves into its session, and its close still ends
    the session, as the kernel's does (the file handle says it is a session's)."""
    kx = Kexecfs(daemon.mountpoint)
    first, second = os.memfd_create("before"), os.memfd_create("after")
    try:
        session = kx.create_session("held")
        session.preserve(first, 1)
        daemon.kill()
        daemon.start()
        assert session.name() == b"held"
        session.preserve(second, 2)
        assert [line.split()[0] for line in (daemon.mountpoint / "held/fd_preserve").read_text().splitlines()] \
            == ["1", "2"]
        session.close()
        until(lambda: not (daemon.mountpoint / "held").exists(), "closing the session fd ends the session")
    finally:
        os.close(first)
        os.close(second)


def test_a_service_asleep_in_poll_across_a_restart_wakes_for_the_next_transition(daemon: Daemon) -> None:
    """The restarted daemon wakes the previous one's pollers once (they poll again on it),
    so a service waiting for the state to change does not sleep through the change."""
    import select

    mnt = daemon.mountpoint
    (mnt / "svc").mkdir()
    seen: list[str] = []

    def wait_for_prepared() -> None:
        fd = os.open(mnt / "svc" / "state", os.O_RDONLY)
        try:
            poller = select.poll()
            poller.register(fd, select.POLLPRI | select.POLLERR)
            while (word := os.pread(fd, 64, 0).decode().strip()) != "prepared":
                seen.append(word)
                poller.poll()
            seen.append(word)
        finally:
            os.close(fd)

    sleeper = threading.Thread(target=wait_for_prepared, daemon=True)
    sleeper.start()
    # Asleep in poll() on the first daemon: in the syscall (poll or ppoll on x86-64), its
    # FUSE_POLL answered (nothing waits on the connection).
    connection = fuse_connection(mnt)
    assert connection is not None
    until(lambda: seen and sleeper.native_id is not None and _in_syscall(sleeper.native_id, (7, 271))
          and waiting_requests(connection) == 0, "the sleeper is asleep in poll()")
    daemon.kill()
    daemon.start()
    (mnt / "state").write_text("prepare")
    sleeper.join(60)
    assert not sleeper.is_alive(), f"the poller slept through the transition (saw {seen})"
    assert seen[-1] == "prepared"


def test_dev_liveupdate_held_before_a_restart_stays_exclusive(daemon: Daemon) -> None:
    control = daemon.mountpoint / "control"
    holder = os.open(control, os.O_RDWR)
    try:
        daemon.kill()
        daemon.start()
        with pytest.raises(OSError) as busy:
            os.close(os.open(control, os.O_RDWR))
        assert busy.value.errno == errno.EBUSY
    finally:
        os.close(holder)
    until(lambda: _opens(control), "the device is free once its holder closed it (RELEASE is asynchronous)")


def test_a_second_daemon_for_a_served_mount_refuses_to_start(daemon: Daemon, tmp_path: Path) -> None:
    """Only one daemon serves a connection: the keeper says who does."""
    r = subprocess.run([sys.executable, "-m", "kexecfs", "mount", str(daemon.mountpoint), "--image-dir",
                        str(daemon.image_dir), "--foreground"], capture_output=True, text=True, timeout=60,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode != 0
    assert f"another kexecfs daemon (pid {daemon.proc.pid}) serves" in r.stderr, r.stderr  # type: ignore[union-attr]
    assert "Traceback" not in r.stderr, r.stderr
    assert (daemon.mountpoint / "state").read_text() == "normal\n"


def test_a_killed_keeper_is_replaced_by_the_daemon(daemon: Daemon, container: Container) -> None:
    """The daemon still holds everything the keeper did: a new keeper gets it all, so the
    next crash of the daemon loses nothing either."""
    mnt = daemon.mountpoint
    (mnt / "svc").mkdir()
    memfd = os.memfd_create("ram")
    os.write(memfd, b"kept twice")
    (mnt / "svc" / "fd_preserve").write_text(f"{memfd} 3")
    os.close(memfd)
    [first] = keeper_pids(daemon.image_dir)
    os.kill(first, signal.SIGKILL)
    until(lambda: "holds the connection and every preserved descriptor" in daemon.log_text(),
          "the daemon gives everything to a new keeper")
    assert [p for p in keeper_pids(daemon.image_dir) if p != first]
    daemon.kill()
    daemon.start()
    assert container.cat("state") == "normal"
    assert (mnt / "svc" / "fd_preserve").read_text().split()[:2] == ["3", "memfd"]
    for event in ("prepare", "kexec"):
        (mnt / "state").write_text(event)
    assert (mnt / "svc" / "fds" / "3").read_bytes() == b"kept twice"


def _in_syscall(tid: int, numbers: tuple[int, ...]) -> bool:
    """Whether thread ``tid`` of this process sleeps in one of the system calls ``numbers``."""
    try:
        return int(Path(f"/proc/self/task/{tid}/syscall").read_text().split()[0]) in numbers
    except (OSError, IndexError, ValueError):
        return False


def _opens(path: Path) -> bool:
    try:
        os.close(os.open(path, os.O_RDWR))
        return True
    except OSError:
        return False
