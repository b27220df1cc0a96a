"""Tier 2: root's per-instance limits (files.max, bytes.max) and evicting a file that
blocks everyone's prepare, through a real mount and a shell."""

from __future__ import annotations

import fcntl
import os
import struct
from pathlib import Path

import pytest

from harness import FUSE_SKIP, NOBODY, Daemon, sh
from kexecfs import abi


def test_root_sets_limits_and_the_owner_meets_them(mnt: Path) -> None:
    sh(f"mkdir {mnt}/db && chown -R {NOBODY}:{NOBODY} {mnt}/db", check=True)
    assert (mnt / "db" / "files.max").read_text() == "max\n"
    assert "Operation not permitted" in sh(f"echo 1 > {mnt}/db/files.max", uid=NOBODY).stderr
    assert "Invalid argument" in sh(f"echo lots > {mnt}/db/bytes.max").stderr
    sh(f"echo 2 > {mnt}/db/files.max; echo 1048576 > {mnt}/db/bytes.max", check=True)
    assert (mnt / "db" / "files.max").read_text() == "2\n"

    # Bytes: a 1 MiB memfd fits, a second byte does not; regular files hold no image bytes.
    over = sh(f"""python3 -c '
import os
a = os.memfd_create("a"); os.ftruncate(a, 1 << 20)
b = os.memfd_create("b"); os.ftruncate(b, 1)
for fd in (a, b):
    try:
        with open("{mnt}/db/fd_preserve", "w") as f:
            f.write(str(fd))
        print("ok")
    except OSError as e:
        print(e.strerror)
'""", uid=NOBODY, check=True).stdout.split("\n")
    assert over[:2] == ["ok", "Disk quota exceeded"]
    log = mnt.parent / "daemon.log"
    assert "over its limit of 1048576 (bytes.max)" in log.read_text()

    # Files: the second file is the last one; the third is ENOSPC, by echo and by ioctl alike.
    sh(f"exec 5<>{mnt.parent}/f1; echo 5 > {mnt}/db/fd_preserve", check=True)
    assert "No space left on device" in sh(f"exec 5<>{mnt.parent}/f2; echo 5 > {mnt}/db/fd_preserve").stderr
    fd = os.open(mnt.parent / "f3", os.O_RDWR | os.O_CREAT)
    control = os.open(mnt / "db" / "control", os.O_RDWR)
    with pytest.raises(OSError) as exc:
        fcntl.ioctl(control, abi.FD_PRESERVE, abi.LIVEUPDATE_FD.pack(fd, 0, 9))
    assert exc.value.errno == 28  # ENOSPC
    os.close(control)
    os.close(fd)
    assert "its limit (files.max)" in log.read_text()

    # The limits are part of the instance: they survive a simulated kexec.
    sh(f"echo prepare > {mnt}/state; echo kexec > {mnt}/state", check=True)
    assert (mnt / "db" / "files.max").read_text() == "2\n"
    assert (mnt / "db" / "bytes.max").read_text() == "1048576\n"
    sh(f"echo max > {mnt}/db/files.max", check=True)
    assert (mnt / "db" / "files.max").read_text() == "max\n"


def test_a_grown_memfd_fails_prepare_until_root_acts(mnt: Path) -> None:
    sh(f"mkdir {mnt}/vm; echo 4096 > {mnt}/vm/bytes.max", check=True)
    memfd = os.memfd_create("ram")
    os.ftruncate(memfd, 4096)
    (mnt / "vm" / "fd_preserve").write_text(f"{memfd} 7")
    os.ftruncate(memfd, 8192)  # grew after it was preserved
    failed = sh(f"echo prepare > {mnt}/state")
    assert "Disk quota exceeded" in failed.stderr
    assert (mnt / "state").read_text() == "normal\n"
    sh(f"echo 7 > {mnt}/vm/fd_unpreserve && echo prepare > {mnt}/state", check=True)
    assert (mnt / "state").read_text() == "prepared\n"
    os.close(memfd)


def test_the_operator_evicts_a_file_that_blocks_every_prepare(mnt: Path, tmp_path: Path) -> None:
    """README, "When one instance blocks the update": the error names the instance and the
    token, and one command as root drops that file."""
    sh(f"mkdir {mnt}/db {mnt}/web && chown -R {NOBODY}:{NOBODY} {mnt}/db", check=True)
    gone = tmp_path / "journal"
    sh(f"touch {gone} && chown {NOBODY} {gone}", check=True)
    sh(f"exec 5<>{gone}; echo '5 3' > {mnt}/db/fd_preserve", uid=NOBODY, check=True)
    gone.unlink()
    memfd = os.memfd_create("web")
    (mnt / "web" / "fd_preserve").write_text(str(memfd))
    assert sh(f"echo prepare > {mnt}/state").returncode != 0
    log = (tmp_path / "daemon.log").read_text()
    assert "prepare: instance 'db' token 3: is no longer a file: a deleted regular file" in log
    assert "to drop just this file: echo 3 > db/fd_unpreserve" in log
    sh(f"echo 3 > {mnt}/db/fd_unpreserve", check=True)  # the one command
    sh(f"echo prepare > {mnt}/state", check=True)
    assert (mnt / "state").read_text() == "prepared\n"
    os.close(memfd)


def test_mount_options_give_every_new_instance_its_limits(tmp_path: Path) -> None:
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    d = Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log", extra=["--max-files", "1", "--max-bytes", "0"])
    d.start()
    try:
        sh(f"mkdir {mnt}/a", check=True)
        assert (mnt / "a" / "files.max").read_text() == "1\n"
        assert (mnt / "a" / "bytes.max").read_text() == "0\n"
        # Not even an empty memfd fits beside a first file.
        sh(f"exec 5<>{tmp_path}/f; echo 5 > {mnt}/a/fd_preserve", check=True)
        assert "No space left" in sh(f"exec 5<>{tmp_path}/g; echo 5 > {mnt}/a/fd_preserve").stderr
    finally:
        d.stop()
    assert struct.calcsize("=iIQ") == abi.LIVEUPDATE_FD.size
