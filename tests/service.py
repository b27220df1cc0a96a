#!/usr/bin/python3
"""A stand-in service for the scenario tests: preserves files before a kexec and checks
them after it, through kexecfs.client (ioctls) and the fd_preserve file, as a real one would.

    service.py preserve MOUNT INSTANCE SPEC.json DIGESTS.json
    service.py verify   MOUNT INSTANCE DIGESTS.json

SPEC is a list of files as :func:`payload.from_spec` reads them (token, kind, size, pos,
islands, seals, path), each with "via": "ioctl"|"file". DIGESTS records what was preserved
(:meth:`payload.File.record`). ``verify`` exits non-zero with a message on the first
difference. Runs under the system python as any uid: it needs only kexecfs.client and
payload, which need nothing beyond the standard library.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kexecfs.client import Kexecfs  # noqa: E402
from payload import digest, from_spec  # noqa: E402


def preserve(mount: str, name: str, spec_path: str, out_path: str) -> None:
    inst = Kexecfs(mount).instance(name)
    record = []
    for spec in json.loads(Path(spec_path).read_text()):
        f = from_spec(name, spec)
        if spec.get("via") == "file":
            (inst.path / "fd_preserve").write_text(f"{f.fd} {f.token}\n")
        else:
            inst.preserve(f.fd, f.token)
        record.append(f.snapshot().record())
    Path(out_path).write_text(json.dumps(record))


def verify(mount: str, name: str, digests_path: str) -> None:
    inst = Kexecfs(mount).instance(name)
    for want in json.loads(Path(digests_path).read_text()):
        token = want["token"]
        fd = inst.restore(token)
        size = os.fstat(fd).st_size
        got = {"size": size, "pos": os.lseek(fd, 0, os.SEEK_CUR), "sha256": digest(fd, size)}
        if want["kind"] == "memfd":
            got["seals"] = inst.seals(token)
        for key, value in got.items():
            if value != want[key]:
                sys.exit(f"{name}/{token}: {key} is {value!r}, preserved {want[key]!r}")
        again = inst.restore(token)  # opening again gives the same restored object
        if want["kind"] == "memfd" and size:
            check_coherent(fd, again, size)
        os.close(again)
        os.close(fd)
    print(f"{name}: {len(json.loads(Path(digests_path).read_text()))} file(s) restored intact")


def check_coherent(fd: int, other: int, size: int) -> None:
    """A write through one open of fds/<token> is seen through another, and through mmap."""
    old = os.pread(fd, 8, size - 8)
    os.pwrite(fd, b"COHERENT", size - 8)
    try:
        if os.pread(other, 8, size - 8) != b"COHERENT":
            sys.exit("a write through one open of fds/<token> is not seen through another")
        with mmap.mmap(other, size, prot=mmap.PROT_READ) as mm:
            if mm[size - 8:] != b"COHERENT":
                sys.exit("mmap of fds/<token> does not see a write made through read/write")
    finally:
        os.pwrite(fd, old, size - 8)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"preserve": preserve, "verify": verify}[command](*args)
