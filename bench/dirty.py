"""Section 8, the blackout against what changed: freeze after prepare with 0, 1, 10 and
100 % of the preserved chunks rewritten in between, at two sizes, in one memfd and in
1,000; then a cold recovery (page cache dropped first, as after a real kexec).

The floor, measured in the same run and interleaved with kexecfs: ``iobench refresh``, a C
program that reads the same bytes once with read(2), pwrites the chunks that changed into
a copy written earlier by ``iobench pack`` (prepare's counterpart) and fsyncs it. Changes
are whole 1 MiB chunks (the image's unit), the same chunks for both sides, spread evenly
over the files. The cold recovery is set against ``iobench unpack`` of that copy, after the
same drop of the page cache. The daemon's peak RSS is read around freeze and recovery.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .harness import (NO_MATPLOTLIB, MiB, Daemon, Goal, Section, Workspace, close_all, fmt_bytes, make_memfd, out,
                      preserve_all, progress, pyplot, run_tool, save_plot, self_fd, table, turns)

FRACTIONS = (0, 1, 10, 100)  # per cent of the chunks rewritten between prepare and freeze
CHUNK = MiB  # kexecfs.core.image.CHUNK_SIZE
PAGE = 4096
RSS_GOAL_MIB = 64


def run(ws: Workspace, totals: list[int], counts: list[int], seconds_left: Any) -> Section:
    points, skipped = [], []
    for total in totals:
        for count in counts:
            need = total * 12 / (1000 * MiB) + count * 0.01  # ~12 passes over the bytes at ~1 GB/s
            if need > seconds_left():
                skipped.append(f"{count} x {fmt_bytes(total // count)} (needs ~{need:.0f} s, "
                               f"{seconds_left():.0f} s left)")
                continue
            points.append(measure_layout(ws, total, count))
    goals = report(points, skipped)
    return Section("dirty", {"points": points, "skipped": skipped}, goals=goals)


def changed_chunks(nchunks: list[int], percent: int) -> list[list[int]]:
    """Which chunks of each file change: ``percent`` of all of them, evenly spread."""
    everything = [(f, k) for f, n in enumerate(nchunks) for k in range(n)]
    want = round(len(everything) * percent / 100)
    picked: list[list[int]] = [[] for _ in nchunks]
    for i in range(want):
        f, k = everything[i * len(everything) // want]
        picked[f].append(k)
    return picked


def rewrite(fds: list[int], size: int, chunks: list[list[int]]) -> int:
    """Give every chosen chunk new bytes; the bytes rewritten."""
    fresh = os.urandom(16) * (CHUNK // 16)  # differs from every earlier round's
    done = 0
    with memoryview(fresh) as view:
        for fd, ks in zip(fds, chunks):
            for k in ks:
                with view[:min(CHUNK, size - k * CHUNK)] as part:
                    done += os.pwrite(fd, part, k * CHUNK)
    return done


def floor_refresh(ws: Workspace, copy: Path, fds: list[int], chunks: list[list[int]]) -> dict[str, float]:
    lines = "\n".join(f"{self_fd(fd)} {','.join(map(str, ks)) or '-'}" for fd, ks in zip(fds, chunks))
    secs, fsync_s, _read, written = run_tool([ws.iobench, "refresh", str(copy)], lines)
    return {"seconds": float(secs), "fsync_s": float(fsync_s), "written": int(written)}


def drop_caches() -> None:
    """What a real kexec leaves: nothing of the image in the page cache."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3")


def measure_layout(ws: Workspace, total: int, count: int) -> dict[str, Any]:
    size = max(PAGE, total // count // PAGE * PAGE)
    label = f"{count} x {fmt_bytes(size)}"
    progress(f"dirty: {label}")
    fds = [make_memfd(size) for _ in range(count)]
    nchunks = [-(-size // CHUNK)] * count
    copy = ws.work / "dirty-floor"
    res: dict[str, Any] = {"label": label, "count": count, "size": size, "bytes": count * size, "fractions": []}
    try:
        run_tool([ws.iobench, "pack", str(copy)], "\n".join(self_fd(fd) for fd in fds))
        with Daemon.kexecfs(ws, "dirty") as m:
            inst = m.mnt / "bench"
            inst.mkdir()
            preserve_all(inst, fds)
            for i, percent in enumerate(FRACTIONS):
                m.event("prepare")
                chunks = changed_chunks(nchunks, percent)
                changed = rewrite(fds, size, chunks)
                os.sync()  # the rewrite's and earlier runs' dirty pages are nobody's freeze to flush
                row: dict[str, Any] = {"percent": percent, "changed": changed}
                for side in turns(("floor", "kexecfs"), i):
                    if side == "floor":
                        row["floor"] = floor_refresh(ws, copy, fds, chunks)
                    else:
                        rss = m.proc_status()["VmRSS"]
                        m.reset_hwm()
                        row["freeze_s"] = m.event("freeze")
                        row["freeze_rss_growth"] = m.proc_status()["VmHWM"] - rss
                        row["rewrote"] = freeze_log(m)
                m.event("cancel")
                res["fractions"].append(row)
            res["cold"] = cold_recovery(ws, m, copy, fds, size)
    finally:
        close_all(fds)
        copy.unlink(missing_ok=True)
    return res


def freeze_log(m: Daemon) -> dict[str, int]:
    checked, rewrote = re.findall(r"freeze: re-checked (\d+) bytes of contents, rewrote (\d+)", m.log_text())[-1]
    return {"checked": int(checked), "rewritten": int(rewrote)}


def cold_recovery(ws: Workspace, m: Daemon, copy: Path, fds: list[int], size: int) -> dict[str, Any]:
    """Freeze, drop the page cache, kexec: recovery reads the image from the disk. The
    floor reads its copy back into new memfds after the same drop, first or second in
    turn with the daemon like every other pair here."""
    m.event("prepare")
    m.event("freeze")
    res: dict[str, Any] = {}
    for side in turns(("floor", "kexecfs"), len(FRACTIONS)):
        drop_caches()
        if side == "floor":
            secs, _n = run_tool([ws.iobench, "unpack", str(copy)], "\n".join(str(size) for _ in fds))
            res["floor_s"] = float(secs)
        else:
            rss = m.proc_status()["VmRSS"]
            m.reset_hwm()
            res["kexec_s"] = m.event("kexec")
            res["recovery_s"] = m.last_recovery_seconds()
            res["rss_growth"] = m.proc_status()["VmHWM"] - rss
    m.event("finish")
    return res


def report(points: list[dict[str, Any]], skipped: list[str]) -> list[Goal]:
    rows, goals = [], []
    for p in points:
        for r in p["fractions"]:
            ratio = r["freeze_s"] / r["floor"]["seconds"]
            rows.append([p["label"], f"{r['percent']} %", fmt_bytes(r["changed"]) if r["changed"] else "0",
                         fmt_bytes(r["rewrote"]["rewritten"]) if r["rewrote"]["rewritten"] else "0",
                         ms(r["floor"]["seconds"]), ms(r["freeze_s"]), f"{ratio:.2f}x",
                         f"{r['freeze_rss_growth'] / MiB:.1f}"])
            if r["percent"] in (0, 10):
                goals.append(Goal.at_most(f"freeze with {r['percent']} % changed, {p['label']} (vs read once + "
                                          f"write+fsync the changed chunks)", ratio, 2))
    table("8a. Freeze against the share of chunks changed since prepare: ms (floor = C: read every byte "
          "once, pwrite + fsync the changed chunks)",
          ["files", "changed", "bytes", "rewritten", "floor", "freeze", "ratio", "RSS+ MiB"], rows)
    cold = [[p["label"], ms(p["cold"]["floor_s"]), ms(p["cold"]["kexec_s"]), ms(p["cold"]["recovery_s"]),
             f"{p['cold']['kexec_s'] / p['cold']['floor_s']:.2f}x", f"{p['cold']['rss_growth'] / MiB:.1f}"]
            for p in points]
    table("8b. Cold recovery (page cache dropped before each side): ms (floor = C read-back into new memfds)",
          ["files", "floor", "kexec", "recovery", "kexec/floor", "RSS+ MiB"], cold)
    out("  'rewritten' is what the daemon's log says freeze wrote again; RSS+ is the daemon's peak RSS growth")
    for s in skipped:
        out(f"  SKIPPED for time: {s}")
    for p in points:
        peak = max([r["freeze_rss_growth"] for r in p["fractions"]] + [p["cold"]["rss_growth"]])
        goals.append(Goal.at_most(f"daemon peak RSS growth, freeze and recovery of {p['label']}", peak / MiB,
                                  RSS_GOAL_MIB, unit=" MiB"))
    for g in goals:
        out(g.line())
    return goals


def ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f}"


def plot(data: dict[str, Any], path: Path) -> str:
    """Freeze seconds against the share changed, kexecfs and its floor per layout, to
    ``path``; the line to print about it."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(7, 4.8))
    x = list(range(len(FRACTIONS)))
    for n, p in enumerate(data["points"]):
        color = f"C{n}"
        ax.plot(x, [r["freeze_s"] for r in p["fractions"]], "o-", color=color, label=f"kexecfs freeze, {p['label']}")
        ax.plot(x, [r["floor"]["seconds"] for r in p["fractions"]], "s:", color=color, label="  floor (C)")
    ax.set_xticks(x, [f"{f} %" for f in FRACTIONS])
    ax.set_yscale("log")
    ax.set_xlabel("chunks changed between prepare and freeze")
    ax.set_ylabel("seconds (the blackout's freeze part)")
    ax.grid(True, which="both", alpha=.3)
    ax.legend(fontsize=8)
    ax.set_title("freeze against what changed since prepare")
    return save_plot(plt, fig, path)
