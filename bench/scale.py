"""Section 5, scale: N instances x M memfds of 4 KiB in one daemon (1,000 x 100 wanted).

Every step is set against the same tree on tmpfs or the plain program: mkdir and
preserve rates (against creating the tree on tmpfs), ``ls -R`` (against the tmpfs tree),
``cat status``, image size against the bytes preserved, prepare + freeze (against
packing the same small files into one file + fsync), simulated kexec (against reading
them back), restore rate and the daemon's peak RSS. No goals: the figures show where
per-file costs add up.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .harness import PATTERN, Daemon, Section, Stopwatch, Workspace, fmt_bytes, out, progress, run_tool, table, turns

INSTANCE_FILES = ("state", "fd_preserve", "fd_unpreserve", "control")  # what tmpfs's twin gets per instance
# ~1.5 ms per file end to end (preserve, prepare, freeze, recovery) measured on a 2-core
# VM: what the time budget is divided by to find how many instances fit.
SECONDS_PER_FILE = 0.0015


@dataclass
class Tree:
    """The scale's instances: on kexecfs and, as the baseline, the same tree on tmpfs."""

    kx: Daemon
    shm: Path
    names: list[str]
    files: int  # per instance
    content: bytes

    @property
    def nfiles(self) -> int:
        return len(self.names) * self.files


def fit(n_inst: int, n_files: int, seconds_left: float) -> tuple[int, dict[str, int]]:
    """The instances that fit the time left, and a note for summary.json if that is fewer
    (printed too). The descriptor limit bounds nothing here any more: the keepers own the
    preserved descriptors, sharded, and the daemon holds a bounded few at a time."""
    notes = {}
    fit_inst = int(seconds_left / (n_files * SECONDS_PER_FILE))
    if fit_inst < n_inst:
        out()
        out(f"  NOTE: scale reduced from {n_inst} to {max(fit_inst, 10)} instances to fit the time budget "
            f"({seconds_left:.0f} s left)")
        notes["scale_reduced_from"] = n_inst
        n_inst = max(fit_inst, 10)
    return n_inst, notes


def run(ws: Workspace, n_inst: int, n_files: int, file_size: int, restore_instances: int,
        seconds_left: Callable[[], float]) -> Section:
    n_inst, notes = fit(n_inst, n_files, seconds_left())
    progress(f"scale: {n_inst} instances x {n_files} files of {fmt_bytes(file_size)}")
    shm = Path(tempfile.mkdtemp(prefix="kexecfs-bench-scale-", dir="/dev/shm"))
    res: dict[str, Any] = {"instances": n_inst, "files_per_instance": n_files, "file_size": file_size}
    try:
        with Daemon.kexecfs(ws, "scale") as kx:
            tree = Tree(kx, shm, [f"svc{i:05d}" for i in range(n_inst)], n_files, PATTERN[:file_size])
            res["mkdir_per_s"] = make_instances(tree)
            res.update(preserve_files(tree))
            res["ls_R_s"] = list_trees(tree)
            t = time.perf_counter()
            (kx.mnt / "status").read_text()
            res["cat_status_s"] = time.perf_counter() - t
            res.update(freeze_against_pack(ws, tree, file_size))
            res.update(kexec_and_restore(tree, restore_instances))
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    report(res, tree, restore_instances)
    return Section("scale", res, notes=notes)


def make_instances(tree: Tree) -> dict[str, float]:
    """mkdir of every instance, interleaved in blocks of 100 with the same on tmpfs."""
    kx, shm = Stopwatch(), Stopwatch()
    for block in range(0, len(tree.names), 100):
        with kx:
            for name in tree.names[block:block + 100]:
                os.mkdir(tree.kx.mnt / name)
        with shm:
            for name in tree.names[block:block + 100]:
                os.mkdir(tree.shm / name)
                os.mkdir(tree.shm / name / "fds")
    return {"kexecfs": len(tree.names) / kx.total, "tmpfs": len(tree.names) / shm.total}


def preserve_files(tree: Tree) -> dict[str, Any]:
    """Preserve every file through fd_preserve, each instance followed by writing its twin
    on tmpfs (which the ls -R and pack baselines then read)."""
    kx, shm = Stopwatch(), Stopwatch()
    started = time.monotonic()
    for i, name in enumerate(tree.names):
        pfd = os.open(tree.kx.mnt / name / "fd_preserve", os.O_WRONLY)
        for token in range(tree.files):
            fd = os.memfd_create("scale", os.MFD_CLOEXEC)
            os.write(fd, tree.content)
            with kx:
                os.write(pfd, f"{fd} {token}\n".encode())
            os.close(fd)
        os.close(pfd)
        with shm:
            for fname in INSTANCE_FILES:
                (tree.shm / name / fname).write_text("")
            for token in range(tree.files):
                (tree.shm / name / "fds" / str(token)).write_bytes(tree.content)
        if i and i in (len(tree.names) // 10, len(tree.names) // 2):
            progress(f"scale: {i * tree.files} files preserved, {i * tree.files / kx.total:.0f}/s")
    return {"preserve_per_s": {"kexecfs": tree.nfiles / kx.total, "tmpfs_create": tree.nfiles / shm.total},
            "preserve_wall_s": time.monotonic() - started,
            "rss_after_preserve": tree.kx.proc_status()["VmRSS"]}


def list_trees(tree: Tree) -> dict[str, list[float]]:
    """ls -R of the mount and of the tmpfs tree, twice, each going first once."""
    seconds: dict[str, list[float]] = {"kexecfs": [], "tmpfs": []}
    for r in range(2):
        for side in turns(("kexecfs", "tmpfs"), r):
            t = time.perf_counter()
            subprocess.run(["ls", "-R", str(tree.kx.mnt if side == "kexecfs" else tree.shm)],
                           stdout=subprocess.DEVNULL, check=True)
            seconds[side].append(time.perf_counter() - t)
    return seconds


def freeze_against_pack(ws: Workspace, tree: Tree, file_size: int) -> dict[str, Any]:
    """prepare + freeze, then the plain program packing the tmpfs twin into one file +
    fsync and reading it back (while the daemon is frozen, so they do not overlap)."""
    os.sync()
    res: dict[str, Any] = {"prepare_s": tree.kx.event("prepare"), "freeze_s": tree.kx.event("freeze")}
    res["image_bytes"] = tree.kx.image.stat().st_size
    res["preserved_bytes"] = tree.nfiles * file_size
    res["rss_frozen"] = tree.kx.proc_status()["VmRSS"]
    os.sync()
    listing = "\n".join(str(tree.shm / n / "fds" / str(t)) for n in tree.names for t in range(tree.files))
    dump = ws.work / "baseline" / "dump-scale"
    dump.parent.mkdir(exist_ok=True)
    w, f, _n = run_tool([ws.iobench, "pack", str(dump)], listing)
    (secs, _n) = run_tool([ws.iobench, "unpack", str(dump)], "\n".join([str(file_size)] * tree.nfiles))
    dump.unlink()
    res["baseline"] = {"write_fsync_s": float(w) + float(f), "readback_s": float(secs)}
    return res


def kexec_and_restore(tree: Tree, restore_instances: int) -> dict[str, Any]:
    """The simulated kexec, then restore of every file of the first ``restore_instances``."""
    res: dict[str, Any] = {"kexec_s": tree.kx.event("kexec"), "recovery_s": tree.kx.last_recovery_seconds()}
    t = time.perf_counter()
    for name in tree.names[:restore_instances]:
        for token in range(tree.files):
            os.close(os.open(tree.kx.mnt / name / "fds" / str(token), os.O_RDONLY))
    res["restore_per_s"] = restore_instances * tree.files / (time.perf_counter() - t)
    st = tree.kx.proc_status()
    res["daemon_VmHWM"] = st["VmHWM"]
    res["daemon_VmRSS_end"] = st["VmRSS"]
    tree.kx.event("finish")
    if tree.kx.logged_traceback():
        res["traceback"] = True
    return res


def report(res: dict[str, Any], tree: Tree, restore_instances: int) -> None:
    mkdir, preserve, ls, base = res["mkdir_per_s"], res["preserve_per_s"], res["ls_R_s"], res["baseline"]
    overhead = res["image_bytes"] / res["preserved_bytes"] - 1
    frozen = res["prepare_s"] + res["freeze_s"]
    rows = [
        ["mkdir (instances/s)", mkdir["tmpfs"], mkdir["kexecfs"], f"{mkdir['kexecfs'] / mkdir['tmpfs']:.2f}x"],
        ["preserve via fd_preserve (files/s) | tmpfs file create+write", preserve["tmpfs_create"],
         preserve["kexecfs"], f"{preserve['kexecfs'] / preserve['tmpfs_create']:.2f}x"],
        [f"ls -R of the tree (s), {tree.nfiles + 5 * len(tree.names)} entries", min(ls["tmpfs"]),
         min(ls["kexecfs"]), f"{min(ls['kexecfs']) / min(ls['tmpfs']):.0f}x slower"],
        ["cat status (s)", "", res["cat_status_s"], ""],
        [f"image size ({fmt_bytes(res['preserved_bytes'])} preserved)", fmt_bytes(res["preserved_bytes"]),
         fmt_bytes(res["image_bytes"]), f"+{overhead * 100:.1f}%"],
        ["prepare+freeze | pack into one file + fsync (s)", base["write_fsync_s"], frozen,
         f"{frozen / base['write_fsync_s']:.1f}x slower"],
        ["  of which freeze (blackout) (s)", "", res["freeze_s"], ""],
        ["simulated kexec (recovery) | read back into memfds (s)", base["readback_s"], res["kexec_s"],
         f"{res['kexec_s'] / base['readback_s']:.1f}x slower"],
        [f"restore: open fds/<token> (files/s, {restore_instances} instances)", "", res["restore_per_s"], ""],
        ["daemon peak RSS (VmHWM)", "", fmt_bytes(res["daemon_VmHWM"]), ""],
        ["daemon RSS after preserving / frozen", "",
         f"{fmt_bytes(res['rss_after_preserve'])} / {fmt_bytes(res['rss_frozen'])}", ""],
    ]
    table(f"5. Scale: {len(tree.names)} instances x {tree.files} memfds of {fmt_bytes(len(tree.content))} = "
          f"{tree.nfiles} files", ["what", "baseline", "kexecfs", "kexecfs vs baseline"], rows)
