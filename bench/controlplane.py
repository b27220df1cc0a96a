"""Section 1, the control plane: latency of cat, stat, fd_preserve and the ioctls.

Targets: tmpfs (the same operations on ordinary files), the floor (bench/floorfs.py),
floor+take (the floor whose preserve also takes the caller's descriptor; preserve rows
only) and kexecfs. Each round runs every operation on each target as a short burst of
``ctlbench`` iterations, and the first target rotates from round to round. Goals: kexecfs within
1.5x of the floor, and each ratio within 10 % of the one the previous run saved (a figure
counts when two runs agree).
"""

from __future__ import annotations

import collections
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import (MiB, PATTERN, Daemon, Goal, Section, Workspace, make_memfd, out, preserve_all, print_goals,
                      progress, run_tool, table, turns)
from .profiles import pyspy_record

TARGETS = ("tmpfs", "floor", "kexecfs", "floor+take")
Invocation = tuple[str, tuple[str, ...]]  # a ctlbench operation and its arguments ({m}: the mount)


@dataclass(frozen=True)
class ControlOp:
    """A row group of the table: one ctlbench operation, the columns it prints (two for
    the two-step ones), the targets that run it and tmpfs's stand-in where tmpfs has no
    such operation."""

    op: Invocation
    columns: tuple[str, ...]
    targets: tuple[str, ...] = ("tmpfs", "floor", "kexecfs")
    tmpfs_op: Invocation | None = None

    def invocation(self, target: str, mnt: Path) -> list[str]:
        name, args = self.tmpfs_op if target == "tmpfs" and self.tmpfs_op else self.op
        return [name, *[a.format(m=mnt) for a in args]]


CONTROL_OPS = (
    ControlOp(("cat", ("{m}/state",)), ("cat state",)),
    ControlOp(("stat", ("{m}/state",)), ("stat state",)),  # attributes cached 1 s
    ControlOp(("stat", ("{m}/inst/fds/0",)), ("stat fds/<token>",)),  # timeout 0: a LOOKUP each
    ControlOp(("preserve", ("{m}/inst", "1")), ("write fd_preserve", "write fd_unpreserve"), TARGETS),
    ControlOp(("ioctl_state", ("{m}/control",)), ("ioctl GET_STATE",),
              tmpfs_op=("fionread", ("{m}/state",))),
    ControlOp(("ioctl_preserve", ("{m}/inst/control", "2")), ("ioctl FD_PRESERVE", "ioctl FD_UNPRESERVE"),
              ("floor", "kexecfs", "floor+take")),
)

Samples = dict[str, dict[str, list[list[int]]]]  # column -> target -> nanoseconds, one list per round


def make_tmpfs_tree(base: Path) -> None:
    (base / "inst" / "fds").mkdir(parents=True)
    (base / "state").write_text("normal\n")
    (base / "control").write_text("")
    for name in ("fd_preserve", "fd_unpreserve", "control"):
        (base / "inst" / name).write_text("")
    (base / "inst" / "fds" / "0").write_bytes(PATTERN)


GOAL_RATIO = 1.5
AGREEMENT = 0.10  # the largest change of a ratio from the previous run that counts as agreeing


def run(ws: Workspace, rounds: int, per_round: int, previous: Path | None = None) -> Section:
    """``previous``: the controlplane.json of the last run, to check that the ratios agree."""
    progress(f"control plane: {rounds} interleaved rounds x {per_round} iterations per operation and target")
    shm = Path(tempfile.mkdtemp(prefix="kexecfs-bench-", dir="/dev/shm"))
    memfd = make_memfd(MiB)
    try:
        with Daemon.kexecfs(ws, "control") as kx, Daemon.floor(ws, "floor") as floor, \
                Daemon.floor(ws, "take", take=True) as take:
            (kx.mnt / "inst").mkdir()
            preserve_all(kx.mnt / "inst", [memfd])  # token 0: fds/0 exists
            make_tmpfs_tree(shm)
            mounts = {"tmpfs": shm, "floor": floor.mnt, "kexecfs": kx.mnt, "floor+take": take.mnt}
            samples = measure(ws, mounts, rounds, per_round)
            traceback = kx.logged_traceback()
    finally:
        os.close(memfd)
        shutil.rmtree(shm, ignore_errors=True)
    data = summarize(samples)
    goals = report(data) + agreement(data, previous)
    if traceback:
        out("  WARNING: the kexecfs daemon logged a traceback during the control-plane run")
    return Section("controlplane", data, goals)


def measure(ws: Workspace, mounts: dict[str, Path], rounds: int, per_round: int) -> Samples:
    """Each round runs every operation on every target as a burst of ``per_round``
    iterations, one target after the other (who goes first rotates each round).

    Bursts, not one target after the other at every iteration: switching daemons at
    every request measured the cost of a cold CPU cache, and that cost grows with the
    daemon's working set, not with its work (kexecfs 111 us against the floor's 47 us
    for GET_STATE interleaved per request; 57 against 52 us in bursts, same run).
    Many short rounds still spread a busy moment of the machine over all targets."""
    samples: Samples = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in range(rounds):
        for row in CONTROL_OPS:
            for target in [t for t in turns(TARGETS, r) if t in row.targets]:
                burst: list[list[int]] = [[] for _ in row.columns]
                # One line per iteration: nanoseconds, one number per column.
                for line in run_tool([ws.ctlbench, str(per_round), "--", *row.invocation(target, mounts[target])],
                                     lines=True):
                    for values, value in zip(burst, line.split()):
                        values.append(int(value))
                for col, values in zip(row.columns, burst):
                    samples[col][target].append(values)
    return samples


def summarize(samples: Samples) -> dict[str, Any]:
    """Medians and 90th percentiles in microseconds, and kexecfs's ratios to the others.

    A ratio is the median over rounds of that round's ratio of medians: a busy moment of
    the machine slows the bursts of one round together, and it cancels in their ratio
    where it would move a median of all samples of one target (21 % between two runs
    with tests running beside them, against 8 % this way)."""
    data = {}
    for row in CONTROL_OPS:
        for col in row.columns:
            rounds = samples[col]
            every = {t: sorted(v for burst in bursts for v in burst) for t, bursts in rounds.items()}
            med = {t: statistics.median(v) / 1000 for t, v in every.items()}
            p90 = {t: v[int(len(v) * 0.9)] / 1000 for t, v in every.items()}

            def ratio(to: str) -> float | None:
                if to not in rounds:
                    return None
                return statistics.median(statistics.median(kx) / statistics.median(base)
                                         for kx, base in zip(rounds["kexecfs"], rounds[to]))
            data[col] = {"median_us": med, "p90_us": p90, "samples": {t: len(v) for t, v in every.items()},
                         "kexecfs_vs_floor": ratio("floor"), "kexecfs_vs_floor_take": ratio("floor+take"),
                         "kexecfs_vs_tmpfs": ratio("tmpfs")}
    return data


def report(data: dict[str, Any]) -> list[Goal]:
    rows = []
    for col, d in data.items():
        med, take, tmpfs = d["median_us"], d["kexecfs_vs_floor_take"], d["kexecfs_vs_tmpfs"]
        rows.append([col, med.get("tmpfs"), med["floor"], med.get("floor+take"), med["kexecfs"],
                     d["p90_us"]["kexecfs"], f"{d['kexecfs_vs_floor']:.2f}x", f"{take:.2f}x" if take else "",
                     f"{tmpfs:.0f}x" if tmpfs else "n/a"])
    table("1. Control plane: median latency in microseconds (C client, a burst per target in turn)",
          ["operation", "tmpfs", "floor", "floor+take", "kexecfs", "kexecfs p90", "kx/floor", "kx/(f+take)",
           "kx/tmpfs"], rows)
    out("  floor = bench/floorfs.py: pyfuse3 + trio + kexecfs._fusehook, constant answers, same FUSE options;")
    out("  floor+take = the same, but a preserve also takes the caller's descriptor (pidfd_open + pidfd_getfd),")
    out("  the least a preserve must do; tmpfs ioctl = FIONREAD on a tmpfs file; 'n/a' = no tmpfs equivalent.")
    goals = []
    for row in CONTROL_OPS:
        for col in row.columns:
            # Both columns of a two-step row come from one operation: one profile serves both.
            goals.append(Goal.at_most(f"control plane '{col}' vs pyfuse3 floor", data[col]["kexecfs_vs_floor"],
                                      GOAL_RATIO, profile=f"control:{col}", profile_key=f"control:{row.columns[0]}",
                                      reproduce=functools.partial(profile, row)))
    print_goals(goals)
    return goals


def agreement(data: dict[str, Any], previous: Path | None) -> list[Goal]:
    """Each kexecfs/floor ratio against the previous run's: the bench's own stability."""
    try:
        before = json.loads(previous.read_text()) if previous else None
    except (OSError, ValueError):
        before = None
    if not before:
        out("  no earlier control-plane run saved: nothing to check this one against")
        return []
    rows, worst = [], 0.0
    for col, d in data.items():
        old = before.get(col, {}).get("kexecfs_vs_floor")
        if old:
            change = d["kexecfs_vs_floor"] / old - 1
            worst = max(worst, abs(change))
            rows.append([col, f"{old:.2f}x", f"{d['kexecfs_vs_floor']:.2f}x", f"{change * 100:+.1f} %"])
    table(f"1b. Control plane: kexecfs/floor against the previous run's ({previous})",
          ["operation", "previous", "this run", "change"], rows)
    goal = Goal.at_most("control-plane ratios agree with the previous run's", worst * 100, AGREEMENT * 100,
                        unit=" %")
    out(goal.line())
    return [goal]


def profile(row: ControlOp, ws: Workspace, pyspy: str) -> dict[str, Any]:
    """Re-run one control-plane operation on kexecfs for 4 s under py-spy."""
    memfd = make_memfd(MiB)
    try:
        with Daemon.kexecfs(ws, "profile") as kx:
            (kx.mnt / "inst").mkdir()
            preserve_all(kx.mnt / "inst", [memfd])

            def action() -> None:
                deadline = time.monotonic() + 4
                while time.monotonic() < deadline:
                    run_tool([ws.ctlbench, "2000", "--", *row.invocation("kexecfs", kx.mnt)])
            return pyspy_record(pyspy, kx.pid, action, ws.work / f"profile-{row.op[0]}.txt")
    finally:
        os.close(memfd)
