"""What a kexecfs mount reports, as typed data: the JSON of ``kexecfs status --json`` and
``kexecfs instances --json`` (the schema is documented in docs/json.md), which
``kexecfs check`` and ``kexecfs metrics`` read as well.

The tree stays the source: ``status`` is "key: value" text and every instance is a
directory; this module reads them as any user could and gives each value its type.
Numbers are JSON numbers (counts and bytes integers, durations in seconds), nothing is
``null``, and every document carries ``version``: :data:`SCHEMA_VERSION` grows only when
a field changes meaning or type or goes away (new fields do not change it).

Standard library only, like the client commands that use it.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from .core.kinds import KINDS

SCHEMA_VERSION = 1

#: The fields of the ``status`` file and their JSON types; an empty value is null.
STATUS_FIELDS: dict[str, type] = {
    "state": str, "boot_id": str, "kexec_count": int, "instances": int, "preserved_files": int,
    "preserved_bytes": int, "image_dir": str, "last_image": str, "last_error": str, "progress": str,
    "last_freeze_seconds": float, "last_recovery_seconds": float, "last_blackout_seconds": float,
    "recovery_failures": int, "unrestorable_files": int, "restore": str,
}

#: The extended attribute of ``fds/<token>`` that says why the file would fail prepare.
PROBLEM_XATTR = "user.kexecfs.problem"


def parse_status(text: str) -> dict[str, Any]:
    """The ``status`` file's lines, typed by :data:`STATUS_FIELDS` (a field this version
    does not know, from a newer daemon, stays a string)."""
    status: dict[str, Any] = {}
    for line in text.splitlines():
        key, _, value = line.partition(": ") if ": " in line else (line.rstrip(":"), "", "")
        typ = STATUS_FIELDS.get(key, str)
        status[key] = None if value == "" else typ(value)
    return status


def read_status(mount: Path) -> dict[str, Any]:
    """``kexecfs status --json``."""
    return {"version": SCHEMA_VERSION, "mount": str(mount), **parse_status((mount / "status").read_text())}


def _limit(path: Path) -> int | None:
    value = path.read_text().strip()
    return None if value == "max" else int(value)


def _problem(entry: Path) -> str | None:
    """What prepare would say about this preserved file; None if nothing, or if the caller
    may not ask (only root and the instance's owner may)."""
    try:
        return os.getxattr(entry, PROBLEM_XATTR).decode() or None
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.ENODATA, errno.ENOENT):
            return None
        raise


def read_instance(path: Path) -> dict[str, Any]:
    """One instance directory as a typed record."""
    st = path.stat()
    preserved = []
    for line in (path / "fd_preserve").read_text().splitlines():
        token, kind, size, access = line.split()
        preserved.append({"token": int(token), "kind": kind, "size": int(size), "access": access,
                          "problem": _problem(path / "fds" / token)})
    return {
        "name": path.name, "state": (path / "state").read_text().strip(),
        "owner": {"uid": st.st_uid, "gid": st.st_gid},
        "files": len(preserved), "bytes": sum(p["size"] for p in preserved),
        # What the handover image will hold (memfd contents), which bytes.max limits.
        "image_bytes": sum(p["size"] for p in preserved if KINDS.get(p["kind"]) and KINDS[p["kind"]].stores_contents),
        "limits": {"files_max": _limit(path / "files.max"), "bytes_max": _limit(path / "bytes.max")},
        "preserved": preserved,
    }


def read_instances(mount: Path) -> dict[str, Any]:
    """``kexecfs instances --json``: every instance, sorted by name."""
    instances = []
    for path in sorted(p for p in mount.iterdir() if p.is_dir()):
        try:
            instances.append(read_instance(path))
        except FileNotFoundError:
            continue  # removed while we read it
    return {"version": SCHEMA_VERSION, "mount": str(mount), "instances": instances}
