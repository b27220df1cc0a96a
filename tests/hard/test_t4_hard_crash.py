"""Crash injection: SIGKILL the daemon at every step of prepare, freeze, commit, a
simulated kexec, recovery, finish and cancel (deterministic fault points armed with
``KEXECFS_FAULTS=point=kill@n``), and at random moments of a large freeze. After each
crash a new daemon must come back with either the old state or the complete new image,
and every preserved byte is checked through ``fds/<token>``.

"Old state" is normal with no instances and no image: before freeze completes, the
registrations live only in the daemon's memory (it held the dups), so a crash loses
them by design; the services still hold their own descriptors, which the tests check
are untouched.
"""

from __future__ import annotations

import fcntl
import os
import random
import threading
import time
from pathlib import Path

import pytest

from harness import (IMAGE, NOBODY, Daemon, MiB, Payload, assert_no_temp, assert_old_state, fill,
                     instances, needs_fuse, sh_state_event, state, status, verify_restored, write_errno)

pytestmark = needs_fuse

SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL

# What the standard payload makes the image writer do (WINDOW is 16 MiB):
#   prepare copies vm/1 (40 MiB: 3 windows), vm/2 (3 islands: 3 windows), vm/3 (1), db/7 (1);
#   freeze refreshes vm/1 (3), vm/2 (3), db/7 (1) and copies vm/3 anew (it grew: 1 window).
FILES = 5
PREPARE_WINDOWS = 8
REFRESH_WINDOWS = 7


def standard_payload(d: Daemon, tmp_path: Path) -> Payload:
    p = Payload(d.mountpoint)
    p.instance("vm")
    p.instance("db", NOBODY)
    p.memfd("vm", 1, 40 * MiB, pos=12345)
    p.memfd("vm", 2, 48 * MiB, islands=3, seals=SEALS)
    p.memfd("vm", 3, 5000, pos=17)
    disk = tmp_path / "disk"
    disk.mkdir(exist_ok=True)
    p.regular("vm", 4, disk / "journal", 100_000, pos=54321)
    p.memfd("db", 7, MiB, pos=99)
    p.preserve()
    p.snapshot()
    return p


def change_after_prepare(p: Payload) -> None:
    """What services do between prepare and freeze: write (freeze rewrites those chunks)
    and grow a file (freeze copies it anew)."""
    by_token = {f.token: f for f in p.files}
    fill(by_token[1].fd, 17 * MiB, 3 * MiB, random.Random(99))
    fill(by_token[3].fd, 5000, 4000, random.Random(98))
    os.pwrite(by_token[7].fd, b"written during prepared", 1000)


def own_files_intact(p: Payload, expected: dict) -> None:  # type: ignore[type-arg]
    for f in p.files:
        f.snapshot()
    assert p.expected() == expected, "the services' own descriptors changed"


FREEZE_POINTS = (
    [(f"prepare.file@{n}", "old") for n in range(1, FILES + 1)]
    + [(f"image.copy_window@{n}", "old") for n in range(1, PREPARE_WINDOWS + 1)]
    + [(f"freeze.file@{n}", "old") for n in range(1, FILES + 1)]
    + [(f"image.refresh_window@{n}", "old") for n in range(1, REFRESH_WINDOWS + 1)]
    + [(f"image.copy_window@{PREPARE_WINDOWS + 1}", "old")]
    + [(f"commit.{step}", "old") for step in ("before_index", "after_index", "before_fsync", "before_rename")]
    + [("commit.after_rename", "new")]
)
def crash_run(tmp_path: Path, point: str, outcome: str, last_event: str) -> None:
    """Preserve, prepare, change, then ``last_event`` (freeze or kexec) with ``point`` armed."""
    name, _, nth = point.partition("@")
    d = Daemon.at(tmp_path)
    d.start(f"{name}=kill@{nth or 1}")
    p = standard_payload(d, tmp_path)
    try:
        before = p.expected()
        if write_errno(d.mountpoint / "state", b"prepare") == 0:
            change_after_prepare(p)
            before = p.snapshot()
            assert write_errno(d.mountpoint / "state", last_event.encode()) != 0, "the daemon died"
        d.wait_killed()
        d.start()
        if outcome == "old":
            assert_old_state(d)
            own_files_intact(p, before)
        else:
            assert state(d.mountpoint) == "updated"
            verify_restored(d.mountpoint, before, owners={"vm": 0, "db": NOBODY})
            assert_no_temp(d.image_dir)
        # Whatever came back, the machine works: a full cycle from here.
        if outcome == "new":
            sh_state_event(d.mountpoint, "finish")
        p.close()
        q = Payload(d.mountpoint)
        q.instance("after")
        q.memfd("after", 1, 3 * MiB)
        q.preserve()
        want = q.snapshot()
        for event in ("prepare", "freeze", "kexec"):
            sh_state_event(d.mountpoint, event)
        verify_restored(d.mountpoint, want, subset=True)
        q.close()
    finally:
        p.close()
        d.stop()
    d.check_log()


@pytest.mark.parametrize("point,outcome", FREEZE_POINTS, ids=[p for p, _ in FREEZE_POINTS])
def test_kill_during_prepare_and_freeze(tmp_path: Path, point: str, outcome: str) -> None:
    crash_run(tmp_path, point, outcome, "freeze")


KEXEC_POINTS = [("freeze.file@3", "old"), ("image.refresh_window@4", "old"), ("commit.before_rename", "old"),
                ("commit.after_rename", "new")] + [(f"recover.file@{n}", "new") for n in range(1, FILES + 1)]


@pytest.mark.parametrize("point,outcome", KEXEC_POINTS, ids=[p for p, _ in KEXEC_POINTS])
def test_kill_during_simulated_kexec(tmp_path: Path, point: str, outcome: str) -> None:
    """``kexec`` from prepared: the freeze inside it, then the recovery of the next boot."""
    crash_run(tmp_path, point, outcome, "kexec")


def frozen_image(tmp_path: Path, faults: str = "") -> tuple[Daemon, Payload, dict]:  # type: ignore[type-arg]
    d = Daemon.at(tmp_path)
    d.start(faults)
    p = standard_payload(d, tmp_path)
    sh_state_event(d.mountpoint, "prepare")
    change_after_prepare(p)
    expected = p.snapshot()
    sh_state_event(d.mountpoint, "freeze")
    return d, p, expected


def test_kill_at_every_file_of_a_recovery(tmp_path: Path) -> None:
    """A daemon that dies while recovering, again and again, still recovers it all."""
    d, p, expected = frozen_image(tmp_path)
    try:
        d.kill()
        d.stop()
        for n in range(1, FILES + 1):
            d.start_expecting_death(f"recover.file=kill@{n}")
            assert (d.image_dir / IMAGE).exists(), "a crash during recovery keeps the image"
        d.start()
        assert state(d.mountpoint) == "updated"
        verify_restored(d.mountpoint, expected, owners={"vm": 0, "db": NOBODY})
    finally:
        p.close()
        d.stop()
    d.check_log()


@pytest.mark.parametrize("event", ["finish", "cancel"])
def test_kill_while_retiring_the_image(tmp_path: Path, event: str) -> None:
    """finish (after a kexec) and cancel (when frozen) retire the image with a rename:
    a crash before it recovers the complete image again; nothing is half-retired."""
    d, p, expected = frozen_image(tmp_path, "retire.before_rename=kill")
    try:
        if event == "finish":
            sh_state_event(d.mountpoint, "kexec")
            verify_restored(d.mountpoint, expected)
        assert write_errno(d.mountpoint / "state", event.encode()) != 0
        d.wait_killed()
        d.start()
        assert state(d.mountpoint) == "updated"
        verify_restored(d.mountpoint, expected, owners={"vm": 0, "db": NOBODY})
        sh_state_event(d.mountpoint, "finish")
        assert state(d.mountpoint) == "normal" and not (d.image_dir / IMAGE).exists()
        assert len(list((d.image_dir / "retired").glob("*-finished.kximg"))) == 1
    finally:
        p.close()
        d.stop()
    d.check_log()


# ---------------------------------------------------------------------------- raised faults

@pytest.mark.parametrize("point", ["prepare.file@3", "commit.after_index", "commit.after_rename", "image.copy_window@2",
                                   "freeze.file@2", "image.refresh_window@2", "commit.before_rename",
                                   "commit.before_fsync"])
def test_unexpected_error_in_prepare_or_freeze(tmp_path: Path, point: str) -> None:
    """An unexpected exception (a bug) in prepare or freeze: EIO to the writer, normal,
    registrations kept, no temporary file, and no image left current that a restart
    would take for a completed freeze."""
    name, _, nth = point.partition("@")
    d = Daemon.at(tmp_path)
    d.start(f"{name}=raise@{nth or 1}")
    d.expected.append(f"injected fault at {name}")
    p = standard_payload(d, tmp_path)
    try:
        err = write_errno(d.mountpoint / "state", b"prepare")
        if err == 0:
            err = write_errno(d.mountpoint / "state", b"freeze")
        assert err == 5, f"EIO expected, got errno {err}"
        assert state(d.mountpoint) == "normal"
        assert instances(d.mountpoint) == ["db", "vm"]
        assert not (d.image_dir / IMAGE).exists(), "a failed freeze must not leave a current image"
        assert_no_temp(d.image_dir)
        assert f"injected fault at {name}" in status(d.mountpoint)["last_error"]
        d.kill()
        d.stop()
        d.start()
        assert_old_state(d)
    finally:
        p.close()
        d.stop()
    d.check_log()


def test_unexpected_error_in_recovery_keeps_the_image_aside(tmp_path: Path) -> None:
    """A bug hit while recovering must not keep the daemon from starting (and every restart
    with it): it starts normal, with the image kept aside for a fixed kexecfs."""
    d, p, _expected = frozen_image(tmp_path)
    try:
        d.kill()
        d.stop()
        d.start("recover.file=raise@2")
        d.expected.append("injected fault at recover.file")
        assert state(d.mountpoint) == "normal" and instances(d.mountpoint) == []
        assert "injected fault at recover.file" in status(d.mountpoint)["last_error"]
        assert not (d.image_dir / IMAGE).exists()
        assert len(list(d.image_dir.glob(f"{IMAGE}.damaged-*"))) == 1
    finally:
        p.close()
        d.stop()
    d.check_log()


# ---------------------------------------------------------------------------- random timing

def random_kill_run(tmp_path: Path, rng: random.Random, size: int, phase: str) -> str:
    """Kill the daemon at a random moment of ``phase`` (freeze or kexec) of ``size`` bytes."""
    d = Daemon.at(tmp_path)
    d.start()
    p = Payload(d.mountpoint)
    try:
        p.instance("big")
        p.memfd("big", 1, size, pos=4096, seed=rng.getrandbits(32))
        p.memfd("big", 2, 64 * MiB, islands=64, seed=rng.getrandbits(32))
        p.preserve()
        p.snapshot()
        sh_state_event(d.mountpoint, "prepare")
        fill(p.files[0].fd, 0, size, rng)  # every chunk changes: freeze rewrites them all
        expected = p.snapshot()
        started = time.monotonic()
        writer = threading.Thread(target=write_errno, args=(d.mountpoint / "state", phase.encode()))
        delay = rng.uniform(0, 1.2)
        writer.start()
        time.sleep(delay)
        d.kill()
        writer.join(30)
        assert not writer.is_alive(), f"the writer of {phase} hung after the daemon died"
        elapsed = time.monotonic() - started
        d.stop()
        d.start()
        got = state(d.mountpoint)
        if got == "normal":
            assert_old_state(d)
            own_files_intact(p, expected)
        else:
            assert got == "updated"
            verify_restored(d.mountpoint, expected)
        assert_no_temp(d.image_dir)
        print(f"{phase}: killed after {delay:.3f} s ({elapsed:.3f} s): {got}")
        return got
    finally:
        p.close()
        d.stop()
        d.check_log()


@pytest.mark.nondeterministic
def test_random_kills_during_a_large_freeze(tmp_path: Path) -> None:
    rng = random.Random(20250701)
    outcomes = []
    for i in range(10):
        outcomes.append(random_kill_run(tmp_path / str(i), rng, 256 * MiB, rng.choice(["freeze", "kexec"])))
    print("outcomes:", outcomes)


def test_random_kill_during_freeze_fast(tmp_path: Path) -> None:
    random_kill_run(tmp_path, random.Random(7), 64 * MiB, "freeze")
