"""A full disk during prepare and freeze: an 8 MiB tmpfs is the image directory. The
writer of the event that copies gets ENOSPC, the machine is normal again with its
registrations, no temporary file is left (the space comes back), older images are
untouched, and once there is room the next live update works.
"""

from __future__ import annotations

import errno
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import (IMAGE, Daemon, MiB, Payload, assert_no_temp, digest, fill, instances, listing, needs_fuse,
                     sh_state_event, state, status, verify_restored, write_errno)
from kexecfs.core import image as image_module
from kexecfs.core.image import HandoverImage
from kexecfs.core.instance import Caller
from kexecfs.core.machine import LiveUpdate

ROOT = Caller(pid=os.getpid(), uid=0, gid=0, via="test")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Daemon]:
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "kexecfs-test-full", str(images)], check=True)
    d = Daemon.at(tmp_path, image_dir=images)
    try:
        d.start()
        yield d
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(images)], check=True)
    d.check_log()


def used(path: Path) -> int:
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def previous_images(d: Daemon) -> dict[str, str]:
    """Every image file already in the directory, with its digest."""
    return {str(p.relative_to(d.image_dir)): digest(p)
            for p in sorted(d.image_dir.rglob("*.kximg*"))}


def make_previous_image(d: Daemon) -> None:
    """A completed live update whose image was retired by finish: it must survive."""
    p = Payload(d.mountpoint)
    p.instance("old")
    p.memfd("old", 1, MiB)
    p.preserve()
    for event in ("prepare", "freeze", "kexec"):
        sh_state_event(d.mountpoint, event)
    sh_state_event(d.mountpoint, "finish")  # nobody restored it: the file is dropped
    assert listing(d.mountpoint, "old") == []
    os.rmdir(d.mountpoint / "old")
    p.close()
    [retired] = list((d.image_dir / "retired").glob("*.kximg"))
    HandoverImage.open(retired).verify()


def check_refused(d: Daemon, before: dict[str, str], base: int, event: str) -> None:
    assert state(d.mountpoint) == "normal"
    assert instances(d.mountpoint) == ["svc"], "registrations stay"
    assert_no_temp(d.image_dir)
    assert not (d.image_dir / IMAGE).exists()
    assert previous_images(d) == before, "an earlier image changed"
    assert used(d.image_dir) <= base + 64 * 1024, "the space of the failed image was not given back"
    assert status(d.mountpoint)["last_error"].startswith(f"{event}: ")
    assert "No space left on device" in d.log_text()


@needs_fuse
def test_enospc_in_prepare(small_disk: Daemon) -> None:
    d = small_disk
    make_previous_image(d)
    before, base = previous_images(d), used(d.image_dir)
    p = Payload(d.mountpoint)
    p.instance("svc")
    big = p.memfd("svc", 1, 16 * MiB)
    p.preserve()
    try:
        assert write_errno(d.mountpoint / "state", b"prepare") == errno.ENOSPC
        check_refused(d, before, base, "prepare")
        # With room, the next live update goes through.
        (d.mountpoint / "svc/fd_unpreserve").write_text("1")
        p.files.remove(big)
        os.close(big.fd)
        p.memfd("svc", 2, 2 * MiB)
        p.preserve(p.files[-1])
        want = p.snapshot()
        for event in ("prepare", "freeze", "kexec"):
            sh_state_event(d.mountpoint, event)
        verify_restored(d.mountpoint, want)
    finally:
        p.close()


@needs_fuse
@pytest.mark.parametrize("how", ["grown", "ballast"])
def test_enospc_in_freeze(small_disk: Daemon, tmp_path: Path, how: str) -> None:
    """freeze copies again what changed shape (a grown file), and writes the index: either
    can find the disk full."""
    d = small_disk
    make_previous_image(d)
    before, base = previous_images(d), used(d.image_dir)
    p = Payload(d.mountpoint)
    p.instance("svc")
    f = p.memfd("svc", 1, 3 * MiB)
    p.preserve()
    ballast = d.image_dir / "ballast"
    try:
        sh_state_event(d.mountpoint, "prepare")
        if how == "grown":
            fill(f.fd, 3 * MiB, 9 * MiB, random.Random(1))
        else:
            fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)  # whatever room is left, taken
            try:
                while True:
                    os.write(fd, b"\xAA" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            finally:
                os.close(fd)
        assert write_errno(d.mountpoint / "state", b"freeze") == errno.ENOSPC
        ballast.unlink(missing_ok=True)
        check_refused(d, before, base, "freeze")
        want = p.snapshot()
        if how == "grown":
            (d.mountpoint / "svc/fd_unpreserve").write_text("1")
            p.files.clear()
            os.close(f.fd)
            p.memfd("svc", 2, MiB)
            p.preserve()
            want = p.snapshot()
        for event in ("prepare", "freeze", "kexec"):
            sh_state_event(d.mountpoint, event)
        verify_restored(d.mountpoint, want)
    finally:
        p.close()


def test_short_writes_are_completed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the image writer took every pwrite(2) for a whole one. A filesystem
    filling up writes what fits and says how much; taken for all of it, a hole in the
    image would only show at recovery, as a checksum error refusing the whole image.
    Here every write is cut short: the image must still be whole."""
    real = os.pwrite
    calls = {"short": 0}

    def short_pwrite(fd: int, data: bytes, offset: int) -> int:
        n = len(data)
        if n > 1:
            calls["short"] += 1
            return real(fd, memoryview(data)[: max(1, n // 3)], offset)
        return real(fd, data, offset)

    machine = LiveUpdate.boot(tmp_path / "images", boot_id="short")
    inst = machine.create_instance("svc", ROOT)
    fd = os.memfd_create("short")
    data = os.urandom(3 * MiB + 12345)
    os.pwrite(fd, data, 0)
    machine.preserve(inst, ROOT, fd, 1)
    monkeypatch.setattr(image_module.os, "pwrite", short_pwrite)
    for event in ("prepare", "freeze"):
        machine.begin(event, ROOT)()
    monkeypatch.undo()
    assert calls["short"] > 3
    image = HandoverImage.open(tmp_path / "images" / IMAGE)
    image.verify()
    out = os.memfd_create("out")
    monkeypatch.setattr(image_module.os, "pwrite", short_pwrite)
    image.copy_into(out, image.files[0]["extents"])  # restoring into a memfd: the same
    monkeypatch.undo()
    assert os.pread(out, len(data) + 1, 0) == data
    image.close()
    for i in machine.instances.values():
        i.drop_files()
