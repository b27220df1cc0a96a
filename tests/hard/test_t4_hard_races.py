"""Concurrency edge cases, each raced many times through a real mount: preserve against
prepare, rmdir against preserve, open of fds/<token> against finish, and changes made
while a simulated kexec recovers (the window between the old kernel's end and the next
boot's machine). Every success a caller saw must show in what follows; nothing appears
that nobody did.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import threading
import time
from pathlib import Path

import pytest

from kexecfs import abi
from harness import (IMAGE, Daemon, MiB, Payload, Racer, digest, listing, needs_fuse, sh_state_event,
                     state, watchdog, write_errno)

pytestmark = needs_fuse


def preserve(mnt: Path, inst: str, fd: int, token: int) -> int:
    return write_errno(mnt / inst / "fd_preserve", f"{fd} {token}".encode())


@pytest.mark.parametrize("rounds", [pytest.param(2, id="fast"),
                                    pytest.param(12, id="long", marks=pytest.mark.nondeterministic)])
def test_preserve_racing_prepare(tmp_path: Path, rounds: int) -> None:
    """Preserves that succeed all come before prepare takes the machine; after it, EBUSY;
    the image holds exactly the successes."""
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    try:
        for r in range(rounds):
            inst = f"race{r}"
            os.mkdir(mnt / inst)
            memfd = os.memfd_create("race")
            os.write(memfd, os.urandom(50_000))
            ok: list[tuple[float, int]] = []
            lock = threading.Lock()
            stop = threading.Event()

            def client(first: int) -> None:
                token = first
                while not stop.is_set():
                    started = time.monotonic()  # (a success noted late must not look late)
                    err = preserve(mnt, inst, memfd, token)
                    assert err in (0, errno.EBUSY), f"preserve: errno {err}"
                    if err == 0:
                        with lock:
                            ok.append((started, token))
                    token += 4

            threads = [Racer(client, i) for i in range(4)]
            with watchdog(mnt, 60, "preserve racing prepare"):
                for t in threads:
                    t.start()
                time.sleep(random.Random(r).uniform(0.01, 0.15))
                sh_state_event(mnt, "prepare")
                prepared_at = time.monotonic()
                time.sleep(0.05)
                stop.set()
                for t in threads:
                    t.join()
            late = [t for at, t in ok if at > prepared_at]
            assert not late, f"preserves begun after prepare returned succeeded: {late}"
            assert listing(mnt, inst) == sorted(t for _, t in ok)
            for event in ("freeze", "kexec"):
                sh_state_event(mnt, event)
            assert listing(mnt, inst) == sorted(t for _, t in ok), "the image lost or invented a preserve"
            sh_state_event(mnt, "finish")  # nothing restored: all dropped
            os.rmdir(mnt / inst)
            os.close(memfd)
            assert ok, "the race never let a preserve through"
    finally:
        d.stop()
    d.check_log()


@pytest.mark.parametrize("seconds", [pytest.param(1.5, id="fast"),
                                     pytest.param(10, id="long", marks=pytest.mark.nondeterministic)])
def test_rmdir_racing_preserve(tmp_path: Path, seconds: float) -> None:
    """An instance with files cannot be removed, and a removed one takes no files: at the
    end the instance holds exactly what its client believes it holds."""
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    memfd = os.memfd_create("race")
    os.write(memfd, b"x" * 5000)
    held: set[int] = set()
    leaving: set[int] = set()  # being unpreserved: the daemon may have let go before the ledger does
    ledger = threading.Lock()
    stop = threading.Event()
    seen: dict[str, int] = {}

    def note(what: str, err: int, allowed: tuple[int, ...]) -> None:
        assert err in (0, *allowed), f"{what}: errno {errno.errorcode.get(err, err)}"
        key = f"{what}:{errno.errorcode.get(err, 'ok') if err else 'ok'}"
        seen[key] = seen.get(key, 0) + 1

    def client() -> None:
        rng = random.Random(1)
        token = 0
        handle = None
        while not stop.is_set():
            if rng.random() < 0.3 and held:
                for t in sorted(held):
                    with ledger:
                        leaving.add(t)
                    err = write_errno(mnt / "x/fd_unpreserve", str(t).encode())
                    note("unpreserve", err, (errno.ENOENT,))
                    if err:
                        raise AssertionError(f"token {t} I preserved is gone: {err}")
                    with ledger:
                        held.discard(t)
                        leaving.discard(t)
                continue
            token += 1
            if rng.random() < 0.5:
                err = preserve(mnt, "x", memfd, token)
                # ENOENT: x is not there right now; ENODEV: it went between open and write
                note("preserve", err, (errno.ENOENT, errno.ENODEV))
            else:
                # One handle kept open across rmdir/mkdir: it names the instance it was opened in.
                try:
                    if handle is None:
                        handle = os.open(mnt / "x/fd_preserve", os.O_WRONLY)
                    os.write(handle, f"{memfd} {token}".encode())
                    err = 0
                except OSError as exc:
                    err = exc.errno or -1
                    if handle is not None:
                        os.close(handle)
                        handle = None
                note("preserve-held-open", err, (errno.ENOENT, errno.ENODEV))
            if err == 0:
                with ledger:
                    held.add(token)
        if handle is not None:
            os.close(handle)

    def remover() -> None:
        while not stop.is_set():
            try:
                os.rmdir(mnt / "x")
                note("rmdir", 0, ())
                with ledger:
                    assert not held - leaving, f"rmdir removed an instance whose client holds {sorted(held)}"
            except OSError as exc:
                note("rmdir", exc.errno or -1, (errno.EBUSY, errno.ENOENT))
            try:
                os.mkdir(mnt / "x")
                note("mkdir", 0, ())
            except OSError as exc:
                note("mkdir", exc.errno or -1, (errno.EEXIST,))
            time.sleep(0.002)  # let the client in between

    try:
        os.mkdir(mnt / "x")
        threads = [Racer(client), Racer(remover)]
        with watchdog(mnt, 60, "rmdir racing preserve"):
            for t in threads:
                t.start()
            time.sleep(seconds)
            stop.set()
            for t in threads:
                t.join()
        if (mnt / "x").exists():
            assert listing(mnt, "x") == sorted(held)
        else:
            assert not held
        assert seen.get("rmdir:ok", 0) > 3 and seen.get("preserve:ok", 0) > 3, seen
        print(f"rmdir racing preserve: {seen}")
    finally:
        os.close(memfd)
        d.stop()
    d.check_log()


TOKENS = 400


@pytest.mark.parametrize("rounds", [pytest.param(2, id="fast"),
                                    pytest.param(8, id="long", marks=pytest.mark.nondeterministic)])
def test_open_racing_finish(tmp_path: Path, rounds: int) -> None:
    """After a kexec, clients open fds/<token> while the owner finishes: every open that
    succeeded restored the file (right contents, valid after finish), and finish keeps
    exactly the files that were opened."""
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    p = Payload(mnt)
    try:
        for r in range(rounds):
            inst = f"svc{r}"
            p.instance(inst)
            for token in range(TOKENS):
                p.memfd(inst, token, 8192 + token, seed=r * 1000 + token)
            p.preserve(*[f for f in p.files if f.instance == inst])
            p.snapshot()
            want = {f.token: f.sha256 for f in p.files}
            for event in ("prepare", "kexec"):
                sh_state_event(mnt, event)
            opened: dict[int, int] = {}
            lock = threading.Lock()
            stop = threading.Event()

            def opener(seed: int) -> None:
                rng = random.Random(seed)
                while not stop.is_set():
                    token = rng.randrange(TOKENS)
                    try:
                        fd = os.open(mnt / inst / "fds" / str(token), os.O_RDONLY)
                    except OSError as exc:
                        assert exc.errno in (errno.ENOENT, errno.EBUSY), exc
                        continue
                    with lock:
                        if token in opened:
                            os.close(fd)
                        else:
                            opened[token] = fd

            threads = [Racer(opener, r * 10 + i) for i in range(4)]
            with watchdog(mnt, 60, "open racing finish"):
                for t in threads:
                    t.start()
                time.sleep(random.Random(r).uniform(0.0, 0.05))
                assert write_errno(mnt / inst / "state", b"finish") == 0
                time.sleep(0.05)
                stop.set()
                for t in threads:
                    t.join()
            assert state(mnt) == "normal"
            assert listing(mnt, inst) == sorted(opened), "finish kept other files than those opened"
            for token, fd in opened.items():
                assert digest(fd, 8192 + token) == want[token]
                os.close(fd)
            for token in opened:
                (mnt / inst / "fd_unpreserve").write_text(str(token))
            os.rmdir(mnt / inst)
            p.close()
            print(f"round {r}: {len(opened)} of {TOKENS} opened before finish")
    finally:
        p.close()
        d.stop()
    d.check_log()


@pytest.mark.parametrize("change", ["mkdir", "cancel", pytest.param("preserve", marks=pytest.mark.nondeterministic),
                                    pytest.param("chown", marks=pytest.mark.nondeterministic)])
def test_changes_while_a_kexec_recovers(tmp_path: Path, change: str) -> None:
    """A simulated kexec ends the old machine, then recovers the next one from the image
    (seconds for a large one). A change that succeeds meanwhile must not be made to the
    old machine and then dropped: each must be refused (EBUSY) or hold afterwards."""
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    p = Payload(mnt)
    try:
        p.instance("vm")
        p.memfd("vm", 1, 256 * MiB)
        p.preserve()
        want = p.snapshot()
        sh_state_event(mnt, "prepare")
        small = os.memfd_create("small")
        os.write(small, b"late")
        results: list[tuple[int, int]] = []
        stop = threading.Event()

        def changer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                if change == "mkdir":
                    try:
                        os.mkdir(mnt / f"late{n}")
                        err = 0
                    except OSError as exc:
                        err = exc.errno or -1
                elif change == "preserve":
                    err = preserve(mnt, "vm", small, 100 + n)
                elif change == "cancel":
                    # Not through "state": the kexec's own write(2) holds that inode's lock.
                    if n % 2:
                        err = write_errno(mnt / "vm/state", b"cancel")  # root: drives the machine
                    else:
                        fd = os.open(mnt / "control", os.O_RDONLY)
                        try:
                            fcntl.ioctl(fd, abi.CANCEL)
                            err = 0
                        except OSError as exc:
                            err = exc.errno or -1
                        finally:
                            os.close(fd)
                else:
                    try:
                        os.chown(mnt / "vm", 1234, 1234)
                        err = 0
                    except OSError as exc:
                        err = exc.errno or -1
                results.append((n, err))
                if change == "chown" and err == 0:
                    return  # one delegation: it must hold, whenever it was accepted
                time.sleep(0.002)

        t = Racer(changer)
        kexec_errno: list[int] = []
        kexec = Racer(lambda: kexec_errno.append(write_errno(mnt / "state", b"kexec")))
        with watchdog(mnt, 120, "changes during a kexec"):
            kexec.start()
            time.sleep(0.03)  # the kexec is under way: its freeze, then the next boot's recovery
            t.start()
            kexec.join()
            stop.set()
            t.join()
        assert kexec_errno == [0], f"kexec: errno {kexec_errno}"
        assert state(mnt) == "updated", "the kexec did not come back updated"
        succeeded = [n for n, err in results if err == 0]
        if change == "mkdir":
            assert all((mnt / f"late{n}").is_dir() for n in succeeded), \
                f"mkdir succeeded during the kexec but the instance is gone: {succeeded}"
        elif change == "preserve":
            assert all(100 + n in listing(mnt, "vm") for n in succeeded), \
                f"preserve succeeded during the kexec but the file is gone: {succeeded}"
        elif change == "cancel":
            assert not succeeded, "cancel succeeded during the kexec, yet the machine came back updated"
        else:
            assert not succeeded or os.stat(mnt / "vm").st_uid == 1234, "chown succeeded, then was undone"
            # An instance file's chown delegates the instance too (chown -R): the same rule.
        assert (d.image_dir / IMAGE).exists(), "the image being recovered was moved away"
        fd = os.open(mnt / "vm/fds/1", os.O_RDONLY)
        try:
            assert digest(fd, 256 * MiB) == want[("vm", 1)][3]
        finally:
            os.close(fd)
        print(f"{change} during kexec: {len(results)} attempts, {len(succeeded)} succeeded, "
              f"errnos {sorted({errno.errorcode.get(e, e) for _, e in results if e})}")
        os.close(small)
    finally:
        p.close()
        d.stop()
    d.check_log()


def test_instances_do_not_change_once_frozen(tmp_path: Path) -> None:
    """Regression: mkdir, chown and chmod were accepted while frozen, after the image was
    written: the kexec then silently dropped them. Now EBUSY, like preserve."""
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    try:
        os.mkdir(mnt / "vm")
        for event in ("prepare", "freeze"):
            sh_state_event(mnt, event)
        for what, call in (("mkdir", lambda: os.mkdir(mnt / "late")), ("chown", lambda: os.chown(mnt / "vm", 7, 7)),
                           ("chmod", lambda: os.chmod(mnt / "vm", 0o700))):
            with pytest.raises(OSError) as info:
                call()
            assert info.value.errno == errno.EBUSY, what
        sh_state_event(mnt, "kexec")
        assert sorted(p.name for p in mnt.iterdir() if p.is_dir()) == ["vm"]
        st = os.stat(mnt / "vm")
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o755)
        os.mkdir(mnt / "late")  # updated: instances may change again
    finally:
        d.stop()
    d.check_log()


@pytest.mark.parametrize("event", ["prepare", "freeze"])
def test_a_file_truncated_while_it_is_copied_fails_the_event_not_the_daemon(tmp_path: Path, event: str) -> None:
    """A service may truncate its memfd while prepare (or freeze) copies it. The daemon
    read it through a mapping: a touch past the new end is SIGBUS, and an owner could
    kill the root daemon at will (two runs in ten here, racing). Now the event fails
    with EAGAIN and a line saying so, the daemon serves on, and the next update works. The
    daemon holds each copied chunk half a second, so the truncation lands mid-copy."""
    phase = "copy" if event == "prepare" else "refresh"
    d = Daemon.at(tmp_path)
    d.start(faults=f"image.{phase}_chunk=delay")
    mnt = d.mountpoint
    try:
        os.mkdir(mnt / "svc")
        memfd = os.memfd_create("shrinking")
        data = os.urandom(4 * MiB)
        os.write(memfd, data)
        assert preserve(mnt, "svc", memfd, 1) == 0
        if event == "freeze":
            sh_state_event(mnt, "prepare")
        result: list[int] = []
        writer = Racer(lambda: result.append(write_errno(mnt / "state", event.encode())))
        with watchdog(mnt, 60, f"{event} of a file truncated meanwhile"):
            writer.start()
            time.sleep(0.25)  # the first chunk is copied; the daemon waits before the second
            os.ftruncate(memfd, 4096)
            writer.join()
        assert result == [errno.EAGAIN], f"{event}: errno {result}; log: {d.log_text()[-1500:]}"
        assert d.proc is not None and d.proc.poll() is None, "the daemon died"
        assert "the file shrank while it was read" in d.log_text()
        assert state(mnt) == "normal", "a failed prepare or freeze goes back to normal (SPEC 5)"
        os.pwrite(memfd, data, 0)  # the service puts it back; nothing was lost meanwhile
        for e in ("prepare", "freeze", "kexec"):
            sh_state_event(mnt, e)
        restored = os.open(mnt / "svc" / "fds" / "1", os.O_RDONLY)
        try:
            assert digest(restored, len(data)) == digest(memfd, len(data))
        finally:
            os.close(restored)
    finally:
        d.stop()
    d.check_log()
