"""The device state of a suspended VM: what ``kexecfs vm update`` saves and ``resume`` loads.

It lives in the VM's *device-state memfd*, preserved in the VM's instance beside its
guest RAM, so it crosses the kexec in the same handover image, under the same checksums
and the same atomic rename as the RAM it belongs to. Layout (little-endian)::

    offset 0     header, HEADER_SIZE bytes, written last: the commit record
                   magic "KXVMSTAT" | major u16 | minor u16 | reserved u32
                   | config offset u64 | config length u64
                   | stream offset u64 | stream length u64
                   | SHA-256 of config + stream (32 bytes)
    HEADER_SIZE  the VM's configuration, JSON (:class:`~kexecfs.vm.qemu.GuestConfig`)
    stream off.  QEMU's migration stream, with x-ignore-shared: CPU and device state
                 and the small RAM blocks (firmware, option ROMs), not the guest RAM

A save first truncates the memfd, so a save that does not finish leaves no header at
all: "never saved" and "saved but not committed" read the same, and both mean the VM
was not stopped and saved before the freeze.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"KXVMSTAT"
MAJOR, MINOR = 1, 0
HEADER = struct.Struct("<8sHHIQQQQ32s")
HEADER_SIZE = 128  # room for the header to grow; the configuration starts here
_ALIGN = 4096  # QEMU writes its stream from a page boundary
_READ = 1 << 20


class DeviceStateError(Exception):
    """The device state cannot be used: the guest RAM must stay where it is."""


class NeverSaved(DeviceStateError):
    """No committed device state: the VM was not stopped and saved before the freeze."""


class Damaged(DeviceStateError):
    """A device state is there but does not check out."""


@dataclass(frozen=True)
class SavedState:
    """A committed device state, read back and checked."""

    config: dict[str, Any]
    stream: bytes


@dataclass(frozen=True)
class PendingSave:
    """Where a save in progress put the configuration, and where QEMU's stream starts."""

    config_length: int
    stream_offset: int


def begin(fd: int, config: dict[str, Any]) -> PendingSave:
    """Make ``fd`` ready for QEMU's stream: no header (a save in progress is no commit),
    the configuration in place, the file offset at the page where the stream goes."""
    blob = json.dumps(config, sort_keys=True).encode()
    os.ftruncate(fd, 0)
    _pwrite_all(fd, blob, HEADER_SIZE)
    pending = PendingSave(len(blob), -(-(HEADER_SIZE + len(blob)) // _ALIGN) * _ALIGN)
    os.lseek(fd, pending.stream_offset, os.SEEK_SET)
    return pending


def commit(fd: int, pending: PendingSave) -> int:
    """Seal what QEMU wrote after :func:`begin`: write the header. Returns the stream's length."""
    stream_length = os.fstat(fd).st_size - pending.stream_offset
    if stream_length <= 0:
        raise DeviceStateError("QEMU wrote no migration stream")
    digest = hashlib.sha256()
    _hash_range(digest, fd, HEADER_SIZE, pending.config_length)
    _hash_range(digest, fd, pending.stream_offset, stream_length)
    header = HEADER.pack(MAGIC, MAJOR, MINOR, 0, HEADER_SIZE, pending.config_length, pending.stream_offset,
                         stream_length, digest.digest())
    _pwrite_all(fd, header, 0)
    return stream_length


def load(fd: int) -> SavedState:
    """The committed device state in ``fd``, checked; NeverSaved or Damaged otherwise."""
    size = os.fstat(fd).st_size
    raw = os.pread(fd, HEADER.size, 0)
    if size == 0 or not raw.strip(b"\0"):
        raise NeverSaved("the device state was never saved (empty)")
    if len(raw) < HEADER.size:
        raise Damaged(f"the device state is {size} bytes, shorter than its header")
    magic, major, _minor, _, c_off, c_len, s_off, s_len, digest = HEADER.unpack(raw)
    if magic != MAGIC:
        raise Damaged(f"the device state starts with {magic!r}, not {MAGIC!r}")
    if major != MAJOR:
        raise Damaged(f"the device state has format {major}.x; this kexecfs reads {MAJOR}.x")
    if c_off < HEADER_SIZE or c_off + c_len > s_off or s_off + s_len != size:
        raise Damaged(f"the device state is {size} bytes, but its header describes config {c_off}+{c_len} "
                      f"and stream {s_off}+{s_len}")
    config_blob, stream = _pread_all(fd, c_len, c_off), _pread_all(fd, s_len, s_off)
    if hashlib.sha256(config_blob + stream).digest() != digest:
        raise Damaged("the device state does not match its SHA-256 (changed after it was saved)")
    try:
        config = json.loads(config_blob)
    except ValueError as exc:
        raise Damaged(f"the device state's configuration is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise Damaged("the device state's configuration is not a JSON object")
    return SavedState(config, stream)


def _hash_range(digest: Any, fd: int, offset: int, length: int) -> None:
    end = offset + length
    while offset < end:
        chunk = os.pread(fd, min(_READ, end - offset), offset)
        if not chunk:
            raise Damaged(f"the device state ends at {offset}, before {end}")
        digest.update(chunk)
        offset += len(chunk)


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    parts, done = [], 0
    while done < length:
        chunk = os.pread(fd, min(_READ, length - done), offset + done)
        if not chunk:
            raise Damaged(f"the device state ends at {offset + done}, before {offset + length}")
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n
