"""Sections 2 and 3, the data path: freeze, recovery and restore throughput.

Each layout (1 x 1 GiB and 1024 x 1 MiB of preserved memfds) is updated ``reps`` times
by kexecfs and by the plain program, alternately (bench/update.py); the best of each
side is compared. With one file, the restored file is also read through
``fds/<token>`` and straight from the memfd, alternately. Goals: prepare + freeze
>= 0.8x write + fsync; simulated kexec >= 0.8x read-back; reads through fds/<token>
>= 0.9x the memfd's.
"""

from __future__ import annotations

import functools
import os
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import (MiB, Daemon, Goal, Section, Workspace, close_all, fmt_bytes, make_memfd, out, print_goals,
                      progress, rate, run_tool, self_fd, table, turns)
from .update import ReadTest, kexecfs_update, plain_update, profile_phase

READ_PROFILE_SIZE = 256 * MiB  # enough reads to sample, without a 1 GiB re-run


def run(ws: Workspace, layouts: list[tuple[int, int]], reps: int, read_reps: int) -> Section:
    data = {f"{count} x {fmt_bytes(size)}": measure_layout(ws, count, size, reps, read_reps)
            for count, size in layouts}
    goals = report_freeze(data) + report_recovery(data) + report_reads(data)
    return Section("datapath", data, goals)


def measure_layout(ws: Workspace, count: int, size: int, reps: int, read_reps: int) -> dict[str, Any]:
    progress(f"freeze/recovery: {count} x {fmt_bytes(size)}, {reps} interleaved repetitions "
             "against write+fsync / read-back")
    fds = [make_memfd(size) for _ in range(count)]
    kx_runs, base_runs = [], []
    try:
        for r in range(reps):
            for side in turns(("baseline", "kexecfs"), r):
                if side == "baseline":
                    base_runs.append(plain_update(ws, fds, size))
                else:
                    read_test = read_compare(ws, fds[0], read_reps) if count == 1 else None
                    kx_runs.append(kexecfs_update(ws, fds, f"data{count}", read_test))
    finally:
        close_all(fds)
    return {"count": count, "size": size, "bytes": count * size,
            "kexecfs": [{k: v for k, v in run.items() if k != "log"} for run in kx_runs],
            "baseline": base_runs, "log_tail": kx_runs[-1]["log"].splitlines()[-12:],
            "passthrough_log": [line for run in kx_runs for line in run["log"].splitlines()
                                if "passthrough" in line.lower()][-3:]}


def _open_restored_memfd(m: Daemon, size: int) -> int:
    """A descriptor of the restored memfd that fds/0 serves, opened through the daemon's
    fd table (the daemon's own descriptors come and go; the inode stays); -1 if none."""
    for n in os.listdir(f"/proc/{m.pid}/fd"):
        try:
            if os.readlink(f"/proc/{m.pid}/fd/{n}").startswith("/memfd:"):
                fd = os.open(f"/proc/{m.pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_size == size:
                    return fd
                os.close(fd)
        except OSError:
            continue
    return -1


def read_compare(ws: Workspace, memfd: int, reps: int) -> ReadTest:
    """Read fds/0 through the mount and the memfd itself, alternately; the daemon's CPU
    time during the mount reads tells whether passthrough served them."""
    def test(m: Daemon, inst: Path) -> dict[str, Any]:
        res: dict[str, Any] = {"memfd": [], "fds": [], "daemon_cpu_share": []}
        restored = _open_restored_memfd(m, os.fstat(memfd).st_size)
        source = self_fd(restored if restored >= 0 else memfd)
        res["memfd_path"] = "the restored memfd" if restored >= 0 else "the original memfd"
        for r in range(reps):
            for which in turns(("memfd", "fds"), r):
                if which == "memfd":
                    secs, n = run_tool([ws.iobench, "read", source])
                else:
                    cpu = m.cpu()
                    secs, n = run_tool([ws.iobench, "read", str(inst / "fds" / "0")])
                    res["daemon_cpu_share"].append((m.cpu() - cpu) / float(secs))
                res[which].append(rate(int(n), float(secs)))
        if restored >= 0:
            os.close(restored)
        return res
    return test


def _best(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return min(key(r) for r in runs)


def _reproduce(phase: str, count: int, size: int, ws: Workspace, pyspy: str) -> dict[str, Any]:
    return profile_phase(ws, pyspy, phase, count, size)


def report_freeze(data: dict[str, Any]) -> list[Goal]:
    """Table 2 and the freeze goals; adds each layout's ``summary``."""
    rows, goals = [], []
    for label, d in data.items():
        nbytes, kx, base = d["bytes"], d["kexecfs"], d["baseline"]
        b_write = _best(base, lambda r: r["write_s"])
        b_fsync = _best(base, lambda r: r["fsync_s"])
        b_both = _best(base, lambda r: r["write_s"] + r["fsync_s"])
        k_prep = _best(kx, lambda r: r["prepare_s"])
        k_freeze = _best(kx, lambda r: r["freeze_s"])
        k_both = _best(kx, lambda r: r["prepare_s"] + r["freeze_s"])
        both_ratio = rate(nbytes, k_both) / rate(nbytes, b_both)
        d["summary"] = {"baseline_write_GBps": rate(nbytes, b_write), "kexecfs_prepare_GBps": rate(nbytes, k_prep),
                        "baseline_fsync_s": b_fsync, "kexecfs_freeze_s": k_freeze,
                        "baseline_write_fsync_GBps": rate(nbytes, b_both),
                        "kexecfs_prepare_freeze_GBps": rate(nbytes, k_both), "ratio": both_ratio}
        rows += [[f"{label}: copy (prepare | write)", f"{rate(nbytes, b_write):.2f} GB/s",
                  f"{rate(nbytes, k_prep):.2f} GB/s", f"{rate(nbytes, k_prep) / rate(nbytes, b_write):.2f}x"],
                 [f"{label}: blackout part (freeze | fsync)", f"{b_fsync:.2f} s", f"{k_freeze:.2f} s",
                  f"{b_fsync / k_freeze:.2f}x"],
                 [f"{label}: both (prepare+freeze | write+fsync)", f"{rate(nbytes, b_both):.2f} GB/s",
                  f"{rate(nbytes, k_both):.2f} GB/s", f"{both_ratio:.2f}x"]]
        goals.append(Goal.at_least(f"freeze throughput {label} (prepare+freeze vs write+fsync)", both_ratio, 0.8,
                                   profile=f"freeze:{d['count']}:{d['size']}",
                                   reproduce=functools.partial(_reproduce, "freeze", d["count"], d["size"])))
    table("2. Freeze: handover image write (best of the repetitions; baseline = C write(2) loop + fsync, one file)",
          ["what", "baseline", "kexecfs", "ratio"], rows)
    print_goals(goals)
    return goals


def report_recovery(data: dict[str, Any]) -> list[Goal]:
    """Table 3a and the recovery goals; adds to each layout's ``summary``."""
    rows, goals = [], []
    for label, d in data.items():
        nbytes, kx, base = d["bytes"], d["kexecfs"], d["baseline"]
        b_read = _best(base, lambda r: r["readback_s"])
        k_kexec = _best(kx, lambda r: r["kexec_s"])
        k_recov = min((r["recovery_s"] for r in kx if r["recovery_s"]), default=None)
        k_restore = _best(kx, lambda r: r.get("restore_s", 0.0))
        rec_ratio = rate(nbytes, k_kexec) / rate(nbytes, b_read)
        d["summary"].update({"baseline_readback_GBps": rate(nbytes, b_read), "kexecfs_kexec_GBps": rate(nbytes, k_kexec),
                             "kexecfs_recovery_s": k_recov, "kexecfs_restore_s": k_restore,
                             "recovery_ratio": rec_ratio})
        rows += [[f"{label}: simulated kexec (whole event) | read-back", f"{rate(nbytes, b_read):.2f} GB/s",
                  f"{rate(nbytes, k_kexec):.2f} GB/s", f"{rec_ratio:.2f}x"],
                 [f"{label}: recovery alone (daemon log) | read-back", f"{rate(nbytes, b_read):.2f} GB/s",
                  f"{rate(nbytes, k_recov):.2f} GB/s" if k_recov else "n/a",
                  f"{rate(nbytes, k_recov) / rate(nbytes, b_read):.2f}x" if k_recov else "n/a"],
                 [f"{label}: restore (open every fds/<token>)", "", f"{k_restore * 1000:.1f} ms", ""]]
        goals.append(Goal.at_least(f"recovery throughput {label} (simulated kexec vs plain read-back)", rec_ratio,
                                   0.8, profile=f"recovery:{d['count']}:{d['size']}",
                                   reproduce=functools.partial(_reproduce, "recovery", d["count"], d["size"])))
    table("3a. Recovery: image read back into restored memfds (baseline = C read-back into new memfds)",
          ["what", "baseline", "kexecfs", "ratio"], rows)
    print_goals(goals)
    return goals


def report_reads(data: dict[str, Any]) -> list[Goal]:
    """Table 3b and its goal, for each layout whose restored file was read back."""
    goals = []
    for label, d in data.items():
        reads = [r["read"] for r in d["kexecfs"] if r.get("read")]
        if not reads:
            continue
        memfd = max(v for r in reads for v in r["memfd"])
        fds = max(v for r in reads for v in r["fds"])
        cpu = statistics.median(v for r in reads for v in r["daemon_cpu_share"])
        # A proxying daemon copies every byte; with passthrough the kernel does it all.
        passthrough = cpu < 0.10
        d["read_summary"] = {"memfd_GBps": memfd, "fds_GBps": fds, "ratio": fds / memfd,
                             "daemon_cpu_share": cpu, "passthrough": passthrough}
        logged = d["passthrough_log"]
        table(f"3b. Restore: read(2) of a restored {label} file, 1 MiB buffer (best of each; 'memfd' = "
              f"{reads[0].get('memfd_path', 'the memfd')} read directly)",
              ["what", "memfd itself", "fds/<token>", "ratio"],
              [["read throughput", f"{memfd:.2f} GB/s", f"{fds:.2f} GB/s", f"{fds / memfd:.2f}x"]])
        out(f"  FUSE passthrough: {'ACTIVE' if passthrough else 'not active (direct_io proxy through the daemon)'}"
            f" - daemon CPU during the fds/<token> reads = {cpu * 100:.0f}% of their wall time"
            + (f"; daemon log: {logged[-1]}" if logged else ""))
        goal = Goal.at_least(f"read through fds/<token> vs memfd ({label})", fds / memfd, 0.9, profile="read",
                             reproduce=functools.partial(_reproduce, "read", 1, READ_PROFILE_SIZE))
        print_goals([goal])
        goals.append(goal)
    return goals
