"""Tier 3: ``kexecfs vm`` with a real QEMU (TCG) and the tiny guest across kexecs.

Each test boots the Debian 6.1 kernel of the VM test with a busybox init that counts
seconds (tests/tinyguest.py), drives it with the ``kexecfs vm`` command as a user would,
and reads the guest's console: a guest that survived goes on counting with its boot id.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import NOBODY, OTHERS_PYTHON, ROOT, Daemon, others_env, sh
from tinyguest import MEMORY, Console, TinyGuest, one_life

# The error tests need a QEMU but not a booted guest; the others wait for ticks.
BOOTED = 2  # ticks seen before an update: the guest's init is running


@pytest.fixture(scope="session")
def tiny() -> TinyGuest:
    return TinyGuest.build()


class Vms:
    """``kexecfs vm`` on one test mount, with its run directory; kills every QEMU at the end."""

    def __init__(self, daemon: Daemon, tiny: TinyGuest, tmp_path: Path) -> None:
        self.daemon, self.tiny, self.tmp = daemon, tiny, tmp_path
        self.mnt = daemon.mountpoint
        self.run_dir = tmp_path / "vm-run"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "kexecfs", "--mount", str(self.mnt), "vm", args[0],
                            "--run-dir", str(self.run_dir), *args[1:]],
                           capture_output=True, text=True, timeout=120, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)})
        if check:
            assert r.returncode == 0, f"kexecfs vm {' '.join(args)}: {r.returncode}\n{r.stdout}{r.stderr}"
        return r

    def start(self, name: str, memory: str = MEMORY, extra: tuple[str, ...] = ()) -> Console:
        console = self.tmp / f"{name}.console"
        self.cli("start", name, "--memory", memory, "--", *self.tiny.qemu_options(console), *extra)
        return Console(console)

    def event(self, event: str) -> str:
        (self.mnt / "state").write_text(event + "\n")
        return (self.mnt / "state").read_text().strip()

    def qemu_pid(self, name: str) -> int | None:
        try:
            pid = int((self.run_dir / name / "qemu.pid").read_text())
        except (OSError, ValueError):
            return None
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return None if stat.rsplit(")", 1)[1].split()[0] == "Z" else pid

    def kill_all(self) -> None:
        """Every QEMU of this test: found by its command line (which names this test's
        directory), not by pid files, which a broken kexecfs vm may have left wrong."""
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes()
            except OSError:
                continue
            if proc.name.isdigit() and cmdline.startswith(b"qemu-system") and str(self.tmp).encode() in cmdline:
                try:
                    os.kill(int(proc.name), signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def vms(daemon: Daemon, tiny: TinyGuest, tmp_path: Path) -> Iterator[Vms]:
    v = Vms(daemon, tiny, tmp_path)
    try:
        yield v
    finally:
        v.kill_all()


def preserved(mnt: Path, name: str) -> dict[int, tuple[str, int]]:
    """``fd_preserve`` of an instance: token -> (kind, size)."""
    out = {}
    for line in (mnt / name / "fd_preserve").read_text().splitlines():
        token, kind, size, _ = line.split()
        out[int(token)] = (kind, int(size))
    return out


def test_guest_survives_a_simulated_kexec(vms: Vms) -> None:
    console = vms.start("tiny")
    first_qemu = vms.qemu_pid("tiny")
    console.wait_for_tick(BOOTED)
    boot_before = (vms.mnt / "status").read_text()
    assert vms.event("prepare") == "prepared"
    vms.cli("update", "tiny")
    assert vms.qemu_pid("tiny") is None, "update quits QEMU"
    last = console.ticks()[-1][0]
    assert 0 < preserved(vms.mnt, "tiny")[1][1] < 4 << 20, \
        "the device state went into the instance, without the guest RAM (x-ignore-shared)"
    assert vms.event("kexec") == "updated"
    assert (vms.mnt / "status").read_text() != boot_before
    vms.cli("resume", "tiny")
    assert vms.qemu_pid("tiny") not in (None, first_qemu)
    boot_id = one_life(console.wait_for_tick(last + 2))
    assert (vms.mnt / "tiny" / "state").read_text() == "normal\n", "resume finishes the instance"
    assert preserved(vms.mnt, "tiny") == {1: ("memfd", 0), 2: ("memfd", 160 << 20)}, \
        "the RAM stays preserved for the next update, with an empty device state beside it"
    assert boot_id in console.path.read_text()


def test_guest_survives_a_daemon_killed_after_freeze(vms: Vms) -> None:
    console = vms.start("tiny")
    console.wait_for_tick(BOOTED)
    vms.event("prepare")
    vms.cli("update", "tiny")
    last = console.ticks()[-1][0]
    assert vms.event("freeze") == "frozen"
    vms.daemon.kill()
    vms.daemon.start()  # a restart is not a kexec: still frozen, the saved guest with it
    assert (vms.mnt / "state").read_text() == "frozen\n"
    assert vms.event("kexec") == "updated"
    vms.cli("resume", "tiny")
    one_life(console.wait_for_tick(last + 2))


def test_two_vms_at_once(vms: Vms) -> None:
    consoles = {"a": vms.start("a"), "b": vms.start("b", memory="192M")}
    for c in consoles.values():
        c.wait_for_tick(BOOTED)
    vms.event("prepare")
    for name in consoles:
        vms.cli("update", name)
    last = {name: c.ticks()[-1][0] for name, c in consoles.items()}
    assert vms.event("kexec") == "updated"
    listing = {line.split()[0]: line.split()[1] for line in vms.cli("list").stdout.splitlines()[1:]}
    assert listing == {"a": "resumable", "b": "resumable"}, listing
    vms.cli("resume", "b")
    assert (vms.mnt / "a" / "state").read_text() == "updated\n", "one VM's resume leaves the other's instance"
    vms.cli("resume", "a")
    boots = {name: one_life(c.wait_for_tick(last[name] + 2)) for name, c in consoles.items()}
    assert boots["a"] != boots["b"]
    assert preserved(vms.mnt, "b")[2] == ("memfd", 192 << 20)
    assert (vms.mnt / "state").read_text() == "normal\n"


def test_a_vm_not_stopped_before_the_freeze_keeps_its_ram(vms: Vms) -> None:
    vms.start("late")
    vms.event("prepare")
    vms.event("freeze")
    r = vms.cli("update", "late", check=False)
    assert r.returncode == 1 and "frozen" in r.stderr and "keeps running" in r.stderr, r.stderr
    assert vms.qemu_pid("late"), "an update that comes too late leaves the guest running"
    assert vms.event("kexec") == "updated"
    r = vms.cli("resume", "late", check=False)
    assert r.returncode == 1 and "not stopped in time" in r.stderr, r.stderr
    assert (vms.mnt / "late" / "state").read_text() == "updated\n", "a failed resume finishes nothing"
    assert preserved(vms.mnt, "late")[2] == ("memfd", 160 << 20)
    assert (vms.mnt / "late" / "fds" / "2").stat().st_size == 160 << 20


def test_a_damaged_device_state_is_refused_and_the_ram_kept(vms: Vms) -> None:
    vms.start("dmg")
    vms.event("prepare")
    vms.cli("update", "dmg")
    vms.event("kexec")
    state = os.open(vms.mnt / "dmg" / "fds" / "1", os.O_RDWR)
    try:
        last = os.fstat(state).st_size - 1  # the last byte of QEMU's stream, changed whatever it was
        os.pwrite(state, bytes([os.pread(state, 1, last)[0] ^ 0xFF]), last)
    finally:
        os.close(state)
    r = vms.cli("resume", "dmg", check=False)
    assert r.returncode == 1 and "damaged" in r.stderr and "SHA-256" in r.stderr, r.stderr
    assert vms.qemu_pid("dmg") is None, "no QEMU runs a guest from a damaged state"
    assert (vms.mnt / "dmg" / "state").read_text() == "updated\n"
    assert preserved(vms.mnt, "dmg")[2] == ("memfd", 160 << 20)


def test_a_missing_device_state_is_refused_and_the_ram_kept(vms: Vms) -> None:
    vms.start("gone")
    vms.event("prepare")
    vms.cli("update", "gone")
    vms.event("kexec")
    (vms.mnt / "gone" / "fd_unpreserve").write_text("1\n")
    r = vms.cli("resume", "gone", check=False)
    assert r.returncode == 1 and "device state of 'gone' is missing" in r.stderr, r.stderr
    assert preserved(vms.mnt, "gone") == {2: ("memfd", 160 << 20)}


def test_a_failed_save_lets_the_guest_run_on(vms: Vms) -> None:
    # ivshmem-plain without master=on blocks migration: QEMU refuses the save after "stop".
    console = vms.start("blocked", extra=("-object", "memory-backend-ram,id=shm,size=1M",
                                          "-device", "ivshmem-plain,memdev=shm"))
    console.wait_for_tick(BOOTED)
    vms.event("prepare")
    r = vms.cli("update", "blocked", check=False)
    assert r.returncode == 1 and "ivshmem" in r.stderr and "runs on" in r.stderr, r.stderr
    seen = console.ticks()[-1][0]
    one_life(console.wait_for_tick(seen + 2))
    assert preserved(vms.mnt, "blocked")[1] == ("memfd", 0), "no commit record of a save that failed"


def test_an_unprivileged_owner_runs_its_vm(vms: Vms) -> None:
    """Root makes and delegates the instance; the rest is the owner's, QEMU included."""
    sh(f"mkdir {vms.mnt}/own && chown -R {NOBODY}:{NOBODY} {vms.mnt}/own", check=True)
    home = vms.tmp / "owner"  # the owner's: guest files, console, run directory
    home.mkdir()
    for f in (vms.tiny.kernel, vms.tiny.initrd):
        shutil.copy(f, home / f.name)
    os.chown(home, NOBODY, NOBODY)
    vms.run_dir.mkdir()
    os.chown(vms.run_dir, NOBODY, NOBODY)
    guest = TinyGuest(home / vms.tiny.kernel.name, home / vms.tiny.initrd.name)

    def as_owner(*args: str) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", OTHERS_PYTHON,
                            "-m", "kexecfs", "--mount", str(vms.mnt), "vm", args[0], "--run-dir", str(vms.run_dir),
                            *args[1:]],
                           capture_output=True, text=True, timeout=120, env=others_env(), cwd="/")
        assert r.returncode == 0, f"kexecfs vm {' '.join(args)} as uid {NOBODY}: {r.stdout}{r.stderr}"
        return r

    as_owner("start", "own", "--memory", MEMORY, "--", *guest.qemu_options(home / "own.console"))
    vms.event("prepare")
    as_owner("update", "own")
    vms.event("kexec")
    as_owner("resume", "own")
    pid = vms.qemu_pid("own")
    assert pid and os.stat(f"/proc/{pid}").st_uid == NOBODY, "the owner's QEMU runs as the owner"
    assert (vms.mnt / "own" / "state").read_text() == "normal\n"


def test_a_qemu_that_does_not_start_leaves_nothing_behind(vms: Vms) -> None:
    r = vms.cli("start", "bad", "--memory", MEMORY, "--", "-no-such-option", check=False)
    assert r.returncode == 1 and "-no-such-option" in r.stderr, r.stderr  # QEMU's own words
    assert not (vms.mnt / "bad").exists(), "the instance start made is removed again, RAM and all"
    r = vms.cli("start", "bad", "--memory", MEMORY, "--", "-m", "1G", check=False)
    assert r.returncode == 1 and "--memory" in r.stderr, r.stderr
