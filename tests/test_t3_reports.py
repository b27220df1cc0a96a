"""Tier 2: the machine-readable interfaces (SPEC section 11) through a real mount and the
installed command: typed, versioned JSON (status, instances), the preflight check, and
the Prometheus metrics."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness import FUSE_SKIP, NOBODY, ROOT, Daemon, in_kernel_with_kexec, serving, sh

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


def json_of(mnt: Path, *args: str, status: int = 0) -> Any:
    r = kexecfs(mnt, *args, "--json")
    assert r.returncode == status, r.stderr
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


def test_a_damaged_image_counts_as_a_recovery_failure(tmp_path: Path) -> None:
    """The daemon is killed after freeze with nothing kept outside it (a restart with its
    keeper would resume frozen, reading no image): the next one has the image alone."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    (tmp_path / "mnt").mkdir()
    with serving(Daemon(tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log",
                        env={"KEXECFS_FD_STORE": "none"})) as daemon:
        _damaged_image_counts(daemon)


def _damaged_image_counts(daemon: Daemon) -> None:
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


# ---------------------------------------------------------------------------- kexecfs check

CHECKS = {"mount", "pidfd_getfd", "passthrough", "image_dir", "free_space", "kexec_loaded", "luo", "state", "instance"}


def check(mnt: Path, *args: str, loaded: str | None = "0") -> tuple[int, list[str]]:
    r = in_kernel_with_kexec(sys.executable, "-m", "kexecfs", "--mount", str(mnt), "check", *args, loaded=loaded)
    assert not r.stderr, r.stderr
    return r.returncode, r.stdout.splitlines()


def check_json(mnt: Path, status: int = 0) -> Any:
    r = in_kernel_with_kexec(sys.executable, "-m", "kexecfs", "--mount", str(mnt), "check", "--json")
    assert r.returncode == status, r.stdout + r.stderr
    return json.loads(r.stdout)


def test_check_says_ready_with_one_line_per_finding(daemon: Daemon) -> None:
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    preserve_memfd(mnt, "db", 1 << 20, 1)
    code, lines = check(mnt)
    assert code == 0, lines
    assert lines[-1] == "Ready for a live update."
    findings = lines[:-1]
    assert all(line.split()[0] in ("ok", "warn") for line in findings), findings
    assert any(line.startswith("ok    pidfd_getfd:") for line in findings), findings
    assert any(line.startswith("ok    image_dir:") and str(daemon.image_dir) in line for line in findings)
    assert any(line.startswith("ok    instance db: normal, 1 file(s)") for line in findings), findings
    assert any(line.startswith("warn  kexec_loaded: no kernel is loaded") for line in findings), findings
    assert check(mnt, loaded="1")[0] == 0
    code, lines = check(mnt, "--quiet", loaded=None)
    assert code == 1 and lines == ["fail  kexec_loaded: /sys/kernel/kexec_loaded is missing: the running kernel "
                                   "cannot kexec (CONFIG_KEXEC or CONFIG_KEXEC_FILE); fix: boot a kernel built "
                                   "with kexec"], lines
    report = check_json(mnt)
    assert report["version"] == 1 and report["ready"] is True
    assert {f["check"] for f in report["findings"]} >= CHECKS
    for f in report["findings"]:
        assert_schema(f, {"check": (str,), "level": (str,), "message": (str,), "fix": (str, NoneType),
                          "instance": (str, NoneType), "token": (int, NoneType)}, f"finding {f['check']}")


def test_check_names_the_file_that_would_fail_prepare_and_its_fix(daemon: Daemon, tmp_path: Path) -> None:
    """A preserved regular file deleted on disk fails every prepare on the host: check says
    so before, naming instance and token, and the one command it prints clears it."""
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    preserve_memfd(mnt, "db", 4096, 1)
    victim = tmp_path / "journal"
    victim.write_bytes(b"j" * 100)
    sh(f"exec 5<>{victim}; echo '5 3' > {mnt}/db/fd_preserve; rm {victim}", check=True)
    code, lines = check(mnt)
    assert code == 1 and lines[-1] == "Not ready for a live update.", lines
    failures = [line for line in lines if line.startswith("fail")]
    fix = f"echo 3 > {mnt}/db/fd_unpreserve"
    assert failures == [f"fail  instance db token 3: is no longer a file: a deleted regular file on "
                        f"a filesystem of type 0xef53; fix: {fix}"], failures
    assert "write error" in sh(f"echo prepare > {mnt}/state").stderr, "the same condition fails prepare"
    (finding,) = [f for f in check_json(mnt, status=1)["findings"] if f["level"] == "fail"]
    assert (finding["instance"], finding["token"], finding["fix"]) == ("db", 3, fix)
    sh(fix, check=True)
    assert check(mnt)[0] == 0
    sh(f"echo prepare > {mnt}/state", check=True)


def test_check_fails_over_bytes_max_and_in_updated(daemon: Daemon) -> None:
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    preserve_memfd(mnt, "db", 1 << 20, 1)
    sh(f"echo 4096 > {mnt}/db/bytes.max", check=True)  # below what it holds: prepare would refuse (EDQUOT)
    code, lines = check(mnt, "--quiet")
    assert code == 1 and len(lines) == 1 and "over its bytes.max of 4096" in lines[0], lines
    sh(f"echo max > {mnt}/db/bytes.max && echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    code, lines = check(mnt, "--quiet")
    assert code == 1 and lines == [f"fail  state: updated: the last update is not finished, so prepare is "
                                   f"refused; fix: echo finish > {mnt}/state (drops what was not restored)"]


def test_check_fails_for_an_image_dir_on_tmpfs_without_room(tmp_path: Path) -> None:
    """tmpfs is RAM of the old kernel: an image there does not survive a real kexec. This
    one is also too small for what is preserved."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    images = tmp_path / "ram"
    images.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(images)], check=True)
    d = Daemon(tmp_path / "mnt", images / "img", tmp_path / "log")
    d.mountpoint.mkdir()
    try:
        d.start()
        sh(f"mkdir {d.mountpoint}/vm", check=True)
        preserve_memfd(d.mountpoint, "vm", 4 << 20, 1)
        code, lines = check(d.mountpoint, "--quiet")
        assert code == 1
        assert [line.split(":")[0] for line in lines] == ["fail  image_dir", "fail  free_space"], lines
        assert "is on tmpfs" in lines[0] and "the image needs 4.0 MiB" in lines[1]
    finally:
        d.stop()
        subprocess.run(["umount", "-l", str(images)])


def test_check_without_a_mount(tmp_path: Path) -> None:
    code, lines = check(tmp_path)
    assert code == 1 and lines[0].startswith(f"fail  mount: {tmp_path}") and "fix: systemctl start" in lines[0]


def test_check_reports_luo(tmp_path: Path) -> None:
    """A kernel with LUO has /dev/liveupdate; kexecfs works with or without it."""
    r = in_kernel_with_kexec(sys.executable, "-m", "kexecfs", "--mount", str(tmp_path), "check")
    has_luo = os.path.exists("/dev/liveupdate")
    assert [line for line in r.stdout.splitlines() if line.startswith("ok    luo:")] == [
        f"ok    luo: the running kernel has {'' if has_luo else 'no '}LUO (/dev/liveupdate"
        + (")" if has_luo else " is missing): kexecfs hands files over through its image")], r.stdout


# ---------------------------------------------------------------------------- kexecfs metrics

SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)')


def parse_exposition(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The Prometheus text format (0.0.4), strictly: every sample's family has its HELP and
    TYPE lines first, once; names, labels and values are well formed. {family: {labels: value}}."""
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    helped, typed = set(), {}
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped, f"two HELP lines for {name}"
            helped.add(name)
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert kind in ("gauge", "counter") and name not in typed, line
            typed[name] = kind
        else:
            m = SAMPLE.fullmatch(line)
            assert m, f"not a sample line: {line!r}"
            name, labels, value = m.groups()
            assert name in helped and name in typed, f"{name} has no HELP or TYPE before its samples"
            assert typed[name] != "counter" or name.endswith("_total"), f"counter {name} without _total"
            key = tuple(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or ""))
            # Prometheus sets job and instance on every scraped series: a target's own would be renamed.
            assert not {"job", "instance"} & {k for k, _ in key}, line
            assert key not in families.setdefault(name, {}), f"{name}{key} twice"
            families[name][key] = float(value)
    return families


def metrics(mnt: Path, *args: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    r = kexecfs(mnt, "metrics", *args)
    assert r.returncode == 0 and not r.stderr, r.stderr
    return parse_exposition(r.stdout)


def test_metrics_in_the_prometheus_text_format(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    preserve_memfd(mnt, "db", 1 << 20, 1)
    victim = tmp_path / "journal"
    victim.write_bytes(b"j" * 100)
    sh(f"exec 5<>{victim}; echo '5 2' > {mnt}/db/fd_preserve; rm {victim}", check=True)
    m = metrics(mnt)
    db = (("kexecfs_instance", "db"),)
    assert m["kexecfs_up"] == {(): 1}
    assert m["kexecfs_state"] == {(("state", s),): float(s == "normal") for s in ("normal", "prepared", "frozen", "updated")}
    assert m["kexecfs_instance_state"][(("kexecfs_instance", "db"), ("state", "normal"))] == 1
    assert (m["kexecfs_preserved_files"][db], m["kexecfs_preserved_bytes"][db], m["kexecfs_image_bytes"][db]) == \
        (2, (1 << 20) + 100, 1 << 20)
    assert m["kexecfs_blocked_files"][db] == 1, "the deleted file blocks the next prepare"
    assert "kexecfs_last_freeze_seconds" not in m, "never measured: absent, not 0"
    sh(f"echo 2 > {mnt}/db/fd_unpreserve && echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    m = metrics(mnt)
    assert m["kexecfs_state"][(("state", "updated"),)] == 1 and m["kexecfs_kexec_count"] == {(): 1}
    assert m["kexecfs_blocked_files"][db] == 0 and m["kexecfs_recovery_failures_total"] == {(): 0}
    for name in ("kexecfs_last_freeze_seconds", "kexecfs_last_recovery_seconds", "kexecfs_last_blackout_seconds"):
        assert m[name][()] >= 0, name


def test_metrics_textfile_for_node_exporter(daemon: Daemon, tmp_path: Path) -> None:
    """--textfile replaces the file whole (a temporary file renamed over it): node_exporter's
    textfile collector never reads half of one."""
    collector = tmp_path / "textfile"
    collector.mkdir()
    target = collector / "kexecfs.prom"
    target.write_text("stale\n")
    r = kexecfs(daemon.mountpoint, "metrics", "--textfile", str(target))
    assert r.returncode == 0 and r.stdout == "" and not r.stderr, r.stderr
    assert parse_exposition(target.read_text())["kexecfs_up"] == {(): 1}
    assert os.listdir(collector) == ["kexecfs.prom"] and target.stat().st_mode & 0o777 == 0o644


def test_metrics_without_a_mount_say_down(tmp_path: Path) -> None:
    assert metrics(tmp_path) == {"kexecfs_up": {(): 0}}


def test_client_commands_load_neither_pyfuse3_nor_trio() -> None:
    """The kexecfs command's client side (status, instances, check, metrics, the shutdown
    hook) runs where FUSE libraries may be missing and starts fast: only mount loads them."""
    code = ("import sys, kexecfs.cli, kexecfs.report, kexecfs.preflight, kexecfs.metrics, kexecfs.systemd\n"
            "print(sorted(m for m in ('pyfuse3', 'trio', 'kexecfs._fusehook') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
