#!/usr/bin/python3
"""Runs a list of filesystem operations as whoever starts it (setpriv, unshare) and
prints, as JSON, what each one answered: "ok" or the errno's name. Standard library
only (and kexecfs.abi, which is): it runs under the system python as any uid, inside any
namespace.

    perm_agent.py '[["id", "op", "path", args...], ...]'
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout (or its public copy)
from kexecfs.abi import (FD_PRESERVE, FD_RESTORE, FD_UNPRESERVE, GET_STATE, LIVEUPDATE_FD, PREPARE,  # noqa: E402
                         STATE, TOKEN)


def _memfd() -> int:
    fd = os.memfd_create("perm-agent")
    os.write(fd, b"agent data")
    return fd


def _ioctl(path: str, cmd: int, arg: bytes = b"") -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if arg:
            fcntl.ioctl(fd, cmd, bytearray(arg))
        else:
            fcntl.ioctl(fd, cmd)
    finally:
        os.close(fd)


def run(op: str, path: str, *args: object) -> str | None:
    """Do one operation; return a detail worth checking (read contents), or None."""
    if op == "read":
        with open(path, "rb") as f:
            return f.read(4096).decode(errors="replace")
    if op == "write":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, str(args[0]).encode())
        finally:
            os.close(fd)
    elif op == "preserve":
        m = _memfd()
        fd = os.open(path, os.O_WRONLY)
        try:
            os.write(fd, f"{m} {args[0]}".encode())
        finally:
            os.close(fd)
    elif op == "ioctl_preserve":
        _ioctl(path, FD_PRESERVE, LIVEUPDATE_FD.pack(_memfd(), 0, int(args[0])))  # type: ignore[call-overload]
    elif op == "ioctl_unpreserve":
        _ioctl(path, FD_UNPRESERVE, TOKEN.pack(int(args[0])))  # type: ignore[call-overload]
    elif op == "ioctl_restore":
        _ioctl(path, FD_RESTORE, LIVEUPDATE_FD.pack(-1, 0, int(args[0])))  # type: ignore[call-overload]
    elif op == "ioctl_get_state":
        _ioctl(path, GET_STATE, bytes(STATE.size))
    elif op == "ioctl_prepare":
        _ioctl(path, PREPARE)
    elif op == "open":
        fd = os.open(path, int(args[0]))  # type: ignore[call-overload]
        try:
            return os.pread(fd, 64, 0).decode(errors="replace") if args[0] != os.O_WRONLY else None
        finally:
            os.close(fd)
    elif op == "listdir":
        return " ".join(sorted(os.listdir(path)))
    elif op == "stat":
        st = os.stat(path)
        return f"{st.st_uid} {st.st_size}"
    elif op == "getxattr":
        return os.getxattr(path, str(args[0])).decode()
    elif op == "chmod":
        os.chmod(path, int(args[0]))  # type: ignore[call-overload]
    elif op == "chown":
        os.chown(path, int(args[0]), int(args[1]))  # type: ignore[call-overload]
    elif op == "mkdir":
        os.mkdir(path)
    elif op == "rmdir":
        os.rmdir(path)
    else:
        raise ValueError(f"unknown op {op}")
    return None


def main() -> None:
    results = {}
    for op_id, op, path, *args in json.loads(sys.argv[1]):
        try:
            detail = run(op, path, *args)
            results[op_id] = ["ok", detail]
        except OSError as exc:
            results[op_id] = [errno.errorcode.get(exc.errno or 0, str(exc.errno)), None]
    print(json.dumps(results))


if __name__ == "__main__":
    main()
