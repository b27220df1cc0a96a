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
import os
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import Counts, Daemon, Update, Writer, needs_fuse, updating

pytestmark = needs_fuse


@pytest.fixture
def update(tmp_path: Path) -> Iterator[Update]:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with updating(Update(Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log"), tmp_path)) as u:
        yield u


# Each step of an update, and the fault points a crash in it can hit. The daemon is
# restarted (SIGTERM, itself a restart) with the point armed right before its step, so
# "@n" counts from there: the n-th pass (journal.rewrite@1 is the new daemon's own
# snapshot at start, @2 the step's).
STEPS = ("preserve", "prepare", "freeze", "kexec", "restore", "finish")
FAULT_POINTS = [
    ("preserve", "journal.append"), ("preserve", "journal.durable"),
    ("prepare", "journal.append"), ("prepare", "prepare.file@3"), ("prepare", "image.copy_window@2"),
    ("prepare", "journal.rewrite@2"),
    ("freeze", "freeze.file@2"), ("freeze", "image.refresh_window@1"), ("freeze", "commit.before_index"),
    ("freeze", "commit.after_index"), ("freeze", "commit.before_fsync"), ("freeze", "commit.before_rename"),
    ("freeze", "commit.after_rename"), ("freeze", "journal.rewrite@2"),
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


def armed(point: str) -> str:
    """``name@n`` as KEXECFS_FAULTS arms it to kill the daemon at its n-th pass (1 if no n)."""
    name, _, n = point.partition("@")
    return f"{name}=kill@{n or 1}"


def restarted_with(u: Update, faults: str) -> None:
    """Stop the daemon as systemctl restart does (SIGTERM) and start the next one."""
    d = u.daemon
    d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
    assert d.proc.wait(30) == 0  # type: ignore[union-attr]
    d.start(faults)
    u.counts.restarts += 1
    u.check_after_restart()


def run_with_kill(u: Update, kill_in: str, point: str) -> str:
    """The update's steps, with ``point`` armed for step ``kill_in``, where the daemon must die."""
    d = u.daemon
    d.start()
    u.set_up()
    for name in STEPS:
        if name == kill_in:
            restarted_with(u, armed(point))
        writer = step(u, name)
        assert writer is not None
        writer.start()
        if name != kill_in:
            writer.join(60)
            assert not writer.is_alive(), f"{name} was not answered within 60 s"
            assert d.alive(), f"the daemon died in {name}, not in {kill_in} ({point}):\n{d.log_text()[-2000:]}"
            assert writer.errno == 0, f"{name}: {os.strerror(writer.errno)}"
            after(u, name)
            continue
        # Armed for this step: the daemon dies at the point, before or after it answered
        # (whichever comes first, the writer finishing or the death, is no sign of the other).
        d.wait_killed(60)
        d.start()
        u.counts.restarts += 1
        writer.join(60)
        assert not writer.is_alive(), f"{name} was never answered after the restart"
        assert writer.errno == 0, f"{name} failed after the restart: {os.strerror(writer.errno)}"
        u.check_after_restart()
        after(u, name)
        return name
    raise AssertionError(f"the daemon never died at {point}")


@pytest.mark.parametrize("kill_in,point", FAULT_POINTS, ids=[f"{s}-{p}" for s, p in FAULT_POINTS])
def test_kill_at_a_fault_point_loses_nothing(update: Update, kill_in: str, point: str) -> None:
    run_with_kill(update, kill_in, point)
    update.finish_update()
    _add(update.counts)


# A cancel, from prepared (nothing to retire) and from frozen (the image is retired).
CANCEL_POINTS = [("prepared", "journal.append"), ("prepared", "journal.rewrite@2"), ("frozen", "journal.append"),
                 ("frozen", "retire.before_rename"), ("frozen", "journal.rewrite@2")]


@pytest.mark.parametrize("cancel_in,point", CANCEL_POINTS, ids=[f"{s}-{p}" for s, p in CANCEL_POINTS])
def test_kill_in_a_cancel_loses_nothing(update: Update, cancel_in: str, point: str) -> None:
    """The cancel the daemon died in is done once, by the next daemon or before it died;
    the registrations stay, and a full update after it restores them all."""
    d = update.daemon
    d.start()
    update.set_up()
    for event in ("prepare", "freeze")[:1 if cancel_in == "prepared" else 2]:
        (d.mountpoint / "state").write_text(event)
    restarted_with(update, armed(point))
    writer = Writer(d.mountpoint / "state", "cancel")
    writer.start()
    d.wait_killed(60)
    d.start()
    update.counts.restarts += 1
    writer.join(60)
    assert not writer.is_alive(), "the cancel was never answered after the restart"
    assert writer.errno == 0, f"the cancel failed after the restart: {os.strerror(writer.errno)}"
    assert (d.mountpoint / "state").read_text() == "normal\n"
    assert not (d.image_dir / "handover.kximg").exists(), "a cancelled image is left to be recovered"
    update.check_after_restart()
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
    d.start()
    u.set_up()
    for name in STEPS:
        writer = step(u, name)
        assert writer is not None
        writer.start()
        if kills and rng.random() < 0.7:
            writer.join(rng.uniform(0, 0.05))
            d.kill()
            kills -= 1
            d.start()
            u.counts.restarts += 1
        writer.join(60)
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
