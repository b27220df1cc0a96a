"""Section 7, VM downtime: a QEMU guest whose RAM holds non-zero data, from QMP ``stop``
until it runs again, across a host kernel update.

kexecfs: ``kexecfs vm`` (the library under the command) on a kexecfs mount: prepare while
the guest runs (not downtime), then the downtime: ``update`` (stop, save the device state
without the RAM, quit QEMU), ``freeze`` and a simulated ``kexec`` (recovery included), and
``resume`` (a new QEMU on the preserved RAM, load, cont).

Baselines, in the same run, on the same disk: the same guest with the same RAM contents,
mapped privately from a file (so QEMU must save every page), saved with an ordinary
migration into a file that is then fsynced, QEMU quit; a new QEMU loads it back and
continues. Twice: at full speed (no bandwidth cap), and with QEMU's default settings,
whose migration cap (max-bandwidth, 128 MiB/s in QEMU 7.2) is what a plain ``migrate``
gets and what issue 14's "0.13x today" was measured against. Guest: the tiny counting
guest of the tests (tests/vm/tiny), under TCG; its RAM starts as the bench pattern (a
random MiB, repeated) and the guest kernel boots on top. Every side checks that the guest
goes on counting with the same boot id.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kexecfs.client import Kexecfs
from kexecfs.vm import lifecycle
from kexecfs.vm.qemu import UNLIMITED_BANDWIDTH, GuestConfig, RunDir, launch, wait_exit, wait_migration, wait_runstate

from .harness import (NO_MATPLOTLIB, GiB, PATTERN, ROOT, Daemon, Goal, Section, Workspace, fmt_bytes, out, progress,
                      pyplot, save_plot, table, turns)

sys.path.insert(0, str(ROOT / "tests"))
from tinyguest import Console, TinyGuest, one_life  # noqa: E402

GOAL_RATIO = 0.05  # downtime at most this share of the full save and load, at 1 GiB and above
BASELINES = ("full speed", "QEMU defaults")
BOOTED = 2  # ticks before the update: the guest's init runs
SECONDS_PER_GIB = 40  # a rough cost of one size, all sides, for the time budget (4 GiB: ~130 s)


def run(ws: Workspace, sizes: list[int], seconds_left: Callable[[], float]) -> Section:
    guest = TinyGuest.build()
    points, skipped = [], []
    for i, size in enumerate(sizes):
        need = 30 + SECONDS_PER_GIB * size / GiB
        if points and need > seconds_left():
            skipped.append(f"{fmt_bytes(size)} (needs ~{need:.0f} s, {seconds_left():.0f} s left)")
            continue
        points.append(measure(ws, guest, size, i))
    goals = report(points, skipped)
    return Section("vm", {"points": points, "skipped": skipped}, goals=goals)


def measure(ws: Workspace, guest: TinyGuest, size: int, i: int) -> dict[str, Any]:
    progress(f"vm downtime: {fmt_bytes(size)} guest")
    data = ws.work / f"vm-ram-{size}"
    fill_file(data, size)
    sides: dict[str, dict[str, float]] = {}
    try:
        for side in turns(("kexecfs", *BASELINES), i):
            if side == "kexecfs":
                sides[side] = kexecfs_update(ws, guest, data, size)
            else:
                sides[side] = full_save_load(ws, guest, data, size, capped=side == "QEMU defaults")
    finally:
        data.unlink(missing_ok=True)
    down = sides["kexecfs"]["downtime_s"]
    return {"size": size, "kexecfs": sides["kexecfs"], "baseline": sides["full speed"],
            "baseline_defaults": sides["QEMU defaults"], "ratio": down / sides["full speed"]["downtime_s"],
            "ratio_defaults": down / sides["QEMU defaults"]["downtime_s"]}


def fill_file(path: Path, size: int) -> None:
    """The guest's first RAM contents: the bench pattern, every page non-zero."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        for off in range(0, size, len(PATTERN)):
            os.pwrite(fd, PATTERN[:size - off], off)
    finally:
        os.close(fd)


def copy_into(path: Path, size: int) -> Callable[[int], None]:
    def fill(memfd: int) -> None:
        src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            done = 0
            while done < size:
                done += os.sendfile(memfd, src, done, size - done)
        finally:
            os.close(src)
    return fill


def booted(console: Console) -> int:
    return console.wait_for_tick(BOOTED, timeout=180)[-1][0]


def still_counting(console: Console, last: int) -> None:
    one_life(console.wait_for_tick(last + 1, timeout=60))


# ---------------------------------------------------------------------------- kexecfs

def kexecfs_update(ws: Workspace, guest: TinyGuest, data: Path, size: int) -> dict[str, float]:
    tag = f"vm{size >> 20}"
    console = Console(ws.work / f"{tag}.console")
    console.path.write_text("")
    run = RunDir(ws.work / f"{tag}-run")
    with Daemon.kexecfs(ws, tag) as daemon:
        kx = Kexecfs(daemon.mnt)
        config = GuestConfig("bench", size, options=guest.qemu_options(console.path))
        lifecycle.start(kx, config, run, fill=copy_into(data, size), timeout=60)
        try:
            booted(console)
            prepare_s = daemon.event("prepare")
            save = lifecycle.update(kx, "bench", run, timeout=120)
            last = console.ticks()[-1][0]
            freeze_s = daemon.event("freeze")
            kexec_s = daemon.event("kexec")
            res = lifecycle.resume(kx, "bench", run, timeout=120)
            still_counting(console, last)
        finally:
            lifecycle.stop(kx, "bench", run)
    return {"prepare_s": prepare_s, "save_s": save.saved, "quit_s": save.quit - save.saved,
            "freeze_s": freeze_s, "kexec_s": kexec_s, "recovery_s": daemon.last_recovery_seconds() or 0.0,
            "resume_s": res.running, "qemu_start_s": res.started, "downtime_s": res.running_at - save.stopped_at,
            "device_state_bytes": save.stream_bytes}


# ---------------------------------------------------------------------------- baseline

def full_save_load(ws: Workspace, guest: TinyGuest, data: Path, size: int, capped: bool) -> dict[str, float]:
    tag = f"base{size >> 20}{'-capped' if capped else ''}"
    console = Console(ws.work / f"{tag}.console")
    console.path.write_text("")
    run = RunDir(ws.work / f"{tag}-run")
    argv = ["qemu-system-x86_64", "-object", f"memory-backend-file,id=ram,mem-path={data},share=off,size={size}",
            "-machine", "memory-backend=ram", "-qmp", f"unix:{run.monitor},server=on,wait=off",
            *guest.qemu_options(console.path)]
    state = ws.work / f"{tag}.state"
    fd = os.open(state, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    procs = []
    try:
        proc, monitor = launch(argv, [], run, 60)
        procs.append(proc)
        booted(console)
        t0 = time.perf_counter()
        saved = _save_all(monitor, fd, proc.pid, capped) - t0
        last = console.ticks()[-1][0]
        t1 = time.perf_counter()
        proc, monitor = launch(argv + ["-incoming", "defer", "-S"], [], run, 60)
        procs.append(proc)
        started = time.perf_counter() - t1
        os.lseek(fd, 0, os.SEEK_SET)
        running_at = _load_all(monitor, fd, capped)
        monitor.close()
        still_counting(console, last)
        return {"save_s": saved, "load_s": running_at - t1, "qemu_start_s": started,
                "downtime_s": running_at - t0, "state_bytes": os.fstat(fd).st_size}
    finally:
        for p in procs:
            p.kill()
            p.wait()
        os.close(fd)
        state.unlink(missing_ok=True)


def _save_all(monitor: Any, fd: int, pid: int, capped: bool) -> float:
    """stop, migrate everything into ``fd``, fsync, quit; when QEMU was gone."""
    set_up_all_ram(monitor, capped)
    monitor.execute("getfd", {"fdname": "state"}, fds=[fd])
    monitor.execute("stop")
    monitor.execute("migrate", {"uri": "fd:state"})
    wait_migration(monitor, 600)
    os.fsync(fd)
    monitor.execute("quit")
    wait_exit(pid, 60)
    monitor.close()
    return time.perf_counter()


def _load_all(monitor: Any, fd: int, capped: bool) -> float:
    set_up_all_ram(monitor, capped)
    monitor.execute("getfd", {"fdname": "state"}, fds=[fd])
    monitor.execute("migrate-incoming", {"uri": "fd:state"})
    wait_migration(monitor, 600)
    wait_runstate(monitor, "inmigrate", 60)
    monitor.execute("cont")
    return time.perf_counter()


def set_up_all_ram(monitor: Any, capped: bool) -> None:
    """An ordinary migration, RAM included: at full speed, or with QEMU's own cap."""
    caps = [{"capability": "events", "state": True}, {"capability": "x-ignore-shared", "state": False}]
    monitor.execute("migrate-set-capabilities", {"capabilities": caps})
    if not capped:
        monitor.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})


# ---------------------------------------------------------------------------- report

def report(points: list[dict[str, Any]], skipped: list[str]) -> list[Goal]:
    rows = []
    for p in points:
        k, b, d = p["kexecfs"], p["baseline"], p["baseline_defaults"]
        rows.append([fmt_bytes(p["size"]), k["save_s"] + k["quit_s"], k["freeze_s"] + k["kexec_s"], k["resume_s"],
                     k["downtime_s"], b["downtime_s"], f"{p['ratio']:.3f}x", d["downtime_s"],
                     f"{p['ratio_defaults']:.3f}x"])
    table("7. VM downtime, QMP stop until the guest runs again: seconds",
          ["guest RAM", "kx save+quit", "kx freeze+kexec", "kx resume", "KEXECFS", "FULL SPEED", "kx/full",
           "QEMU DEFAULTS", "kx/defaults"], rows)
    out("  kexecfs: kexecfs vm update (stop, device state without RAM, QEMU quit) + freeze + simulated kexec")
    out("  (recovery of the image) + kexecfs vm resume (new QEMU, load, cont); prepare ran before, guest running.")
    out("  baselines: the same guest and RAM contents mapped privately, migrated whole into a file, fsync, quit;")
    out("  a new QEMU loads it back; full speed = no bandwidth cap; QEMU defaults = its max-bandwidth cap (128")
    out("  MiB/s in 7.2). Same disk, page cache warm on all sides. TCG guest, tests/vm/tiny.")
    for p in points:
        k, b, d = p["kexecfs"], p["baseline"], p["baseline_defaults"]
        out(f"  {fmt_bytes(p['size'])}: kexecfs prepare {k['prepare_s']:.2f} s (not downtime), "
            f"freeze {k['freeze_s']:.2f} s, kexec {k['kexec_s']:.2f} s (recovery {k['recovery_s']:.2f} s), "
            f"device state {k['device_state_bytes'] / 1e6:.2f} MB;")
        out(f"  {'':{len(fmt_bytes(p['size']))}}  full speed save {b['save_s']:.2f} s + load {b['load_s']:.2f} s "
            f"of {b['state_bytes'] / 1e6:.0f} MB; defaults save {d['save_s']:.2f} s + load {d['load_s']:.2f} s")
    for s in skipped:
        out(f"  SKIPPED for time: {s}")
    goals = []
    for p in points:
        if p["size"] >= GiB:
            size = fmt_bytes(p["size"])
            goals.append(Goal.at_most(f"VM downtime, {size} guest, vs QEMU's save and load (defaults)",
                                      p["ratio_defaults"], GOAL_RATIO))
            goals.append(Goal.at_most(f"VM downtime, {size} guest, vs QEMU's save and load (full speed)",
                                      p["ratio"], GOAL_RATIO))
    for g in goals:
        out(g.line())
    return goals


def plot(vm: dict[str, Any], path: Path) -> str:
    """Downtime against guest RAM size, both sides and kexecfs's parts; the line to print."""
    plt = pyplot()
    if plt is None:
        return NO_MATPLOTLIB
    pts = vm["points"]
    if not pts:
        return "  no plot: no points"
    x = [p["size"] / GiB for p in pts]
    k = [p["kexecfs"] for p in pts]
    fig, ax = plt.subplots(figsize=(10, 4.8))
    ax.plot(x, [p["baseline_defaults"]["downtime_s"] for p in pts], "kx:", lw=1.5,
            label="QEMU defaults: save all RAM (128 MiB/s cap), fsync, load")
    ax.plot(x, [p["baseline"]["downtime_s"] for p in pts], "ko:", lw=2, label="full speed: save all RAM, fsync, load")
    ax.plot(x, [q["downtime_s"] for q in k], "o-", lw=2, label="kexecfs vm: downtime")
    ax.plot(x, [q["freeze_s"] + q["kexec_s"] for q in k], "s--", alpha=.7, label="  freeze + kexec + recovery")
    ax.plot(x, [q["save_s"] + q["quit_s"] for q in k], "^--", alpha=.7, label="  device state save + QEMU quit")
    ax.plot(x, [q["resume_s"] for q in k], "v--", alpha=.7, label="  QEMU resume")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [fmt_bytes(p["size"]) for p in pts])
    ax.set_xlabel("guest RAM (non-zero data)")
    ax.set_ylabel("seconds from QMP stop to running again")
    ax.grid(True, which="both", alpha=.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("VM downtime across a simulated kexec, " + time.strftime("%Y-%m-%d %H:%M"))
    return save_plot(plt, fig, path)
