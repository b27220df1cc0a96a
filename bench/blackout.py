"""Section 4, blackout: freeze + simulated kexec + restore of every file, the time services
are down, against preserved bytes (one memfd) and against file count (the same bytes
in 1 ... 10,000 memfds); plotted (log-log) to bench/results/blackout.png.

Baseline: the plain program's blackout, which has no prepare step: write + fsync the
bytes, then read them back. Points the data-path section measured already are reused;
points that would not fit the time budget are dropped, with a note. The goal: the
blackout of the most files at most 2x its baseline. A file-count point more than 5x its
baseline is also a :class:`Suspect` worth a profile.

Each file-count point also measures the floor of its restore: the same opens (a LOOKUP,
an OPEN and a RELEASE of ``fds/<token>`` each) answered at once by bench/floorfs.py.
No restore through FUSE opens can be faster, so it says how much of a restore is
kexecfs's own work and how much the stack's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import (NO_MATPLOTLIB, Daemon, Goal, MiB, Section, Suspect, Workspace, close_all, fmt_bytes, make_memfd,
                      out, print_goals, progress, pyplot, restore_all, save_plot, table, turns)
from .update import kexecfs_update, plain_update, profile_phase

Runs = tuple[dict[str, Any], dict[str, Any]]  # kexecfs's update and the plain program's
SUSPECT_RATIO = 5
GOAL_RATIO = 2


def reusable(datapath: dict[str, Any]) -> dict[tuple[int, int], Runs]:
    """The best update of each side for every layout the data-path section measured."""
    return {(d["count"], d["size"]): (min(d["kexecfs"], key=lambda r: r["blackout_s"]),
                                      min(d["baseline"], key=lambda r: r["blackout_s"]))
            for d in datapath.values()}


def run(ws: Workspace, sizes: list[int], counts: list[int], total: int, reuse: dict[tuple[int, int], Runs],
        seconds_left: Callable[[], float]) -> Section:
    plan = [("size", 1, s) for s in sizes] + [("count", n, max(4096, total // n // 4096 * 4096)) for n in counts]
    done, points, skipped = dict(reuse), [], []
    for i, (axis, count, size) in enumerate(plan):
        if (count, size) not in done:
            need = count * size / (120 * MiB) + count * 0.002  # rough seconds for both sides
            if need > seconds_left():
                skipped.append(f"{count} x {fmt_bytes(size)} (needs ~{need:.0f} s, {seconds_left():.0f} s left)")
                continue
            done[count, size] = measure_point(ws, count, size, i)
        floor = restore_floor(ws, count) if axis == "count" else None
        points.append(point(axis, count, size, *done[count, size], floor))
    goals = report(points, skipped, total)
    return Section("blackout", {"points": points, "skipped": skipped}, goals, suspects(points))


def measure_point(ws: Workspace, count: int, size: int, i: int) -> Runs:
    progress(f"blackout: {count} x {fmt_bytes(size)}")
    fds = [make_memfd(size) for _ in range(count)]
    runs: dict[str, dict[str, Any]] = {}
    try:
        for side in turns(("baseline", "kexecfs"), i):
            runs[side] = plain_update(ws, fds, size) if side == "baseline" else kexecfs_update(ws, fds, "blackout")
    finally:
        close_all(fds)
    runs["kexecfs"].pop("log", None)
    return runs["kexecfs"], runs["baseline"]


def restore_floor(ws: Workspace, count: int) -> float:
    """Seconds for the floor filesystem to serve the opens of a restore of ``count`` files."""
    with Daemon.floor(ws, "restore-floor") as floor:
        return restore_all(floor.mnt / "inst", count)


def point(axis: str, count: int, size: int, kx: dict[str, Any], base: dict[str, Any],
          restore_floor_s: float | None) -> dict[str, Any]:
    return {"axis": axis, "count": count, "size": size, "bytes": count * size,
            "freeze_s": kx["freeze_s"], "kexec_s": kx["kexec_s"], "restore_s": kx["restore_s"],
            "recovery_s": kx.get("recovery_s"), "prepare_s": kx["prepare_s"],
            "blackout_s": kx["blackout_s"], "baseline_s": base["blackout_s"],
            "baseline_write_fsync_s": base["write_s"] + base["fsync_s"],
            "baseline_readback_s": base["readback_s"], "restore_floor_s": restore_floor_s}


def report(points: list[dict[str, Any]], skipped: list[str], total: int) -> list[Goal]:
    """Tables 4a and 4b, and the goal on the point with the most files."""
    rows = [[f"{p['count']} x {fmt_bytes(p['size'])}", p["prepare_s"], p["freeze_s"], p["kexec_s"],
             p["restore_s"], p["blackout_s"], p["baseline_s"], f"{p['blackout_s'] / p['baseline_s']:.2f}x"]
            for p in points if p["axis"] == "size"]
    columns = ["files", "prepare", "freeze", "kexec", "restore", "BLACKOUT", "baseline", "kx/base"]
    table("4a. Blackout vs preserved bytes (one file): seconds; blackout = freeze + kexec (incl. recovery) "
          "+ restore", columns, rows)
    counted = [p for p in points if p["axis"] == "count"]
    rows = [[f"{p['count']} x {fmt_bytes(p['size'])}", p["prepare_s"], p["freeze_s"], p["kexec_s"],
             p["restore_s"], p["restore_floor_s"], f"{p['restore_s'] / p['restore_floor_s']:.2f}x",
             p["blackout_s"], p["baseline_s"], f"{p['blackout_s'] / p['baseline_s']:.2f}x"] for p in counted]
    table(f"4b. Blackout vs file count ({fmt_bytes(total)} in all): seconds",
          columns[:5] + ["restore floor", "kx/floor"] + columns[5:], rows)
    out("  baseline = a plain program's blackout without a prepare step: write+fsync the bytes to one file,")
    out("  then read them back into new memfds (C). prepare is not part of the blackout (services still run).")
    out("  restore floor = the same opens of fds/<token> (LOOKUP, OPEN, RELEASE each) answered by floorfs.py.")
    for s in skipped:
        out(f"  SKIPPED for time: {s}")
    if not counted:
        return []
    most = max(counted, key=lambda p: p["count"])
    out(f"  {most['count']} files: the restore floor alone is {most['restore_floor_s'] / most['baseline_s']:.1f}x "
        f"the whole baseline blackout")
    goals = [Goal.at_most(f"blackout of {most['count']} memfds vs its baseline", most["blackout_s"] / most["baseline_s"],
                          GOAL_RATIO)]
    print_goals(goals)
    return goals


def suspects(points: list[dict[str, Any]]) -> list[Suspect]:
    """The file-count point furthest off its baseline, if it is more than 5x off: its
    slower part (recovery or restore) is worth a profile."""
    worst = max((p for p in points if p["axis"] == "count"), key=lambda p: p["blackout_s"] / p["baseline_s"],
                default=None)
    if not worst or worst["blackout_s"] <= SUSPECT_RATIO * worst["baseline_s"]:
        return []
    part = "recovery" if worst["kexec_s"] >= worst["restore_s"] else "restore"
    title = (f"blackout of {worst['count']} x {fmt_bytes(worst['size'])} is "
             f"{worst['blackout_s'] / worst['baseline_s']:.0f}x its baseline: its {part}")
    return [Suspect(title, functools.partial(_reproduce, part, worst["count"], worst["size"]))]


def _reproduce(phase: str, count: int, size: int, ws: Workspace, pyspy: str) -> dict[str, Any]:
    return profile_phase(ws, pyspy, phase, count, size)


def plot(blackout: dict[str, Any], path: Path) -> str:
    """Draw the points to ``path``; the line to print about it."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, axis in zip(axes, ("size", "count")):
        pts = [q for q in blackout["points"] if q["axis"] == axis]
        if pts:
            _plot_axis(ax, axis, pts)
    fig.suptitle("kexecfs blackout (simulated kexec), " + time.strftime("%Y-%m-%d %H:%M"))
    return save_plot(plt, fig, path)


def _plot_axis(ax: Any, axis: str, pts: list[dict[str, Any]]) -> None:
    x = [q["bytes"] / MiB for q in pts] if axis == "size" else [q["count"] for q in pts]
    ax.plot(x, [q["blackout_s"] for q in pts], "o-", label="kexecfs blackout (freeze+kexec+restore)", lw=2)
    ax.plot(x, [q["freeze_s"] for q in pts], "s--", label="  freeze", alpha=.7)
    ax.plot(x, [q["kexec_s"] for q in pts], "^--", label="  simulated kexec (recovery)", alpha=.7)
    ax.plot(x, [q["restore_s"] for q in pts], "v--", label="  restore (open fds/<token>)", alpha=.7)
    if axis == "count":
        ax.plot(x, [q["restore_floor_s"] for q in pts], "x:", label="  restore floor (the same opens, floorfs)")
    ax.plot(x, [q["baseline_s"] for q in pts], "k:", label="baseline: write+fsync+read back", lw=2)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("preserved bytes (one memfd), MiB" if axis == "size" else "number of preserved memfds")
    ax.set_ylabel("seconds")
    ax.grid(True, which="both", alpha=.3)
    if axis == "count":
        ax.set_title(f"blackout vs file count ({fmt_bytes(pts[0]['bytes'])}-ish in all)")
    else:
        ax.set_title("blackout vs preserved bytes")
    ax.legend(fontsize=8)
