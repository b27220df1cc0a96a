"""The handover image: everything preserved, in one file that outlives the kernel.

Format, version 1.0 (all integers big-endian)::

    offset 0       preamble, 16 bytes
                     magic    8 bytes  b"\\x89KXFSIM\\n"  (0x89 and \\n catch text-mode mangling)
                     major    u16      a reader refuses a newer major version
                     minor    u16      a reader accepts any minor of its major
                     flags    u32      0
    offset 4096    data area: raw contents of preserved files, each extent starting
                   on a 4 KiB boundary so that it can be mapped and copied in slices
    index_offset   the index, one msgpack map:
                     "writer":   {"boot_id": str, "kexec_count": int, "hostname": str,
                                  "created": float (unix time), "version": str}
                     "state":    the global state when the image was written ("frozen")
                     "chunk_size": int, the checksum granularity of contents
                     "records":  a list of maps, each with a "type":
                        "instance": name, uid, gid, mode, ino
                        "file":     instance, token, kind, and the kind's fields
                                    (see kexecfs/kinds/); contents as "extents"
    end - 64       trailer, 64 bytes
                     magic          8 bytes  b"KXFSEND\\0"
                     index_offset   u64
                     index_length   u64
                     data_end       u64      where the data area stops
                     digest         32 bytes SHA-256 of preamble + index
                     reserved       8 bytes  0

An extent is ``[file_offset, length, image_offset, [crc32 of each chunk_size piece]]``:
holes of sparse files are simply absent. The per-chunk CRC-32s live in the index, and
the digest covers the index, so one SHA-256 over a few kilobytes plus the chunk CRCs
checks every byte of the image (a whole-image checksum without a second pass).

The writer builds the image in a temporary file in the image directory, fsyncs it,
renames it over ``handover.kximg`` and fsyncs the directory: after a crash at any
moment the directory holds the previous image or the complete new one, never half of
one. A preserved file that can shrink is read with pread(2), a chunk at a time, into
the writer's one buffer: its owner may truncate it at any moment, and touching a mapping
past the end of a file is SIGBUS, which would kill the daemon. One that cannot (a memfd
sealed with F_SEAL_SHRINK, as QEMU seals guest RAM) is read through mmap windows, in
place: a freeze's re-check of unchanged bytes is then one pass at memory speed, about
0.7 of the time that copying them out first takes. Whatever is written is copied into the
buffer, and its CRC and its write both take that copy. The image, which the daemon
alone writes, is read back through mmap windows. Memory stays bounded by a chunk and a
window, whatever the sizes.

A record of an unknown type is skipped with a warning; anything that does not parse,
check or fit the limits below makes the whole image refused (:class:`ImageError`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

try:
    # ISA-L's CRC-32 gives zlib's values about four times faster; the checksum pass is
    # the larger part of freeze and recovery with zlib's (bench/README.md).
    from isal.isal_zlib import crc32
except ImportError:  # no wheel for this platform: the same values, slower
    from zlib import crc32

from .errors import fail
from .faults import delay, inject
from .names import check_name
from .kinds import KINDS

log = logging.getLogger("kexecfs.image")

MAGIC = b"\x89KXFSIM\n"
TRAILER_MAGIC = b"KXFSEND\0"
MAJOR, MINOR = 1, 0
PREAMBLE = struct.Struct(">8sHHI")
TRAILER = struct.Struct(">8sQQQ32s8x")
DATA_START = 4096
PAGE = mmap.PAGESIZE
CHUNK_SIZE = 1 << 20
# Recovery maps the image this much at a time: the bound on what it adds to the
# daemon's resident memory, however large the preserved files are.
WINDOW = 16 << 20
# Recovery asks the kernel to read this much beyond the window it works on. After a real
# kexec nothing of the image is cached, and faults on a mapping read it a little at a time:
# asking ahead keeps the disk busy while the checksum and copy of the window run (a cold
# 2 GiB walk here: 3.7-5.2 s without, 2.1-2.6 s with).
READ_AHEAD = 2 * WINDOW

IMAGE_NAME = "handover.kximg"
MAX_INDEX = 256 << 20
MAX_RECORDS = 10_000_000

Extent = list  # [file_offset, length, image_offset, [crc, ...]]
Progress = Callable[[int, int], None]


class ImageError(Exception):
    """The image cannot be used; the message says exactly why."""


def _align(n: int, to: int = PAGE) -> int:
    return (n + to - 1) // to * to


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of the data of ``fd`` up to ``size``, skipping holes."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: only a hole is left
            return
        if start >= size:
            return
        try:
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        except OSError:  # ENXIO: the file shrank below start meanwhile
            raise _shrank(start, size) from None
        yield start, end - start
        pos = end


def _shrank(where: int, size: int) -> Exception:
    return fail(errno.EAGAIN, f"the file shrank while it was read (it had {size} bytes, and ends before "
                              f"{where} now); nothing was written: try again")


def _pieces(fd: int, offset: int, length: int, buffer: bytearray) -> Iterator[tuple[int, memoryview]]:
    """Read ``length`` bytes of a preserved file from ``offset`` into ``buffer``, a
    buffer at a time: (offset, view), each view valid until the next. A file that
    ends early is an error (EAGAIN) where a mapping would have been SIGBUS."""
    end = offset + length
    with memoryview(buffer) as whole:
        while offset < end:
            size = min(len(buffer), end - offset)
            with whole[:size] as view:
                done = 0
                while done < size:
                    with view[done:] as rest:
                        n = os.preadv(fd, [rest], offset + done)
                    if n == 0:
                        raise _shrank(offset + done, end)
                    done += n
                yield offset, view
            offset += size


def _chunks(fd: int, offset: int, length: int, buffer: bytearray, mapped: bool) -> Iterator[tuple[int, memoryview]]:
    """A preserved file's bytes from ``offset``, a chunk (``len(buffer)``) at a time:
    (offset, view), each view valid until the next. ``mapped`` (only for a file that
    cannot shrink): views of a mapping, read in place; otherwise views of ``buffer``."""
    if not mapped:
        yield from _pieces(fd, offset, length, buffer)
        return
    for window_offset, window in _windows(fd, offset, length):
        for i in range(0, len(window), len(buffer)):
            with window[i:i + len(buffer)] as view:
                yield window_offset + i, view


def _windows(fd: int, offset: int, length: int) -> Iterator[tuple[int, memoryview]]:
    """Map ``fd`` from ``offset`` for ``length`` bytes in WINDOW slices: (offset, view)."""
    # Windows start at offset + k * WINDOW, so chunk boundaries (which divide WINDOW)
    # fall at the same places as where the writer put them.
    end = offset + length
    while offset < end:
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        stop = min(end, offset + WINDOW)
        with mmap.mmap(fd, stop - base, access=mmap.ACCESS_READ, offset=base) as mm:
            # Released before the map is closed: mmap refuses to close while a view exists.
            with memoryview(mm) as whole, whole[offset - base: stop - base] as view:
                yield offset, view
        offset = stop


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> int:
    """pwrite(2) every byte of ``data``. A write may be short (a filesystem filling up
    writes what fits): the rest is written again, and that attempt reports the error.
    A short write taken for a whole one would leave a hole in the image that only the
    recovery would find, by refusing the image."""
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            with view[done:] as rest:
                n = os.pwrite(fd, rest, offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, f"pwrite wrote nothing at offset {offset + done}")
            done += n
        return done


class ImageWriter:
    """Builds one handover image in a temporary file; :meth:`commit` makes it current.

    Used in two steps, as live update wants it: ``prepare`` copies every preserved
    file's contents while services still run (:meth:`copy_contents`); ``freeze``, the
    blackout, only re-checks them chunk by chunk and rewrites what changed since
    (:meth:`refresh_contents`), then writes the index and commits.
    """

    def __init__(self, directory: Path, chunk_size: int = CHUNK_SIZE, progress: Progress | None = None) -> None:
        self.directory = directory
        self.chunk_size = chunk_size
        self.progress = progress
        self.path = directory / f".{IMAGE_NAME}.{uuid.uuid4().hex}.tmp"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        pwrite_all(self.fd, PREAMBLE.pack(MAGIC, MAJOR, MINOR, 0), 0)
        self.end = DATA_START
        self.bytes_written = 0
        self.bytes_checked = 0  # contents re-read by refresh_contents (at freeze)
        self._buffer = bytearray(chunk_size)  # each chunk of a preserved file, read into it
        self.committed = False  # renamed over the current image

    def _report(self, n: int) -> None:
        self.bytes_written += n
        if self.progress:
            self.progress(self.bytes_written, 0)

    def copy_contents(self, fd: int, size: int, mapped: bool = False) -> list[Extent]:
        """Append the data of ``fd`` (readable) to the image; return its extents.
        ``mapped``: read it through a mapping, for a file that cannot shrink."""
        extents: list[Extent] = []
        for start, length in data_ranges(fd, size):
            image_off = self.end = _align(self.end)
            crcs: list[int] = []
            for off, view in _chunks(fd, start, length, self._buffer, mapped):
                crcs.append(self._write_chunk(view, image_off + off - start))
                self._report(len(view))
                inject("image.copy_window")  # (named when windows were the unit; a chunk now)
                if pause := delay("image.copy_chunk"):  # tests only; sleep(0) would yield the GIL
                    time.sleep(pause)
            extents.append([start, length, image_off, crcs])
            self.end = image_off + length
        return extents

    def refresh_contents(self, fd: int, size: int, extents: list[Extent], mapped: bool = False) -> list[Extent]:
        """Bring contents copied earlier up to date, rewriting only changed chunks.

        If the file's layout (size or holes) changed, its contents are copied anew.
        """
        layout = [[s, n] for s, n in data_ranges(fd, size)]
        if layout != [[e[0], e[1]] for e in extents]:
            return self.copy_contents(fd, size, mapped)
        for start, length, image_off, crcs in extents:
            for off, view in _chunks(fd, start, length, self._buffer, mapped):
                self.bytes_checked += len(view)
                n = (off - start) // self.chunk_size
                if crc32(view) != crcs[n]:
                    crcs[n] = self._write_chunk(view, image_off + off - start)
                    self._report(len(view))
                inject("image.refresh_window")
                if pause := delay("image.refresh_chunk"):  # tests only; sleep(0) would yield the GIL
                    time.sleep(pause)
        return extents

    def sync(self) -> None:
        """Make what was written so far durable (prepare's copy, before the blackout)."""
        os.fsync(self.fd)

    def _write_chunk(self, view: memoryview, image_offset: int) -> int:
        """Write one chunk; return the CRC of exactly the bytes written.

        The file may change while it is read (prepare runs beside the service: a guest's
        RAM changes all the time), so the checksum and the write both take one copy in
        the buffer. A checksum of the live map and a write of it a moment later could
        disagree; if the bytes then changed back before the freeze, the freeze would see
        nothing to rewrite and the image would fail its own check.
        """
        with memoryview(self._buffer)[:len(view)] as copy:
            if view.obj is not self._buffer:  # a view of a mapping: the live file
                copy[:] = view
            pwrite_all(self.fd, copy, image_offset)
            return crc32(copy)

    def commit(self, index: dict[str, Any]) -> Path:
        """Write the index and trailer, make the image durable and current; return its path."""
        index = dict(index, chunk_size=self.chunk_size)
        blob = msgpack.packb(index, use_bin_type=True)
        index_offset = _align(self.end)
        preamble = PREAMBLE.pack(MAGIC, MAJOR, MINOR, 0)
        digest = hashlib.sha256(preamble + blob).digest()
        inject("commit.before_index")
        pwrite_all(self.fd, blob, index_offset)
        inject("commit.after_index")
        pwrite_all(self.fd, TRAILER.pack(TRAILER_MAGIC, index_offset, len(blob), self.end, digest),
                  index_offset + len(blob))
        # fsync before rename: otherwise a crash can leave the new name pointing at a
        # file whose data never reached the disk (the ext4 "zero-length file" case).
        inject("commit.before_fsync")
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = -1
        final = self.directory / IMAGE_NAME
        inject("commit.before_rename")
        os.rename(self.path, final)
        self.committed = True
        fsync_directory(self.directory)
        inject("commit.after_rename")
        return final

    def abort(self) -> None:
        """Drop the temporary file; the previous image, if any, stays current."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


def fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def writer_info(boot_id: str, kexec_count: int) -> dict[str, Any]:
    from .. import __version__
    return {"boot_id": boot_id, "kexec_count": kexec_count, "hostname": socket.gethostname(),
            "created": time.time(), "version": __version__}


# ---------------------------------------------------------------------------- reading

_RECORD_FIELDS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "instance": {"name": str, "uid": int, "gid": int, "mode": int, "ino": int},
    "file": {"instance": str, "token": int, "kind": str},
}
# The schema's ranges: an integer out of its range is as wrong as a string in its place.
_RANGES: dict[str, tuple[int, int]] = {
    "uid": (0, (1 << 32) - 2), "gid": (0, (1 << 32) - 2), "mode": (0, 0o7777), "ino": (0, (1 << 63) - 1),
    "token": (0, (1 << 64) - 1), "kexec_count": (0, (1 << 63) - 1),
    "max_files": (0, (1 << 63) - 1), "max_bytes": (0, (1 << 63) - 1),
}
# Fields a record may lack (written only when set): checked like the others when present.
_OPTIONAL_FIELDS: dict[str, dict[str, type]] = {"instance": {"max_files": int, "max_bytes": int}}


@dataclass
class HandoverImage:
    """A handover image read back and checked: its index, and its contents on demand."""

    path: Path
    fd: int
    size: int
    version: tuple[int, int]
    writer: dict[str, Any]
    state: str
    chunk_size: int
    data_end: int
    instances: list[dict[str, Any]] = field(default_factory=list)
    files: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    _seen: set[tuple[str, Any]] = field(default_factory=set, repr=False)  # names, inodes, tokens: once each
    _advised: int = field(default=0, repr=False)  # the image offset up to which read-ahead was asked for

    @classmethod
    def open(cls, path: Path) -> HandoverImage:
        """Read and check the preamble, trailer, index and schema (not the contents)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
        try:
            return cls._parse(path, fd)
        except ImageError:
            os.close(fd)
            raise
        except Exception as exc:  # a parser must never take the daemon down
            os.close(fd)
            raise ImageError(f"{path}: unreadable: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _parse(cls, path: Path, fd: int) -> HandoverImage:
        size = os.fstat(fd).st_size
        if size < DATA_START + TRAILER.size:
            raise ImageError(f"{path}: truncated: {size} bytes is less than an empty image")
        preamble = os.pread(fd, PREAMBLE.size, 0)
        magic, major, minor, _flags = PREAMBLE.unpack(preamble)
        if magic != MAGIC:
            raise ImageError(f"{path}: bad magic {magic!r}: not a kexecfs handover image")
        if major != MAJOR:
            raise ImageError(f"{path}: format version {major}.{minor} is not readable by this kexecfs "
                             f"(reads {MAJOR}.x); upgrade kexecfs to recover it")
        tmagic, index_offset, index_len, data_end, digest = TRAILER.unpack(
            os.pread(fd, TRAILER.size, size - TRAILER.size))
        if tmagic != TRAILER_MAGIC:
            raise ImageError(f"{path}: no trailer: the image is truncated or was never completed")
        if not (DATA_START <= data_end <= index_offset and index_len <= MAX_INDEX
                and index_offset + index_len + TRAILER.size == size):
            raise ImageError(f"{path}: trailer offsets are inconsistent with a {size}-byte file "
                             f"(index at {index_offset}, {index_len} bytes, data end {data_end})")
        blob = os.pread(fd, index_len, index_offset)
        if hashlib.sha256(preamble + blob).digest() != digest:
            raise ImageError(f"{path}: index checksum mismatch: the image is damaged")
        index = msgpack.unpackb(blob, raw=False, strict_map_key=True,
                                max_array_len=MAX_RECORDS, max_map_len=1 << 16)
        if not isinstance(index, dict):
            raise ImageError(f"{path}: the index is a {type(index).__name__}, not a map")
        writer = _expect(index, "writer", dict, path)
        kexec_count = _expect(writer, "kexec_count", int, path)
        if not _in_range("kexec_count", kexec_count):
            raise ImageError(f"{path}: writer kexec_count {kexec_count} out of range")
        next_ino = writer.get("next_instance_ino", 0)  # absent in images before it was recorded
        if not _is_int(next_ino) or not 0 <= next_ino < 1 << 47 or next_ino % 16:  # INO_STRIDE (machine.py)
            raise ImageError(f"{path}: writer next_instance_ino {next_ino!r} is not an instance inode number")
        state = _expect(index, "state", str, path)
        chunk_size = _expect(index, "chunk_size", int, path)
        records = _expect(index, "records", list, path)
        if not PAGE <= chunk_size <= 1 << 30:
            raise ImageError(f"{path}: chunk size {chunk_size} out of range")
        image = cls(path=path, fd=fd, size=size, version=(major, minor), writer=writer, state=state,
                    chunk_size=chunk_size, data_end=data_end)
        for n, record in enumerate(records):
            image._add_record(n, record)
        return image

    def _add_record(self, n: int, record: Any) -> None:
        where = f"{self.path}: record {n}"
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise ImageError(f"{where}: not a map with a type")
        fields = _RECORD_FIELDS.get(record["type"])
        if fields is None:
            self.warnings.append(f"{where}: skipped a record of unknown type {record['type']!r}")
            log.warning("%s", self.warnings[-1])
            return
        optional = {k: t for k, t in _OPTIONAL_FIELDS.get(record["type"], {}).items() if k in record}
        for key, typ in {**fields, **optional}.items():
            if not isinstance(record.get(key), typ) or isinstance(record.get(key), bool):
                raise ImageError(f"{where}: field {key!r} missing or not {typ.__name__}")
            if isinstance(record[key], int) and not _in_range(key, record[key]):
                raise ImageError(f"{where}: field {key!r} = {record[key]} out of range")
        if record["type"] == "instance":
            try:
                check_name(record["name"])
            except Exception as exc:
                raise ImageError(f"{where}: {exc}") from None
            keys = {("name", record["name"]), ("ino", record["ino"])}
            if keys & self._seen:
                raise ImageError(f"{where}: a second instance named {record['name']!r} or numbered {record['ino']}")
            self._seen |= keys
            self.instances.append(record)
        else:
            kind = KINDS.get(record["kind"])  # an unknown kind is skipped by the recovery, with a warning
            problem = kind.check_record(record) if kind else None
            if problem:
                raise ImageError(f"{where}: bad {record['kind']} record: {problem}")
            for extent in record.get("extents", []):
                self._check_extent(where, extent)
            key = ("token", (record["instance"], record["token"]))
            if key in self._seen:
                raise ImageError(f"{where}: token {record['token']} of {record['instance']!r} appears twice")
            self._seen.add(key)
            self.files.append(record)

    def _check_extent(self, where: str, extent: Any) -> None:
        ok = (isinstance(extent, list) and len(extent) == 4 and all(_is_int(v) for v in extent[:3])
              and isinstance(extent[3], list))
        if ok:
            start, length, image_off, crcs = extent
            ok = (0 <= start < 1 << 63 and length > 0 and image_off >= DATA_START
                  and image_off + length <= self.data_end and len(crcs) == -(-length // self.chunk_size)
                  and all(_is_int(c) and 0 <= c < 1 << 32 for c in crcs))
        if not ok:
            raise ImageError(f"{where}: malformed extent {str(extent)[:80]}")

    def _walk(self, extents: list[Extent], sink: Callable[[int, memoryview], None] | None) -> None:
        chunk = self.chunk_size
        for start, length, image_off, crcs in extents:
            for off, view in _windows(self.fd, image_off, length):
                self._read_ahead(off, off + len(view))
                first = (off - image_off) // chunk
                for i in range(0, len(view), chunk):
                    if crc32(view[i:i + chunk]) != crcs[first + i // chunk]:
                        raise ImageError(f"{self.path}: checksum mismatch in contents at image offset "
                                         f"{off + i}: the image is damaged")
                if sink:
                    sink(start + off - image_off, view)

    def _read_ahead(self, start: int, end: int) -> None:
        """Ask for READ_AHEAD beyond ``end``, a WINDOW or more at a time and each byte once:
        the advice walks the page cache even where the pages are there already, so asking
        again for every small file would cost more than it saves."""
        want = end + READ_AHEAD
        if want - self._advised >= WINDOW or start > self._advised:
            begin = max(start, self._advised)
            os.posix_fadvise(self.fd, begin, want - begin, os.POSIX_FADV_WILLNEED)
            self._advised = want

    def verify(self, progress: Progress | None = None) -> None:
        """Check every chunk of contents against its checksum."""
        total = sum(e[1] for f in self.files for e in f.get("extents", []))
        done = 0
        for record in self.files:
            self._walk(record.get("extents", []), None)
            done += sum(e[1] for e in record.get("extents", []))
            if progress:
                progress(done, total)

    def copy_into(self, fd: int, extents: list[Extent]) -> None:
        """Write contents into ``fd`` at their file offsets, checking every chunk."""
        self._walk(extents, lambda off, view: pwrite_all(fd, view, off))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def describe(self) -> dict[str, Any]:
        """The image as plain data (for ``kexecfs image show``), contents summarised."""
        return {
            "path": str(self.path), "size": self.size, "format": f"{self.version[0]}.{self.version[1]}",
            "writer": self.writer, "state": self.state, "chunk_size": self.chunk_size,
            "instances": self.instances,
            "files": [{k: (v.hex() if isinstance(v, bytes) else v) for k, v in f.items() if k != "extents"}
                      | {"extents": [{"offset": e[0], "length": e[1], "image_offset": e[2], "chunks": len(e[3])}
                                     for e in f.get("extents", [])]} for f in self.files],
            "warnings": self.warnings,
        }


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _in_range(key: str, value: int) -> bool:
    low, high = _RANGES.get(key, (-(1 << 64), 1 << 64))
    return low <= value <= high


def _expect(index: dict[str, Any], key: str, typ: type, path: Path) -> Any:
    value = index.get(key)
    if not isinstance(value, typ) or isinstance(value, bool):
        raise ImageError(f"{path}: index field {key!r} missing or not {typ.__name__}")
    return value
