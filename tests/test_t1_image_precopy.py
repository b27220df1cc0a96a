"""Tier 1: prepare copies files that their service keeps changing (a guest's RAM), and
the image still checks out after the freeze."""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest

from kexecfs.core import image
from kexecfs.core.instance import Caller
from kexecfs.core.machine import LiveUpdate, State

ROOT = Caller(pid=os.getpid(), uid=0, gid=0)


@pytest.mark.parametrize("sealed", [pytest.param(False, id="read"), pytest.param(True, id="mapped")])
def test_a_change_undone_during_prepare_leaves_a_sound_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                             sealed: bool) -> None:
    """A running guest changes a byte right after prepare checksummed its chunk, and changes
    it back before the freeze (a flag, a lock word). The freeze sees the chunk as it was
    checksummed and rewrites nothing, so the image must hold the bytes its checksum is of.
    Both ways of reading: with pread (a memfd that can shrink) and through a mapping (one
    sealed against shrinking, as QEMU seals guest RAM)."""
    machine = LiveUpdate.boot(tmp_path / "images", boot_id="boot-1")
    inst = machine.create_instance("vm", ROOT)
    data = os.urandom(4 << 20)
    ram = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    os.write(ram, data)
    if sealed:
        fcntl.fcntl(ram, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    machine.preserve(inst, ROOT, os.dup(ram), 2)
    real_crc32 = image.crc32
    flipped = []

    def checksum_then_guest_writes(chunk: bytes | memoryview) -> int:
        crc = real_crc32(chunk)
        if not flipped:  # the guest's write lands between the checksum and whatever comes next
            os.pwrite(ram, bytes([data[100] ^ 0xFF]), 100)
            flipped.append(True)
        return crc

    monkeypatch.setattr(image, "crc32", checksum_then_guest_writes)
    machine.begin("prepare", ROOT)()
    monkeypatch.setattr(image, "crc32", real_crc32)
    assert flipped, "prepare took no checksum: the test no longer reaches the copy"
    os.pwrite(ram, data[100:101], 100)  # ... and undoes it before the freeze
    machine.begin("freeze", ROOT)()
    machine.begin("kexec", ROOT)()

    after = machine.reboot()
    assert after.state is State.UPDATED, f"the image was refused: {after.last_error}"
    restored = after.restore(after.instances["vm"], ROOT, 2)
    assert hashlib.sha256(os.pread(restored.fd, len(data), 0)).digest() == hashlib.sha256(data).digest()
