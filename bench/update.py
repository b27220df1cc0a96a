"""One live update of a set of memfds, done by kexecfs and by the plain program it is
measured against; the data-path, blackout and profile runs are made of these.

kexecfs: a fresh daemon, preserve through ``fd_preserve``, ``prepare``, ``freeze``,
simulated ``kexec``, restore (open every ``fds/<token>``), ``finish``.
The plain program (``iobench``): write the same bytes to one file on the same filesystem
and fsync it (there is no prepare step), then read them back into new memfds.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import Daemon, Workspace, close_all, make_memfd, preserve_all, restore_all, run_tool, self_fd
from .profiles import pyspy_record

# A test run on the restored files before finish (datapath's read comparison).
ReadTest = Callable[[Daemon, Path], Any]


def kexecfs_update(ws: Workspace, fds: list[int], tag: str, read_test: ReadTest | None = None,
                   restore: bool = True) -> dict[str, Any]:
    """One live update of ``fds`` through a fresh daemon: timings, RSS and image size."""
    res: dict[str, Any] = {}
    with Daemon.kexecfs(ws, tag) as m:
        inst = m.mnt / "bench"
        inst.mkdir()
        res["preserve_s"] = preserve_all(inst, fds)
        os.sync()  # earlier runs' dirty pages (baseline files, images) are not this freeze's to flush
        res["rss_before"] = m.proc_status()["VmRSS"]
        m.reset_hwm()
        res["prepare_s"] = m.event("prepare")
        res["hwm_prepare"] = m.proc_status()["VmHWM"]
        res["freeze_s"] = m.event("freeze")
        res["hwm_freeze"] = m.proc_status()["VmHWM"]
        res["image_bytes"] = m.image.stat().st_size
        m.reset_hwm()
        res["kexec_s"] = m.event("kexec")
        res["hwm_kexec"] = m.proc_status()["VmHWM"]
        res["recovery_s"] = m.last_recovery_seconds()
        if restore:
            res["restore_s"] = restore_all(inst, len(fds))
        if read_test:
            res["read"] = read_test(m, inst)
        m.event("finish")
        res["hwm_total"] = m.proc_status()["VmHWM"]
        if m.logged_traceback():
            res["traceback"] = True
        res["log"] = m.log_text()
    res["blackout_s"] = res["freeze_s"] + res["kexec_s"] + res.get("restore_s", 0.0)
    return res


def plain_update(ws: Workspace, fds: list[int], size: int) -> dict[str, Any]:
    """The plain program's update of the same memfds (each ``size`` bytes)."""
    dump = ws.work / "baseline" / "dump"
    dump.parent.mkdir(exist_ok=True)
    os.sync()
    w, f, nbytes = run_tool([ws.iobench, "pack", str(dump)], "\n".join(self_fd(fd) for fd in fds))
    (secs, _n) = run_tool([ws.iobench, "unpack", str(dump)], "\n".join(str(size) for _ in fds))
    dump.unlink()
    return {"write_s": float(w), "fsync_s": float(f), "bytes": int(nbytes), "readback_s": float(secs),
            "blackout_s": float(w) + float(f) + float(secs)}


PHASES = ("freeze", "recovery", "restore", "read")


def profile_phase(ws: Workspace, pyspy: str, phase: str, count: int, size: int) -> dict[str, Any]:
    """Re-run one live update of ``count`` memfds of ``size`` bytes, sampling ``phase``
    (one of PHASES) with py-spy; the summary of the profile."""
    assert phase in PHASES, phase
    fds = [make_memfd(size) for _ in range(count)]
    try:
        with Daemon.kexecfs(ws, "profile") as m:
            inst = m.mnt / "bench"
            inst.mkdir()
            preserve_all(inst, fds)
            os.sync()
            record = ws.work / f"profile-{phase}.txt"
            # The phases before the sampled one run unsampled, and the update is finished.
            if phase == "freeze":
                prof = pyspy_record(pyspy, m.pid, lambda: (m.event("prepare"), m.event("freeze")), record)
                m.event("kexec")
            else:
                m.event("prepare")
                m.event("freeze")
                if phase == "recovery":
                    prof = pyspy_record(pyspy, m.pid, lambda: m.event("kexec"), record)
                else:
                    m.event("kexec")
                    prof = pyspy_record(pyspy, m.pid, _restored_use(ws, phase, inst, count), record)
            m.event("finish")
            return prof
    finally:
        close_all(fds)


def _restored_use(ws: Workspace, phase: str, inst: Path, count: int) -> Callable[[], Any]:
    if phase == "restore":
        return lambda: restore_all(inst, count)
    return lambda: [run_tool([ws.iobench, "read", str(inst / "fds" / "0")]) for _ in range(3)]
