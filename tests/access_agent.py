#!/usr/bin/python3
"""An instance owner probing what a restore grants (run as the owner by test_t3_restore_access).

Standard library only, run with the system python: it must work as an unprivileged uid
from any checkout. Two commands:

    access_agent.py preserve MOUNT INSTANCE SPEC.json
        SPEC: [{"token", "kind": "memfd"|"file", "access": "r"|"w"|"rw"|"wa"|"rwa",
                "path" (files), "data_hex" (memfds)}]; preserves each through fd_preserve.
    access_agent.py probe MOUNT INSTANCE PLAN.json
        PLAN: [{"token", "flags"}]; opens fds/<token> with flags and, if that works and the
        open may write, tries every way of writing. OUT: [{"token", "flags", "open": errno
        (0 = opened), "writes": {op: errno}}] as JSON on stdout.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import mmap
import os
import sys

ACCESS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR,
          "wa": os.O_WRONLY | os.O_APPEND, "rwa": os.O_RDWR | os.O_APPEND}
RWF_NOAPPEND = 0x20  # pwritev2: ignore O_APPEND for this write (Linux 6.9)
_libc = ctypes.CDLL(None, use_errno=True)


def _descriptor(entry: dict) -> int:
    flags = ACCESS[entry["access"]] | os.O_CLOEXEC
    if entry["kind"] == "file":
        return os.open(entry["path"], flags)
    memfd = os.memfd_create(f"agent-{entry['token']}", os.MFD_CLOEXEC)
    os.write(memfd, bytes.fromhex(entry["data_hex"]))
    # The access under test: a second open of the same memfd, as /proc/self/fd allows.
    fd = os.open(f"/proc/self/fd/{memfd}", flags)
    os.close(memfd)
    return fd


def preserve(mount: str, instance: str, spec_path: str) -> None:
    with open(spec_path) as f:
        spec = json.load(f)
    for entry in spec:
        fd = _descriptor(entry)
        with open(f"{mount}/{instance}/fd_preserve", "w") as ctl:
            ctl.write(f"{fd} {entry['token']}\n")
        os.close(fd)


def _attempt(fn) -> int:  # type: ignore[no-untyped-def]
    try:
        fn()
        return 0
    except OSError as exc:
        return exc.errno or errno.EIO


def _shared_map_write(fd: int) -> None:
    if os.fstat(fd).st_size < 4096:  # a store beyond the end would be SIGBUS, not an answer
        raise OSError(errno.ENXIO, "too short to map")
    with mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        m[0:2] = b"MM"


def _fallocate(fd: int) -> None:
    # The system call itself: glibc's posix_fallocate would emulate it with writes.
    if _libc.fallocate(fd, 0, ctypes.c_long(0), ctypes.c_long(1 << 16)) != 0:
        raise OSError(ctypes.get_errno(), "fallocate")


def _clear_append_then_pwrite(fd: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_APPEND)
    os.pwrite(fd, b"SS", 0)


def _writes(fd: int) -> dict[str, int]:
    """Every way of writing; the test judges the outcome by the file's contents."""
    return {
        "write": _attempt(lambda: os.write(fd, b"WW")),
        "pwrite@0": _attempt(lambda: os.pwrite(fd, b"PP", 0)),
        "writev": _attempt(lambda: os.writev(fd, [b"V", b"V"])),
        "pwritev2 RWF_NOAPPEND@0": _attempt(lambda: os.pwritev(fd, [b"NN"], 0, RWF_NOAPPEND)),
        "mmap shared write": _attempt(lambda: _shared_map_write(fd)),
        "fallocate": _attempt(lambda: _fallocate(fd)),
        "ftruncate": _attempt(lambda: os.ftruncate(fd, 1)),
        "F_SETFL ~O_APPEND, pwrite@0": _attempt(lambda: _clear_append_then_pwrite(fd)),
    }


def probe(mount: str, instance: str, plan_path: str) -> None:
    with open(plan_path) as f:
        plan = json.load(f)
    results = []
    for step in plan:
        flags = step["flags"]
        result = {"token": step["token"], "flags": flags, "open": 0, "writes": {}}
        try:
            fd = os.open(f"{mount}/{instance}/fds/{step['token']}", flags | os.O_CLOEXEC)
        except OSError as exc:
            result["open"] = exc.errno
        else:
            if flags & os.O_ACCMODE != os.O_RDONLY:
                result["writes"] = _writes(fd)
            os.close(fd)
        results.append(result)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"preserve": preserve, "probe": probe}[command](*args)
