#!/usr/bin/env python3
"""kexecfs benchmark suite (``make bench``, i.e. ``python -m bench``): every figure next
to a baseline measured in the same run, interleaved with it, so that a busy machine
slows both alike.

Sections (see bench/README.md for what each number means):

1. control plane: cat/stat/fd_preserve/ioctl latency against a minimal pyfuse3
   filesystem (bench/floorfs.py, the floor of this stack) and tmpfs;
2. freeze: handover image write throughput against a plain write + fsync;
3. recovery and restore: image read back into memfds against a plain copy, and reads
   through ``fds/<token>`` against reading the memfd itself;
6. memory: the daemon's peak RSS during freeze (from the runs of 2 and 3);
4. blackout (freeze + simulated kexec + restore) against preserved bytes and file count,
   plotted to bench/results/blackout.png;
8. freeze against the share of chunks changed since prepare (0/1/10/100 %), and a cold
   recovery, against a C floor; plotted to bench/results/dirty.png;
5. scale: many instances of many files;
7. VM downtime: a QEMU guest across a simulated kexec with ``kexecfs vm`` against QEMU
   saving and loading all its RAM, plotted to bench/results/vm-downtime.png.

Progress goes to stderr, tables to stdout, data to bench/results/*.json. Needs root
(FUSE allow_other, pidfd_getfd) and a C compiler. ``--quick`` (or BENCH_QUICK=1) shrinks
everything for a smoke test and writes to bench/results/tmp/ instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as bench/run.py rather than python -m bench
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import blackout, controlplane, datapath, dirty, memory, scale, vm  # noqa: E402
from bench.harness import (RESULTS, ROOT, GiB, MiB, Section, Workspace, elapsed, out, print_goals,  # noqa: E402
                           progress, raise_fd_limit, save)
from bench.profiles import find_pyspy, profile_misses  # noqa: E402

SECTIONS = ("control", "datapath", "blackout", "dirty", "scale", "vm")
# Seconds kept back from the budget: for the profiles at the end, and (while the blackout
# section runs) for the scale section after it, and for the VM section after both.
PROFILE_RESERVE = 60
SCALE_RESERVE = {"full": 150, "quick": 20}
VM_RESERVE = {"full": 240, "quick": 60}
DIRTY_RESERVE = {"full": 120, "quick": 15}


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much each section measures (recorded in summary.json as ``config``)."""

    control_rounds: int
    control_per_round: int
    layouts: list[tuple[int, int]]  # (memfds, bytes each) of the data-path section
    reps: int
    read_reps: int
    sizes: list[int]  # blackout against bytes: one memfd of each size
    counts: list[int]  # blackout against file count: count_total bytes in this many memfds
    count_total: int
    scale: tuple[int, int, int, int]  # instances, files per instance, file size, instances restored
    vm: list[int]  # guest RAM sizes of the VM downtime section
    dirty: list[int]  # freeze against changed chunks: these many bytes in all ...
    dirty_counts: list[int]  # ... in this many memfds


FULL = Sizes(40, 100, [(1, GiB), (1024, MiB)], 3, 3, [64 * MiB, 256 * MiB, GiB, 2 * GiB],
             [1, 10, 100, 1000, 10000], 64 * MiB, (1000, 100, 4096, 10), [256 * MiB, GiB, 4 * GiB],
             [512 * MiB, 4 * GiB], [1, 1000])
QUICK = Sizes(2, 200, [(1, 64 * MiB), (64, MiB)], 1, 1, [16 * MiB, 64 * MiB], [1, 10, 100], 16 * MiB,
              (20, 10, 4096, 5), [256 * MiB], [16 * MiB], [1, 10])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK", "0") not in ("", "0"),
                    help="tiny sizes: a smoke test of the suite itself (also BENCH_QUICK=1)")
    ap.add_argument("--only", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--budget", type=float, default=900, help="seconds; optional points are dropped to fit")
    ap.add_argument("--no-profile", action="store_true", help="do not profile missed goals")
    args = ap.parse_args(argv)
    args.only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if args.only - set(SECTIONS):
        ap.error(f"unknown section(s) {','.join(sorted(args.only - set(SECTIONS)))}")
    return args


def run_sections(ws: Workspace, args: argparse.Namespace, sizes: Sizes, results: Path) -> list[Section]:
    """Run the chosen sections in order, saving each one's data as soon as it is done."""
    done: list[Section] = []

    def keep(section: Section) -> Section:
        save(results, section.name, section.data)
        done.append(section)
        return section

    dp = None
    vm_reserve = VM_RESERVE["quick" if args.quick else "full"] if "vm" in args.only else 0
    if "control" in args.only:
        keep(controlplane.run(ws, sizes.control_rounds, sizes.control_per_round, results / "controlplane.json"))
    if "datapath" in args.only:
        dp = keep(datapath.run(ws, sizes.layouts, sizes.reps, sizes.read_reps))
        keep(memory.run(dp.data))
    if "blackout" in args.only:
        reserve = SCALE_RESERVE["quick" if args.quick else "full"] if "scale" in args.only else 0
        reserve += DIRTY_RESERVE["quick" if args.quick else "full"] if "dirty" in args.only else 0
        b = keep(blackout.run(ws, sizes.sizes, sizes.counts, sizes.count_total,
                              blackout.reusable(dp.data) if dp else {},
                              lambda: args.budget - reserve - vm_reserve - PROFILE_RESERVE - elapsed()))
        out(blackout.plot(b.data, results / "blackout.png"))
    if "dirty" in args.only:
        reserve = SCALE_RESERVE["quick" if args.quick else "full"] if "scale" in args.only else 0
        d = keep(dirty.run(ws, sizes.dirty, sizes.dirty_counts,
                           lambda: args.budget - reserve - vm_reserve - PROFILE_RESERVE - elapsed()))
        out(dirty.plot(d.data, results / "dirty.png"))
    if "scale" in args.only:
        keep(scale.run(ws, *sizes.scale, lambda: args.budget - vm_reserve - PROFILE_RESERVE - elapsed()))
    if "vm" in args.only:
        v = keep(vm.run(ws, sizes.vm, lambda: args.budget - PROFILE_RESERVE - elapsed()))
        out(vm.plot(v.data, results / "vm-downtime.png"))
    return done


def environment() -> dict[str, Any]:
    qemu = 0
    for p in Path("/proc").iterdir():
        try:
            qemu += p.name.isdigit() and (p / "comm").read_text().startswith("qemu")
        except OSError:
            continue
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "kexecfs"],
                           capture_output=True, text=True)
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "commit": git.stdout.strip() or "?",
            "uncommitted": [line[3:] for line in dirty.stdout.splitlines()],
            "python": platform.python_version(), "qemu_processes_running": qemu,
            "mem_total_GiB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1),
            "free_page_reporting": free_page_reporting(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


BALLOON_F_REPORTING = 5  # VIRTIO_BALLOON_F_REPORTING, include/uapi/linux/virtio_balloon.h


def free_page_reporting() -> bool:
    """Whether this (virtual) machine hands the memory it frees back to its host (virtio-balloon
    free page reporting). Then a phase that needs more memory than was in use a moment before
    writes into pages the host must fault in again: measured here, a second 4 GiB memfd beside
    a first filled at 0.36 GB/s, the first at 1.3 GB/s. Large recoveries measure that."""
    for device in Path("/sys/bus/virtio/drivers/virtio_balloon").glob("virtio*"):
        features = (device / "features").read_text()  # one character per feature bit, bit 0 first
        if features[BALLOON_F_REPORTING:BALLOON_F_REPORTING + 1] == "1":
            return True
    return False


def fstype(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        mnt, kind = line.split()[1:3]
        if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
            best = (mnt, kind)
    return best[1]


def print_header(env: dict[str, Any]) -> None:
    out(f"kexecfs benchmark - {env['time']}, Linux {env['kernel']}, {env['cpus']} CPUs, {env['mem_total_GiB']} GiB, "
        f"load {env['loadavg'][0]:.2f}, {env['qemu_processes_running']} qemu process(es) running")
    out(f"kexecfs at commit {env['commit']}" + (f" with uncommitted changes to {', '.join(env['uncommitted'])}"
                                                  if env["uncommitted"] else ""))
    out(f"image dir and baseline files on {env['work_dir']} ({fstype(Path(env['work_dir']))}); "
        f"daemon RLIMIT_NOFILE raised to {env['fd_limit']}")
    if env["free_page_reporting"]:
        out("free page reporting is on: the host takes back freed memory, so figures that need more memory than "
            "was just in use (the VM section's 1 and 4 GiB) include the host faulting it in again")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        sys.exit("bench: run as root (FUSE allow_other and pidfd_getfd need it), e.g. sudo make bench")
    sizes, results = (QUICK, RESULTS / "tmp") if args.quick else (FULL, RESULTS)
    progress(f"kexecfs bench: {'quick' if args.quick else 'full'} run, budget {args.budget:.0f} s")
    fd_limit = raise_fd_limit()
    pyspy = None if args.no_profile else find_pyspy()
    if not args.no_profile and not pyspy:
        progress("py-spy is not installed (the bench extra: pip install -e '.[bench]'): missed goals get no profile")
    work = Path(tempfile.mkdtemp(prefix="kexecfs-bench-", dir="/var/tmp"))
    summary: dict[str, Any] = {}
    try:
        ws = Workspace.create(work, fd_limit)
        summary["environment"] = {**environment(), "fd_limit": fd_limit, "work_dir": str(work),
                                  "config": {k: str(v) for k, v in dataclasses.asdict(sizes).items()}}
        print_header(summary["environment"])
        sections = run_sections(ws, args, sizes, results)
        for s in sections:
            summary.update(s.notes)
        goals = [g for s in sections for g in s.goals]
        out()
        out("== Goals")
        print_goals(goals)
        if pyspy:
            summary["profiles"] = profile_misses(ws, pyspy, goals, [x for s in sections for x in s.suspects],
                                                 lambda: args.budget - elapsed())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.update({"goals": [g.to_json() for g in goals], "wall_s": elapsed(), "loadavg_end": os.getloadavg()})
    save(results, "summary", summary)
    out()
    out(f"{sum(g.met for g in goals)} of {len(goals)} goals met; wall time {elapsed():.0f} s; results in {results}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
