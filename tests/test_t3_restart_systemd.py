"""kexecfs.service's restarts through systemd's fd store (SPEC section 10), with a
stand-in that stores and hands back descriptors as systemd does (tests/fdstore_standin.py):
FDSTORE=1/FDNAME=/FDSTOREREMOVE=1 on the notify socket, LISTEN_FDS/LISTEN_FDNAMES at
each start, Restart=on-failure, FileDescriptorStorePreserve=yes.

The same update as hard/test_t4_hard_restart.py (a container with a bind mount of its
instance and open files in it), across the three restarts the issue names: kill -9,
systemctl restart (SIGTERM), and an upgrade (the restarted daemon is another copy of the
package, in another directory).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import ROOT, Update, is_mounted, keeper_holdings, needs_fuse, stored_files, until, updating

pytestmark = needs_fuse

STANDIN = ROOT / "tests" / "fdstore_standin.py"


class Service:
    """kexecfs.service under the stand-in: what Update needs of a daemon, and the unit's verbs."""

    def __init__(self, tmp_path: Path) -> None:
        self.mountpoint, self.image_dir, self.log = tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log"
        self.mountpoint.mkdir()
        self.logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, str(STANDIN), "--", *self.command(ROOT)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self.logf, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.pid = self.until("ready")[1]

    def command(self, package: Path) -> list[str]:
        """ExecStart= of kexecfs.service, for the package in ``package``."""
        return ["env", "-C", str(package), f"PYTHONPATH={package}", "KEXECFS_FD_STORE=systemd", sys.executable,
                "-m", "kexecfs", "mount", str(self.mountpoint), "--image-dir", str(self.image_dir), "--foreground"]

    def until(self, kind: str) -> list[str]:
        """Events up to the first of ``kind``; that one, split."""
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            assert line, f"the stand-in ended before '{kind}':\n{self.log_text()[-3000:]}"
            event = line.split()
            if event[0] == "exited" and event[2] != "0" and kind != "exited":
                assert event[2] == "-9", f"the daemon exited with {event[2]}:\n{self.log_text()[-3000:]}"
            if event[0] == kind:
                return event

    def tell(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def kill_9(self) -> None:
        self.tell("kill")
        assert self.until("exited")[2] == "-9"
        self.pid = self.until("ready")[1]  # restarted by Restart=on-failure, with its store

    def restart(self, package: Path = ROOT) -> None:
        """systemctl restart (with ``package``: after an upgrade of the package)."""
        self.tell("restart " + " ".join(self.command(package)))
        assert self.until("exited")[2] == "0"
        self.pid = self.until("ready")[1]

    def names(self) -> list[str]:
        self.tell("names")
        return self.until("names")[1:]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def unexpected_tracebacks(self) -> list[str]:
        return self.log_text().split("Traceback (most recent call last)")[1:]

    def stop(self) -> None:
        if is_mounted(self.mountpoint):
            subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True)
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            self.proc.wait(30)
        self.logf.close()


@pytest.fixture
def update(tmp_path: Path) -> Iterator[Update]:
    with updating(Update(Service(tmp_path), tmp_path)) as u:  # type: ignore[arg-type]
        yield u


def upgraded_package(tmp_path: Path) -> Path:
    """Another copy of the installed package (the C extension too), as an upgrade installs."""
    target = tmp_path / "upgrade"
    shutil.copytree(ROOT / "kexecfs", target / "kexecfs", ignore=shutil.ignore_patterns("__pycache__"))
    return target


def test_kill_restart_and_upgrade_lose_nothing(update: Update, tmp_path: Path) -> None:
    service: Service = update.daemon  # type: ignore[assignment]
    mnt = service.mountpoint
    update.set_up()
    # systemd's store gives descriptors back only at a start, all at once: it holds the
    # connection, and the files are in keepers (two each), which give one back on demand.
    assert sorted(service.names()) == ["fuse", "fuse-init"]
    files = stored_files(service.image_dir)
    assert len(files) == 5 and set(files.values()) == {2}, files
    service.kill_9()
    update.check_after_restart()
    (mnt / "state").write_text("prepare")
    update.write_while_prepared()
    service.restart()
    update.check_after_restart()
    assert (mnt / "state").read_text() == "prepared\n"
    (mnt / "state").write_text("freeze")
    package = upgraded_package(tmp_path)
    service.restart(package)
    assert f"{package}/kexecfs/_fusehook" in Path(f"/proc/{service.pid}/maps").read_text(), "not the upgrade"
    update.check_after_restart()
    assert (mnt / "state").read_text() == "frozen\n"
    update.finish_update()
    assert update.counts.files_restored == 5


def test_the_store_follows_the_registrations_and_empties_at_unmount(update: Update) -> None:
    service: Service = update.daemon  # type: ignore[assignment]
    mnt = service.mountpoint
    update.set_up()
    before = set(stored_files(service.image_dir))
    (mnt / "db" / "fd_unpreserve").write_text("5")
    del update.expected["db"][5]
    after = set(stored_files(service.image_dir))
    assert len(before - after) == 1 and not after - before, "unpreserve left its descriptor in the store"
    memfd = os.memfd_create("twice")
    for token in (7, 8):  # one open file preserved twice: it is stored once
        (mnt / "db" / "fd_preserve").write_text(f"{memfd} {token}")
    assert len(set(stored_files(service.image_dir)) - after) == 1
    service.kill_9()
    assert update.listing("db") == [6, 7, 8]
    os.close(memfd)
    update.close()  # the container's bind mount goes: the unmount can end the connection
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
    assert service.until("exited")[2] == "0"
    assert service.names() == [], "an unmount ends everything the store held"
    until(lambda: not keeper_holdings(service.image_dir), "the keepers end with the connection")
