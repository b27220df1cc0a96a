"""Tier 2: the machine-readable interfaces (SPEC section 11) through a real mount and the
installed command: typed, versioned JSON (status, instances), the preflight check, and
the Prometheus metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import NOBODY, ROOT, Daemon, sh

NoneType = type(None)
# The documented schema (docs/json.md), written out here so that the code cannot drift from it.
STATUS_SCHEMA: dict[str, tuple[type, ...]] = {
    "version": (int,), "mount": (str,), "state": (str,), "boot_id": (str,), "kexec_count": (int,),
    "instances": (int,), "preserved_files": (int,), "preserved_bytes": (int,), "image_dir": (str,),
    "last_image": (str, NoneType), "last_error": (str, NoneType), "progress": (str, NoneType),
    "last_freeze_seconds": (float, NoneType), "last_recovery_seconds": (float, NoneType),
    "last_blackout_seconds": (float, NoneType), "recovery_failures": (int,), "unrestorable_files": (int,),
    "restore": (str,),
}
INSTANCE_SCHEMA: dict[str, tuple[type, ...]] = {
    "name": (str,), "state": (str,), "owner": (dict,), "files": (int,), "bytes": (int,), "image_bytes": (int,),
    "limits": (dict,), "preserved": (list,),
}
FILE_SCHEMA: dict[str, tuple[type, ...]] = {
    "token": (int,), "kind": (str,), "size": (int,), "access": (str,), "problem": (str, NoneType)}


def kexecfs(mnt: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kexecfs", "--mount", str(mnt), *args], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def json_of(mnt: Path, *args: str) -> Any:
    r = kexecfs(mnt, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def assert_schema(document: dict[str, Any], schema: dict[str, tuple[type, ...]], where: str) -> None:
    assert set(document) == set(schema), f"{where}: fields {sorted(set(document) ^ set(schema))} differ"
    for key, types in schema.items():
        value = document[key]
        # bool is an int to Python, but true/false is not a count in JSON
        assert isinstance(value, types) and not isinstance(value, bool), f"{where}.{key} = {value!r}"


def preserve_memfd(mnt: Path, instance: str, size: int, token: int, uid: int | None = None) -> None:
    code = (f"import os; m=os.memfd_create('x'); os.ftruncate(m, {size}); os.pwrite(m, b'x', 0)\n"
            f"open('{mnt}/{instance}/fd_preserve','w').write(f'{{m}} {token}')")
    cmd = ["/usr/bin/python3", "-c", code]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    subprocess.run(cmd, check=True, timeout=60)


def test_status_and_instances_json_are_typed(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mountpoint
    status = json_of(mnt, "status")
    assert_schema(status, STATUS_SCHEMA, "status")
    assert status["version"] == 1 and status["kexec_count"] == 0 and status["instances"] == 0
    assert status["last_image"] is None and status["last_freeze_seconds"] is None
    sh(f"mkdir {mnt}/db && chown {NOBODY}:{NOBODY} {mnt}/db && echo 5 > {mnt}/db/files.max", check=True)
    preserve_memfd(mnt, "db", 1 << 20, 1, uid=NOBODY)
    journal = tmp_path / "journal"
    journal.write_bytes(b"j" * 1000)
    sh(f"exec 5<{journal}; echo '5 2' > {mnt}/db/fd_preserve", check=True)
    sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)

    status = json_of(mnt, "status")
    assert_schema(status, STATUS_SCHEMA, "status after a kexec")
    assert (status["state"], status["kexec_count"], status["instances"], status["preserved_files"]) == \
        ("updated", 1, 1, 2)
    assert status["preserved_bytes"] == (1 << 20) + 1000 and status["last_error"] is None
    for key in ("last_freeze_seconds", "last_recovery_seconds", "last_blackout_seconds"):
        assert status[key] >= 0, key
    assert status["recovery_failures"] == 0 and status["last_image"].endswith("handover.kximg")

    listing = json_of(mnt, "instances")
    assert listing["version"] == 1 and [i["name"] for i in listing["instances"]] == ["db"]
    db = listing["instances"][0]
    assert_schema(db, INSTANCE_SCHEMA, "instance db")
    for pf in db["preserved"]:
        assert_schema(pf, FILE_SCHEMA, f"db token {pf['token']}")
    assert db["owner"] == {"uid": NOBODY, "gid": NOBODY} and db["state"] == "updated"
    assert (db["files"], db["bytes"], db["image_bytes"]) == (2, (1 << 20) + 1000, 1 << 20)
    assert db["limits"] == {"files_max": 5, "bytes_max": None}
    assert [(p["token"], p["kind"], p["access"], p["problem"]) for p in db["preserved"]] == \
        [(1, "memfd", "rw", None), (2, "file", "r", None)]


def test_a_damaged_image_counts_as_a_recovery_failure(daemon: Daemon) -> None:
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    preserve_memfd(mnt, "db", 1 << 16, 1)
    sh(f"echo prepare > {mnt}/state && echo freeze > {mnt}/state", check=True)
    daemon.kill()
    image = daemon.image_dir / "handover.kximg"
    image.write_bytes(image.read_bytes()[:-100])
    daemon.start()
    status = json_of(mnt, "status")
    assert status["recovery_failures"] == 1 and status["state"] == "normal"
    assert "recovery:" in status["last_error"] and status["last_recovery_seconds"] is None
