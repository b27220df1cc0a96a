"""Tier 3: whole live updates through a real mount — preserve, prepare, freeze, a
simulated kexec or a killed daemon, restore by the owners, finish — and damaged images."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest

from harness import NOBODY, OTHERS_PYTHON, Daemon, as_uid, others_env, public_copy, sh


def service(*args: str, uid: int | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [OTHERS_PYTHON, str(public_copy("tests/service.py")), *args]
    if uid is not None:
        cmd = [*as_uid(uid), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=others_env())


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


class Services:
    """Two services: 'vm' (root) with big, sparse and sealed memfds and a regular file;
    'db' (uid nobody, delegated) with a small memfd preserved through fd_preserve."""

    def __init__(self, daemon: Daemon, tmp_path: Path, big: int = 256 << 20) -> None:
        self.daemon = daemon
        self.mnt = daemon.mountpoint
        self.tmp = tmp_path
        (tmp_path / "disk").mkdir(mode=0o777)
        self.regular = tmp_path / "disk" / "journal"
        self.regular.write_bytes(os.urandom(100_000))
        os.chmod(self.regular, 0o666)
        self.specs = {
            "vm": ([{"token": 1, "kind": "memfd", "size": big, "pos": 4096 * 3},
                    {"token": 2, "kind": "memfd", "size": 1 << 30, "islands": 3, "via": "file"},
                    {"token": 3, "kind": "memfd", "size": 5 << 20, "seals": ["shrink", "grow", "seal"], "pos": 17},
                    {"token": 4, "kind": "file", "path": str(self.regular), "pos": 54321}], None),
            "db": ([{"token": 7, "kind": "memfd", "size": 3 << 20, "pos": 99, "via": "file"}], NOBODY),
        }

    def preserve(self) -> None:
        sh(f"mkdir {self.mnt}/vm {self.mnt}/db && chown {NOBODY}:{NOBODY} {self.mnt}/db", check=True)
        for name, (spec, uid) in self.specs.items():
            spec_file, out = self.tmp / f"{name}.spec", self.tmp / f"{name}.digests"
            spec_file.write_text(json.dumps(spec))
            os.chmod(self.tmp, 0o777)
            r = service("preserve", str(self.mnt), name, str(spec_file), str(out), uid=uid)
            assert r.returncode == 0, r.stderr

    def verify(self) -> None:
        for name, (_spec, uid) in self.specs.items():
            r = service("verify", str(self.mnt), name, str(self.tmp / f"{name}.digests"), uid=uid)
            assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"
            assert "restored intact" in r.stdout

    def event(self, word: str, target: str = "state", uid: int | None = None) -> None:
        r = sh(f"echo {word} > {self.mnt}/{target}", uid=uid)
        assert r.returncode == 0, f"echo {word} > {target}: {r.stderr}"


def test_simulated_kexec_round_trip(daemon: Daemon, tmp_path: Path) -> None:
    s = Services(daemon, tmp_path)
    s.preserve()
    bind = tmp_path / "bound-db"
    bind.mkdir()
    sh(f"mount --bind {s.mnt}/db {bind}", check=True)
    try:
        inode_before = os.stat(s.mnt / "db").st_ino
        s.event("prepare")
        s.event("freeze")
        s.event("kexec")
        assert (s.mnt / "state").read_text() == "updated\n"
        status = (s.mnt / "status").read_text()
        assert "kexec_count: 1\n" in status and "preserved_files: 5\n" in status
        kernel = tuple(int(x) for x in platform.release().split("-")[0].split(".")[:2])
        assert f"restore: {'passthrough' if kernel >= (6, 9) else 'proxy'}\n" in status
        assert os.stat(s.mnt / "db").st_ino == inode_before
        # The bind mount made before the kexec reaches the recovered instance.
        assert (bind / "state").read_text() == "updated\n"
        assert (bind / "fd_preserve").read_text() == "7 memfd 3145728 rw\n"
        # Before any kexec restore was EBUSY; now it is the owner's alone.
        assert "Permission denied" in sh(f"cat {s.mnt}/db/fds/7 >/dev/null", uid=NOBODY - 1).stderr
        s.verify()
        s.event("finish", "db/state", uid=NOBODY)
        assert (bind / "state").read_text() == "normal\n"
        assert (s.mnt / "state").read_text() == "updated\n", "vm has not finished yet"
        s.event("finish", "vm/state")
        assert (s.mnt / "state").read_text() == "normal\n"
    finally:
        sh(f"umount {bind}")
    # Restored files stay preserved (the next update carries them again); unrestored ones are gone.
    assert [line.split()[0] for line in (s.mnt / "vm/fd_preserve").read_text().splitlines()] == ["1", "2", "3", "4"]
    assert list((daemon.image_dir / "retired").glob("*-finished.kximg"))


def test_restore_is_ebusy_before_a_kexec(daemon: Daemon, tmp_path: Path) -> None:
    s = Services(daemon, tmp_path, big=1 << 20)
    s.preserve()
    assert "Device or resource busy" in sh(f"cat {s.mnt}/vm/fds/1").stderr
    assert sh(f"stat -c %s {s.mnt}/vm/fds/1", check=True).stdout.strip() == str(1 << 20)


def test_daemon_killed_after_freeze_loses_nothing(daemon: Daemon, tmp_path: Path) -> None:
    """A restart is not a kexec: the restarted daemon is still frozen, the kexec then
    recovers everything, and a crash after it (before finish) loses nothing either."""
    s = Services(daemon, tmp_path)
    s.preserve()
    s.event("prepare")
    s.event("freeze")
    daemon.kill()  # its keeper holds the connection: the mount waits for the next daemon
    daemon.start()
    assert (s.mnt / "state").read_text() == "frozen\n"
    s.event("kexec")
    assert (s.mnt / "state").read_text() == "updated\n"
    s.verify()
    daemon.kill()
    daemon.start()
    assert (s.mnt / "state").read_text() == "updated\n"
    s.verify()
    s.event("finish")


@pytest.mark.parametrize("point,recovers", [
    ("commit.before_fsync", False), ("commit.before_rename", False), ("commit.after_rename", True)])
def test_crash_during_freeze_leaves_old_or_complete_image(tmp_path: Path, point: str, recovers: bool) -> None:
    """With nothing kept outside the daemon (no store, as after a power cut), the image alone."""
    d = Daemon(tmp_path / "m", tmp_path / "img", tmp_path / "log", env={"KEXECFS_FD_STORE": "none"})
    d.mountpoint.mkdir()
    d.start(faults=f"{point}=kill")
    try:
        s = Services(d, tmp_path, big=8 << 20)
        s.preserve()
        s.event("prepare")
        assert sh(f"echo freeze > {s.mnt}/state").returncode != 0, "the daemon died during freeze"
        d.proc.wait(10)  # type: ignore[union-attr]
        d.start()
        assert (s.mnt / "state").read_text() == ("updated\n" if recovers else "normal\n")
        assert not list(d.image_dir.glob(".*.tmp")), "no half-written image is left behind"
        if recovers:
            s.verify()
    finally:
        d.stop()


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:8] = b"NOTANIMG"
    elif how == "checksum":
        data[4096 + 12345] ^= 0x01
    elif how == "truncated":
        del data[len(data) // 2:]
    elif how == "newer-major":
        data[8:10] = (2).to_bytes(2, "big")
    elif how == "index":
        data[-100] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how,reason", [
    ("magic", "bad magic"), ("checksum", "checksum mismatch"), ("truncated", "truncated"),
    ("newer-major", "format version 2.0"), ("index", "checksum mismatch")])
def test_damaged_image_is_refused_whole(daemon: Daemon, tmp_path: Path, how: str, reason: str) -> None:
    s = Services(daemon, tmp_path, big=1 << 20)
    s.preserve()
    s.event("prepare")
    s.event("freeze")
    daemon.stop()
    image = daemon.image_dir / "handover.kximg"
    _corrupt(image, how)
    daemon.start()
    status = (s.mnt / "status").read_text()
    assert "state: normal\n" in status and "instances: 0\n" in status
    assert reason in status, status
    assert not image.exists()
    kept = list(daemon.image_dir.glob("handover.kximg.damaged-*"))
    assert len(kept) == 1 and kept[0].stat().st_size > 0, "the damaged image is kept aside, not deleted"
    assert reason in daemon.log_text()
    sh(f"mkdir {s.mnt}/after", check=True)  # and the daemon serves


def test_freeze_of_1gib_keeps_daemon_memory_flat(daemon: Daemon, tmp_path: Path) -> None:
    """Freezing 1 GiB of memfd contents adds at most 64 MiB to the daemon's peak RSS."""
    sh(f"mkdir {daemon.mountpoint}/big", check=True)
    code = (f"import os; m=os.memfd_create('big'); os.ftruncate(m, 1<<30); b=os.urandom(1<<20)\n"
            f"for i in range(1024): os.pwrite(m, b, i<<20)\n"
            f"open('{daemon.mountpoint}/big/fd_preserve','w').write(f'{{m}} 1')")
    subprocess.run(["/usr/bin/python3", "-c", code], check=True)
    pid = daemon.proc.pid  # type: ignore[union-attr]
    before = vm_hwm_kib(pid)
    sh(f"echo prepare > {daemon.mountpoint}/state && echo freeze > {daemon.mountpoint}/state", check=True)
    grown_mib = (vm_hwm_kib(pid) - before) / 1024
    print(f"daemon peak RSS {before / 1024:.1f} MiB before, +{grown_mib:.1f} MiB after freezing 1 GiB")
    assert grown_mib <= 64, f"freeze of 1 GiB raised the daemon's peak RSS by {grown_mib:.1f} MiB"
    sh(f"echo cancel > {daemon.mountpoint}/state", check=True)
