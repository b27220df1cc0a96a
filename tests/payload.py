"""Payloads: preserved files whose every byte is known, and the one digest that checks them.

The standard-library half of the test harness (:mod:`harness` is the rest): the programs
the tests run as other uids under the system python (``service.py``, ``hard/load_worker.py``)
import it from the public copy, where pytest is not installed. Whatever makes or checks a
payload, in the test process or in such a program, uses these functions, so that what one
side records the other side computes the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
from dataclasses import dataclass
from typing import Any

MiB = 1 << 20
STEP = 4 * MiB  # what digest() and fill() hold in memory at a time
SEAL_NAMES = {"shrink": fcntl.F_SEAL_SHRINK, "grow": fcntl.F_SEAL_GROW, "write": fcntl.F_SEAL_WRITE,
              "seal": fcntl.F_SEAL_SEAL}


def digest(source: int | str | os.PathLike[str], size: int | None = None) -> str:
    """The sha256 (hex) of the first ``size`` bytes (all, by default) of a descriptor or a
    path; a descriptor is read with pread, so its position is untouched."""
    if not isinstance(source, int):
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return digest(fd, size)
        finally:
            os.close(fd)
    if size is None:
        size = os.fstat(source).st_size
    h = hashlib.sha256()
    off = 0
    while off < size:
        chunk = os.pread(source, min(STEP, size - off), off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest()


def fill(fd: int, start: int, length: int, rng: random.Random) -> None:
    """Write ``length`` bytes of ``rng``'s data at ``start``: every page differs from every
    other, so a page copied to the wrong place changes the digest."""
    off = start
    while off < start + length:
        n = min(STEP, start + length - off)
        os.pwrite(fd, rng.randbytes(n), off)
        off += n


def seals_of(names: list[str] | int) -> int:
    """F_SEAL_* bits from a number or from names ("shrink", "grow", "write", "seal"), as JSON specs give them."""
    if isinstance(names, int):
        return names
    bits = 0
    for name in names:
        bits |= SEAL_NAMES[name]
    return bits


def make_memfd(name: str, size: int, *, islands: int = 0, seals: int = 0, pos: int = 0, seed: int = 0) -> int:
    """A memfd of ``size`` bytes of seeded random data, or of ``islands`` 4 KiB islands of
    it in a sea of holes; positioned at ``pos``, with ``seals`` added last."""
    rng = random.Random(seed)
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    if islands:
        for i in range(islands):
            off = min(size - 4096, i * (size // islands)) // 4096 * 4096
            os.pwrite(fd, rng.randbytes(4096), off)
    else:
        fill(fd, 0, size, rng)
    os.lseek(fd, pos, os.SEEK_SET)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def make_regular(path: str | os.PathLike[str], size: int, *, pos: int = 0, seed: int = 0) -> int:
    """A regular file of ``size`` bytes of seeded random data, opened read-write at ``pos``."""
    with open(path, "wb") as f:
        f.write(random.Random(seed).randbytes(size))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    os.lseek(fd, pos, os.SEEK_SET)
    return fd


@dataclass
class File:
    """One preserved file: the descriptor its service holds, and what a restore must give back."""

    instance: str
    token: int
    kind: str  # memfd | file
    fd: int
    size: int = 0
    pos: int = 0
    seals: int = 0
    sha256: str = ""

    def snapshot(self) -> File:
        """Record what the file holds now: what a recovery must give back."""
        self.size = os.fstat(self.fd).st_size
        self.sha256 = digest(self.fd, self.size)
        self.pos = os.lseek(self.fd, 0, os.SEEK_CUR)
        self.seals = fcntl.fcntl(self.fd, fcntl.F_GET_SEALS) if self.kind == "memfd" else 0
        return self

    @property
    def expected(self) -> tuple[int, int, int, str]:
        """(size, position, seals, sha256): what the checks compare."""
        return self.size, self.pos, self.seals, self.sha256

    def record(self) -> dict[str, Any]:
        """The snapshot as JSON-able data (the descriptor stays behind)."""
        return {"instance": self.instance, "token": self.token, "kind": self.kind, "size": self.size,
                "pos": self.pos, "seals": self.seals, "sha256": self.sha256}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


def from_spec(instance: str, spec: dict[str, Any]) -> File:
    """A File made as a JSON spec says: {"token", "kind": "memfd"|"file", "size", "pos",
    "islands", "seals" (names or bits), "path" (an existing file, for "file")}. Its
    contents are seeded by its token; it is not snapshot yet."""
    token, pos = spec["token"], spec.get("pos", 0)
    if spec["kind"] == "memfd":
        fd = make_memfd(f"svc-{instance}-{token}", spec["size"], islands=spec.get("islands", 0),
                        seals=seals_of(spec.get("seals", 0)), pos=pos, seed=token)
    else:
        fd = os.open(spec["path"], os.O_RDWR | os.O_CLOEXEC)
        os.lseek(fd, pos, os.SEEK_SET)
    return File(instance, token, spec["kind"], fd)
