#!/usr/bin/env python3
"""kexecfs benchmark suite (``make bench``): every figure next to a baseline measured
in the same run, interleaved with it, so that a busy machine slows both alike.

Sections (see bench/README.md for what each number means):

1. control plane: cat/stat/fd_preserve/ioctl latency against a minimal pyfuse3
   filesystem (bench/floorfs.py, the floor of this stack) and tmpfs;
2. freeze: handover image write throughput against a plain write + fsync;
3. recovery and restore: image read back into memfds against a plain copy, and reads
   through ``fds/<token>`` against reading the memfd itself;
4. blackout (freeze + simulated kexec + restore) against preserved bytes and file count,
   plotted to bench/results/blackout.png;
5. scale: many instances of many files;
6. memory: the daemon's peak RSS during freeze.

Progress goes to stderr, tables to stdout, data to bench/results/*.json. Needs root
(FUSE allow_other, pidfd_getfd) and a C compiler. ``--quick`` shrinks everything for
a smoke test.
"""

from __future__ import annotations

import argparse
import collections
import errno
import importlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
MiB, GiB = 1 << 20, 1 << 30
PATTERN = os.urandom(MiB)  # file contents: this MiB, repeated
T0 = time.monotonic()
IMAGE = "handover.kximg"


def elapsed() -> float:
    return time.monotonic() - T0


def progress(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def out(text: str = "") -> None:
    print(text, flush=True)


# ---------------------------------------------------------------------------- set-up

def have_matplotlib() -> bool:
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        progress("no plot: matplotlib is not installed (it comes with the bench extra: pip install -e '.[bench]')")
        return False


def find_pyspy() -> str | None:
    """The py-spy of this venv (the bench extra), else one on PATH, else None."""
    exe = Path(PY).parent / "py-spy"
    found = str(exe) if exe.exists() else shutil.which("py-spy")
    if not found:
        progress("py-spy is not installed (the bench extra: pip install -e '.[bench]'): missed goals get no profile")
    return found


def build(bindir: Path) -> dict[str, str]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        sys.exit("bench: no C compiler (cc/gcc)")
    bins = {}
    for name in ("ctlbench", "iobench"):
        exe = bindir / name
        # -I include: the C clients take the ioctl numbers and struct from kexecfs.h.
        subprocess.run([cc, "-O2", "-Wall", "-I", str(ROOT / "include"), "-o", str(exe), str(BENCH / f"{name}.c")],
                       check=True)
        bins[name] = str(exe)
    return bins


def raise_fd_limit() -> int:
    """Preserved files are descriptors held by the daemon, which inherits this limit."""
    try:
        nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
    except OSError:
        nr_open = 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (nr_open, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return soft


# ---------------------------------------------------------------------------- mounts

class Mount:
    """A kexecfs daemon (``python -m kexecfs mount --foreground``) or the floor filesystem."""

    def __init__(self, kind: str, mnt: Path, logfile: Path, image_dir: Path | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.kind, self.mnt, self.logfile, self.image_dir = kind, mnt, logfile, image_dir
        self.env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mount:
        self.mnt.mkdir(parents=True, exist_ok=True)
        if self.kind == "kexecfs":
            assert self.image_dir is not None
            cmd = [PY, "-m", "kexecfs", "mount", str(self.mnt), "--image-dir", str(self.image_dir), "--foreground"]
        else:
            cmd = [PY, str(BENCH / "floorfs.py"), str(self.mnt)]
        logf = open(self.logfile, "ab")
        # BENCH_DAEMON_PYTHONPATH: extra entries for experiments (e.g. a sitecustomize
        # that swaps in another implementation of something, to measure a proposed fix).
        pythonpath = ":".join(filter(None, [os.environ.get("BENCH_DAEMON_PYTHONPATH"), str(ROOT)]))
        self.proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONPATH": pythonpath, **self.env})
        logf.close()
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if os.path.ismount(self.mnt):
                try:
                    (self.mnt / "state").read_bytes()
                    return self
                except OSError:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not mount within 60 s:\n{self.log_tail()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            subprocess.run(["fusermount3", "-u", str(self.mnt)], capture_output=True)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if os.path.ismount(self.mnt) or _dead_mount(self.mnt):
            subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        self.proc = None

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def proc_status(self) -> dict[str, int]:
        """VmRSS, VmHWM etc. of the daemon, in bytes."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if rest.strip().endswith("kB"):
                values[key] = int(rest.split()[0]) * 1024
        return values

    def reset_hwm(self) -> None:
        """Reset VmHWM to the current RSS (clear_refs 5), to find the peak of one phase."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")

    def cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def event(self, event: str) -> float:
        """Write ``event`` to the global state file; the seconds the write(2) took."""
        fd = os.open(self.mnt / "state", os.O_WRONLY)
        try:
            t = time.perf_counter()
            try:
                os.write(fd, event.encode() + b"\n")
            except OSError as exc:
                raise RuntimeError(f"echo {event} > state: {exc}\n{self.log_tail()}") from None
            return time.perf_counter() - t
        finally:
            os.close(fd)

    def last_recovery_seconds(self) -> float | None:
        found = re.findall(r"recovered .* bytes of contents in ([0-9.]+) s", self.log_text())
        return float(found[-1]) if found else None


def _dead_mount(path: Path) -> bool:
    try:
        os.stat(path)
        return False
    except OSError as exc:
        return exc.errno == errno.ENOTCONN


# ---------------------------------------------------------------------------- helpers

def make_memfd(size: int, name: str = "bench") -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    done = 0
    while done < size:
        done += os.write(fd, PATTERN[:min(MiB, size - done)])
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def preserve_all(inst: Path, fds: list[int], first_token: int = 0) -> float:
    """Preserve ``fds`` as tokens first_token.. through fd_preserve; the seconds spent in write(2)."""
    pfd = os.open(inst / "fd_preserve", os.O_WRONLY)
    spent = 0.0
    try:
        for i, fd in enumerate(fds):
            line = f"{fd} {first_token + i}\n".encode()
            t = time.perf_counter()
            os.write(pfd, line)
            spent += time.perf_counter() - t
    finally:
        os.close(pfd)
    return spent


def run_tool(args: list[str], stdin: str = "", lines: bool = False) -> list[str]:
    r = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout.splitlines() if lines else r.stdout.split()


def self_fd(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def rate(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def table(title: str, headers: list[str], rows: list[list[Any]]) -> None:
    cells = [[str(c) for c in headers]] + [[c if isinstance(c, str) else _num(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out()
    out(f"== {title}")
    for n, row in enumerate(cells):
        out("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if n == 0:
            out("  " + "  ".join("-" * w for w in widths))


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if v >= 100:
            return f"{v:.0f}"
        if v >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


class Goals:
    """Goal lines: target, measured value, met or not, by how far."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def at_least(self, name: str, value: float | None, target: float, profile: str | None = None) -> None:
        met = value is not None and value >= target
        factor = (target / value if value else float("inf")) if not met else 1.0
        self.items.append({"goal": name, "want": f">= {target}x", "value": value, "met": met,
                           "missed_by": factor, "profile": profile})

    def at_most(self, name: str, value: float | None, target: float, unit: str = "x",
                profile: str | None = None) -> None:
        met = value is not None and value <= target
        factor = (value / target if value is not None else float("inf")) if not met else 1.0
        self.items.append({"goal": name, "want": f"<= {target}{unit}", "value": value, "met": met,
                           "missed_by": factor, "profile": profile, "unit": unit})

    def print(self, section: str | None = None, items: list[dict[str, Any]] | None = None) -> None:
        for g in items if items is not None else self.items:
            value = "n/a" if g["value"] is None else f"{g['value']:.2f}{g.get('unit', 'x')}"
            verdict = "met" if g["met"] else f"NOT MET (missed by {g['missed_by']:.1f}x)"
            out(f"  GOAL {g['goal']}: want {g['want']}, got {value}: {verdict}")


GOALS = Goals()


# ---------------------------------------------------------------------------- 1. control plane

CONTROL_OPS = [
    # (row name, {target: (ctlbench op, args)}, columns)
    ("cat state (open+read+close)", {"*": ("cat", ["{m}/state"])}, ["cat state"]),
    ("stat state (attrs cached 1 s)", {"*": ("stat", ["{m}/state"])}, ["stat state"]),
    ("stat fds/<token> (uncached)", {"*": ("stat", ["{m}/inst/fds/0"])}, ["stat fds/<token>"]),
    ("write fd_preserve + fd_unpreserve", {"*": ("preserve", ["{m}/inst", "1"])},
     ["write fd_preserve", "write fd_unpreserve"]),
    ("ioctl GET_STATE", {"*": ("ioctl_state", ["{m}/control"]), "tmpfs": ("fionread", ["{m}/state"])},
     ["ioctl GET_STATE"]),
    ("ioctl FD_PRESERVE + FD_UNPRESERVE", {"*": ("ioctl_preserve", ["{m}/inst/control", "2"]), "tmpfs": None},
     ["ioctl FD_PRESERVE", "ioctl FD_UNPRESERVE"]),
]
TAKE_OPS = {"preserve", "ioctl_preserve"}  # the rows the floor+take filesystem runs too


def make_tmpfs_tree(base: Path) -> None:
    (base / "inst" / "fds").mkdir(parents=True)
    (base / "state").write_text("normal\n")
    (base / "control").write_text("")
    for name in ("fd_preserve", "fd_unpreserve", "control"):
        (base / "inst" / name).write_text("")
    (base / "inst" / "fds" / "0").write_bytes(PATTERN)


def bench_control(work: Path, bins: dict[str, str], rounds: int, per_round: int) -> dict[str, Any]:
    progress(f"control plane: {rounds} interleaved rounds x {per_round} iterations per operation and target")
    kx = Mount("kexecfs", work / "mnt-control", work / "kexecfs-control.log", work / "img-control").start()
    floor = Mount("floor", work / "mnt-floor", work / "floorfs.log").start()
    take = Mount("floor", work / "mnt-take", work / "floorfs-take.log", env={"FLOOR_TAKE": "1"}).start()
    shm = Path(tempfile.mkdtemp(prefix="kexecfs-bench-", dir="/dev/shm"))
    memfd = make_memfd(MiB)
    try:
        (kx.mnt / "inst").mkdir()
        preserve_all(kx.mnt / "inst", [memfd])  # token 0: fds/0 exists
        make_tmpfs_tree(shm)
        targets = {"tmpfs": shm, "floor": floor.mnt, "kexecfs": kx.mnt, "floor+take": take.mnt}
        samples: dict[str, dict[str, list[int]]] = collections.defaultdict(lambda: collections.defaultdict(list))
        order = list(targets)
        for r in range(rounds):
            for _row, spec, columns in CONTROL_OPS:
                # One process runs the targets in turn, each iteration (see ctlbench.c).
                rotated = [t for t in order[r % 4:] + order[:r % 4] if spec.get(t, spec["*"]) is not None
                           and (t != "floor+take" or spec["*"][0] in TAKE_OPS)]
                cmd = [bins["ctlbench"], str(per_round)]
                for target in rotated:
                    name, args = spec.get(target, spec["*"])
                    cmd += ["--", name, *[a.format(m=targets[target]) for a in args]]
                for line in run_tool(cmd, lines=True):
                    values = [int(v) for v in line.split()]
                    for k, target in enumerate(rotated):
                        for c, col in enumerate(columns):
                            samples[col][target].append(values[k * len(columns) + c])
        kx_log = kx.log_text()
    finally:
        kx.stop()
        floor.stop()
        take.stop()
        os.close(memfd)
        shutil.rmtree(shm, ignore_errors=True)
    rows, data = [], {}
    for _row, _spec, columns in CONTROL_OPS:
        for col in columns:
            med = {t: statistics.median(v) / 1000 if v else None for t, v in samples[col].items()}
            p90 = {t: sorted(v)[int(len(v) * 0.9)] / 1000 if v else None for t, v in samples[col].items()}
            ratio_floor = med["kexecfs"] / med["floor"]
            ratio_tmpfs = med["kexecfs"] / med["tmpfs"] if med.get("tmpfs") else None
            ratio_take = med["kexecfs"] / med["floor+take"] if med.get("floor+take") else None
            rows.append([col, med.get("tmpfs"), med["floor"], med.get("floor+take"), med["kexecfs"], p90["kexecfs"],
                         f"{ratio_floor:.2f}x", f"{ratio_take:.2f}x" if ratio_take else "",
                         f"{ratio_tmpfs:.0f}x" if ratio_tmpfs else "n/a"])
            data[col] = {"median_us": med, "p90_us": p90, "samples": {t: len(v) for t, v in samples[col].items()},
                         "kexecfs_vs_floor": ratio_floor, "kexecfs_vs_floor_take": ratio_take,
                         "kexecfs_vs_tmpfs": ratio_tmpfs}
    table("1. Control plane: median latency in microseconds (C client, targets interleaved per iteration)",
          ["operation", "tmpfs", "floor", "floor+take", "kexecfs", "kexecfs p90", "kx/floor", "kx/(f+take)",
           "kx/tmpfs"], rows)
    out("  floor = bench/floorfs.py: pyfuse3 + trio + kexecfs._fusehook, constant answers, same FUSE options;")
    out("  floor+take = the same, but a preserve also takes the caller's descriptor (pidfd_open + pidfd_getfd),")
    out("  the least a preserve must do; tmpfs ioctl = FIONREAD on a tmpfs file; 'n/a' = no tmpfs equivalent.")
    start = len(GOALS.items)
    for col, d in data.items():
        GOALS.at_most(f"control plane '{col}' vs pyfuse3 floor", d["kexecfs_vs_floor"], 1.2,
                      profile=f"control:{col}")
        GOALS.items[-1]["profile_key"] = "control:" + next(spec["*"][0] for _r, spec, cols in CONTROL_OPS
                                                            if col in cols)
    GOALS.print(items=GOALS.items[start:])
    if "Traceback" in kx_log:
        out("  WARNING: the kexecfs daemon logged a traceback during the control-plane run")
    return data


def profile_control(work: Path, bins: dict[str, str], pyspy: str, column: str) -> dict[str, Any]:
    """Re-run one control-plane operation on kexecfs under py-spy."""
    for _row, spec, columns in CONTROL_OPS:
        if column in columns:
            name, args = spec["*"]
            break
    else:
        raise KeyError(column)
    kx = Mount("kexecfs", work / "mnt-profile", work / "kexecfs-profile.log", work / "img-profile").start()
    memfd = make_memfd(MiB)
    try:
        (kx.mnt / "inst").mkdir()
        preserve_all(kx.mnt / "inst", [memfd])

        def action() -> None:
            deadline = time.monotonic() + 4
            while time.monotonic() < deadline:
                run_tool([bins["ctlbench"], "2000", "--", name, *[a.format(m=kx.mnt) for a in args]])
        return pyspy_record(pyspy, kx.pid, action, work / f"profile-{name}.txt")
    finally:
        kx.stop()
        os.close(memfd)


# ---------------------------------------------------------------------------- 2+3. data path

def kexecfs_cycle(work: Path, fds: list[int], size: int, tag: str, read_test: Callable[[Mount, Path], Any] | None = None,
                  restore: bool = True) -> dict[str, Any]:
    """One live update of ``fds`` through a fresh daemon: preserve, prepare, freeze, kexec,
    restore; timings, RSS and image size."""
    img = work / f"img-{tag}"
    shutil.rmtree(img, ignore_errors=True)
    m = Mount("kexecfs", work / f"mnt-{tag}", work / f"kexecfs-{tag}.log", img).start()
    res: dict[str, Any] = {}
    try:
        inst = m.mnt / "bench"
        inst.mkdir()
        res["preserve_s"] = preserve_all(inst, fds)
        os.sync()
        st = m.proc_status()
        res["rss_before"] = st["VmRSS"]
        m.reset_hwm()
        res["prepare_s"] = m.event("prepare")
        res["hwm_prepare"] = m.proc_status()["VmHWM"]
        res["freeze_s"] = m.event("freeze")
        res["hwm_freeze"] = m.proc_status()["VmHWM"]
        res["image_bytes"] = (img / IMAGE).stat().st_size
        m.reset_hwm()
        res["kexec_s"] = m.event("kexec")
        res["hwm_kexec"] = m.proc_status()["VmHWM"]
        res["recovery_s"] = m.last_recovery_seconds()
        if restore:
            # open (= restore) every fds/<token>; each is closed at once so that 10,000
            # files fit in RLIMIT_NOFILE twice over (here and the daemon's dup).
            t = time.perf_counter()
            for token in range(len(fds)):
                os.close(os.open(inst / "fds" / str(token), os.O_RDONLY))
            res["restore_s"] = time.perf_counter() - t
        if read_test:
            res["read"] = read_test(m, inst)
        m.event("finish")
        res["hwm_total"] = m.proc_status()["VmHWM"]
        if "Traceback" in m.log_text():
            res["traceback"] = True
        res["log"] = m.log_text()
    finally:
        m.stop()
        shutil.rmtree(img, ignore_errors=True)
    res["blackout_s"] = res["freeze_s"] + res["kexec_s"] + res.get("restore_s", 0.0)
    return res


def baseline_cycle(work: Path, bins: dict[str, str], fds: list[int], size: int) -> dict[str, Any]:
    """The plain program: write the same bytes to one file on the same filesystem and
    fsync it, then read them back into new memfds."""
    dump = work / "baseline" / "dump"
    dump.parent.mkdir(exist_ok=True)
    os.sync()
    w, f, nbytes = run_tool([bins["iobench"], "pack", str(dump)], "\n".join(self_fd(fd) for fd in fds))
    (secs, _n) = run_tool([bins["iobench"], "unpack", str(dump)], "\n".join(str(size) for _ in fds))
    dump.unlink()
    return {"write_s": float(w), "fsync_s": float(f), "bytes": int(nbytes), "readback_s": float(secs),
            "blackout_s": float(w) + float(f) + float(secs)}


def read_compare(bins: dict[str, str], memfd: int, reps: int) -> Callable[[Mount, Path], dict[str, Any]]:
    """Read fds/0 through the mount and the original memfd, alternately; the daemon's CPU
    time during the mount reads tells whether passthrough served them."""
    def test(m: Mount, inst: Path) -> dict[str, Any]:
        res: dict[str, Any] = {"memfd": [], "fds": [], "daemon_cpu_share": []}
        # The memfd itself: the restored one, which fds/0 serves, through the daemon's fd table.
        # Opened here (a file of the same inode), as the daemon's own descriptors come and go.
        restored = -1
        for n in os.listdir(f"/proc/{m.pid}/fd"):
            try:
                if os.readlink(f"/proc/{m.pid}/fd/{n}").startswith("/memfd:"):
                    fd = os.open(f"/proc/{m.pid}/fd/{n}", os.O_RDONLY | os.O_CLOEXEC)
                    if os.fstat(fd).st_size == os.fstat(memfd).st_size:
                        restored = fd
                        break
                    os.close(fd)
            except OSError:
                continue
        source = self_fd(restored if restored >= 0 else memfd)
        res["memfd_path"] = "the restored memfd" if restored >= 0 else "the original memfd"
        for r in range(reps):
            for which in (("memfd", "fds") if r % 2 == 0 else ("fds", "memfd")):
                if which == "memfd":
                    secs, n = run_tool([bins["iobench"], "read", source])
                else:
                    cpu = m.cpu()
                    secs, n = run_tool([bins["iobench"], "read", str(inst / "fds" / "0")])
                    res["daemon_cpu_share"].append((m.cpu() - cpu) / float(secs))
                res[which].append(rate(int(n), float(secs)))
        if restored >= 0:
            os.close(restored)
        return res
    return test


def bench_datapath(work: Path, bins: dict[str, str], layouts: list[tuple[int, int]], reps: int,
                   read_reps: int) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for count, size in layouts:
        label = f"{count} x {fmt_bytes(size)}"
        progress(f"freeze/recovery: {label}, {reps} interleaved repetitions against write+fsync / read-back")
        fds = [make_memfd(size) for _ in range(count)]
        kx_runs, base_runs = [], []
        try:
            for r in range(reps):
                for who in (("baseline", "kexecfs") if r % 2 == 0 else ("kexecfs", "baseline")):
                    if who == "baseline":
                        base_runs.append(baseline_cycle(work, bins, fds, size))
                    else:
                        read_test = read_compare(bins, fds[0], read_reps) if count == 1 else None
                        kx_runs.append(kexecfs_cycle(work, fds, size, f"data{count}", read_test))
        finally:
            for fd in fds:
                os.close(fd)
        data[label] = {"count": count, "size": size, "bytes": count * size,
                       "kexecfs": [{k: v for k, v in run.items() if k != "log"} for run in kx_runs],
                       "baseline": base_runs, "log_tail": kx_runs[-1]["log"].splitlines()[-12:],
                       "passthrough_log": [line for run in kx_runs for line in run["log"].splitlines()
                                           if "passthrough" in line.lower()][-3:]}
    report_datapath(data)
    return data


def _best(runs: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> float:
    return min(key(r) for r in runs)


def report_datapath(data: dict[str, Any]) -> None:
    rows, rrows, goals_start = [], [], len(GOALS.items)
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
        GOALS.at_least(f"freeze throughput {label} (prepare+freeze vs write+fsync)", both_ratio, 0.8,
                       profile=f"freeze:{d['count']}:{d['size']}")
        b_read = _best(base, lambda r: r["readback_s"])
        k_kexec = _best(kx, lambda r: r["kexec_s"])
        k_recov = min((r["recovery_s"] for r in kx if r["recovery_s"]), default=None)
        k_restore = _best(kx, lambda r: r.get("restore_s", 0.0))
        rec_ratio = rate(nbytes, k_kexec) / rate(nbytes, b_read)
        d["summary"].update({"baseline_readback_GBps": rate(nbytes, b_read), "kexecfs_kexec_GBps": rate(nbytes, k_kexec),
                             "kexecfs_recovery_s": k_recov, "kexecfs_restore_s": k_restore,
                             "recovery_ratio": rec_ratio})
        rrows += [[f"{label}: simulated kexec (whole event) | read-back", f"{rate(nbytes, b_read):.2f} GB/s",
                   f"{rate(nbytes, k_kexec):.2f} GB/s", f"{rec_ratio:.2f}x"],
                  [f"{label}: recovery alone (daemon log) | read-back", f"{rate(nbytes, b_read):.2f} GB/s",
                   f"{rate(nbytes, k_recov):.2f} GB/s" if k_recov else "n/a",
                   f"{rate(nbytes, k_recov) / rate(nbytes, b_read):.2f}x" if k_recov else "n/a"],
                  [f"{label}: restore (open every fds/<token>)", "", f"{k_restore * 1000:.1f} ms", ""]]
        GOALS.at_least(f"recovery throughput {label} (simulated kexec vs plain read-back)", rec_ratio, 0.8,
                       profile=f"recovery:{d['count']}:{d['size']}")
    table("2. Freeze: handover image write (best of the repetitions; baseline = C write(2) loop + fsync, one file)",
          ["what", "baseline", "kexecfs", "ratio"], rows)
    GOALS.print(items=[g for g in GOALS.items[goals_start:] if g["goal"].startswith("freeze")])
    table("3a. Recovery: image read back into restored memfds (baseline = C read-back into new memfds)",
          ["what", "baseline", "kexecfs", "ratio"], rrows)
    GOALS.print(items=[g for g in GOALS.items[goals_start:] if g["goal"].startswith("recovery")])
    for label, d in data.items():
        reads = [r["read"] for r in d["kexecfs"] if r.get("read")]
        if not reads:
            continue
        memfd = max(v for r in reads for v in r["memfd"])
        fds = max(v for r in reads for v in r["fds"])
        cpu = statistics.median(v for r in reads for v in r["daemon_cpu_share"])
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
        GOALS.at_least(f"read through fds/<token> vs memfd ({label})", fds / memfd, 0.9, profile="read")
        GOALS.print(items=GOALS.items[-1:])


# ---------------------------------------------------------------------------- 4. blackout

def bench_blackout(work: Path, bins: dict[str, str], sizes: list[int], counts: list[int], total: int,
                   reuse: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]],
                   budget_left: Callable[[], float]) -> dict[str, Any]:
    points: list[dict[str, Any]] = []
    skipped = []
    plan = [("size", 1, s) for s in sizes] + [("count", n, max(4096, total // n // 4096 * 4096)) for n in counts]
    done: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any]]] = dict(reuse)
    for i, (axis, count, size) in enumerate(plan):
        key = (count, size)
        if key not in done:
            need = count * size / (120 * MiB) + count * 0.002  # rough seconds for both sides
            if need > budget_left():
                skipped.append(f"{count} x {fmt_bytes(size)} (needs ~{need:.0f} s, {budget_left():.0f} s left)")
                continue
            progress(f"blackout: {count} x {fmt_bytes(size)}")
            fds = [make_memfd(size) for _ in range(count)]
            try:
                if i % 2:
                    kx = kexecfs_cycle(work, fds, size, "blackout")
                    base = baseline_cycle(work, bins, fds, size)
                else:
                    base = baseline_cycle(work, bins, fds, size)
                    kx = kexecfs_cycle(work, fds, size, "blackout")
            finally:
                for fd in fds:
                    os.close(fd)
            kx.pop("log", None)
            done[key] = (kx, base)
        kx, base = done[key]
        points.append({"axis": axis, "count": count, "size": size, "bytes": count * size,
                       "freeze_s": kx["freeze_s"], "kexec_s": kx["kexec_s"], "restore_s": kx["restore_s"],
                       "recovery_s": kx.get("recovery_s"), "prepare_s": kx["prepare_s"],
                       "blackout_s": kx["blackout_s"], "baseline_s": base["blackout_s"],
                       "baseline_write_fsync_s": base["write_s"] + base["fsync_s"],
                       "baseline_readback_s": base["readback_s"]})
    for axis, title in (("size", "4a. Blackout vs preserved bytes (one file)"),
                        ("count", f"4b. Blackout vs file count ({fmt_bytes(total)} in all)")):
        rows = [[f"{p['count']} x {fmt_bytes(p['size'])}", p["prepare_s"], p["freeze_s"], p["kexec_s"],
                 p["restore_s"], p["blackout_s"], p["baseline_s"], f"{p['blackout_s'] / p['baseline_s']:.2f}x"]
                for p in points if p["axis"] == axis]
        table(title + ": seconds; blackout = freeze + kexec (incl. recovery) + restore",
              ["files", "prepare", "freeze", "kexec", "restore", "BLACKOUT", "baseline", "kx/base"], rows)
    out("  baseline = a plain program's blackout without a prepare step: write+fsync the bytes to one file,")
    out("  then read them back into new memfds (C). prepare is not part of the blackout (services still run).")
    for s in skipped:
        out(f"  SKIPPED for time: {s}")
    return {"points": points, "skipped": skipped}


def plot_blackout(blackout: dict[str, Any], path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib unavailable: no plot"
    pts = blackout["points"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, axis, xkey, xlabel in ((axes[0], "size", "bytes", "preserved bytes (one memfd), MiB"),
                                    (axes[1], "count", "count", "number of preserved memfds")):
        p = [q for q in pts if q["axis"] == axis]
        if not p:
            continue
        x = [q[xkey] / MiB if axis == "size" else q[xkey] for q in p]
        ax.plot(x, [q["blackout_s"] for q in p], "o-", label="kexecfs blackout (freeze+kexec+restore)", lw=2)
        ax.plot(x, [q["freeze_s"] for q in p], "s--", label="  freeze", alpha=.7)
        ax.plot(x, [q["kexec_s"] for q in p], "^--", label="  simulated kexec (recovery)", alpha=.7)
        ax.plot(x, [q["restore_s"] for q in p], "v--", label="  restore (open fds/<token>)", alpha=.7)
        ax.plot(x, [q["baseline_s"] for q in p], "k:", label="baseline: write+fsync+read back", lw=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=.3)
        if axis == "count":
            ax.set_title(f"blackout vs file count ({fmt_bytes(p[0]['bytes'])}-ish in all)")
        else:
            ax.set_title("blackout vs preserved bytes")
        ax.legend(fontsize=8)
    fig.suptitle("kexecfs blackout (simulated kexec), " + time.strftime("%Y-%m-%d %H:%M"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


# ---------------------------------------------------------------------------- 5. scale

def bench_scale(work: Path, bins: dict[str, str], n_inst: int, n_files: int, file_size: int,
                restore_instances: int) -> dict[str, Any]:
    progress(f"scale: {n_inst} instances x {n_files} files of {fmt_bytes(file_size)}")
    img = work / "img-scale"
    shutil.rmtree(img, ignore_errors=True)
    shm = Path(tempfile.mkdtemp(prefix="kexecfs-bench-scale-", dir="/dev/shm"))
    m = Mount("kexecfs", work / "mnt-scale", work / "kexecfs-scale.log", img).start()
    res: dict[str, Any] = {"instances": n_inst, "files_per_instance": n_files, "file_size": file_size}
    nfiles = n_inst * n_files
    content = PATTERN[:file_size]
    try:
        # mkdir, interleaved in blocks with the same on tmpfs
        t_kx = t_shm = 0.0
        names = [f"svc{i:05d}" for i in range(n_inst)]
        for block in range(0, n_inst, 100):
            t = time.perf_counter()
            for name in names[block:block + 100]:
                os.mkdir(m.mnt / name)
            t_kx += time.perf_counter() - t
            t = time.perf_counter()
            for name in names[block:block + 100]:
                os.mkdir(shm / name)
                os.mkdir(shm / name / "fds")
            t_shm += time.perf_counter() - t
        res["mkdir_per_s"] = {"kexecfs": n_inst / t_kx, "tmpfs": n_inst / t_shm}
        # preserve (kexecfs) and the same files written on tmpfs (the ls -R and pack baselines)
        t_kx = t_shm = 0.0
        done_at = time.monotonic()
        for i, name in enumerate(names):
            for token in range(n_files):
                fd = os.memfd_create("scale", os.MFD_CLOEXEC)
                os.write(fd, content)
                pfd = os.open(m.mnt / name / "fd_preserve", os.O_WRONLY) if token == 0 else pfd
                t = time.perf_counter()
                os.write(pfd, f"{fd} {token}\n".encode())
                t_kx += time.perf_counter() - t
                os.close(fd)
            os.close(pfd)
            t = time.perf_counter()
            for fname in ("state", "fd_preserve", "fd_unpreserve", "control"):
                (shm / name / fname).write_text("")
            for token in range(n_files):
                (shm / name / "fds" / str(token)).write_bytes(content)
            t_shm += time.perf_counter() - t
            if i in (n_inst // 10, n_inst // 2) and i:
                progress(f"scale: {i * n_files} files preserved, {i * n_files / t_kx:.0f}/s")
        res["preserve_per_s"] = {"kexecfs": nfiles / t_kx, "tmpfs_create": nfiles / t_shm}
        res["preserve_wall_s"] = time.monotonic() - done_at
        res["rss_after_preserve"] = m.proc_status()["VmRSS"]
        # ls -R, kexecfs and tmpfs alternately
        ls = {"kexecfs": [], "tmpfs": []}
        for r in range(2):
            for who, path in ((("kexecfs", m.mnt), ("tmpfs", shm)) if r == 0 else (("tmpfs", shm), ("kexecfs", m.mnt))):
                t = time.perf_counter()
                subprocess.run(["ls", "-R", str(path)], stdout=subprocess.DEVNULL, check=True)
                ls[who].append(time.perf_counter() - t)
        res["ls_R_s"] = ls
        t = time.perf_counter()
        (m.mnt / "status").read_text()
        res["cat_status_s"] = time.perf_counter() - t
        # prepare/freeze against packing the same bytes into one file
        os.sync()
        res["prepare_s"] = m.event("prepare")
        res["freeze_s"] = m.event("freeze")
        res["image_bytes"] = (img / "handover.kximg").stat().st_size
        res["preserved_bytes"] = nfiles * file_size
        res["rss_frozen"] = m.proc_status()["VmRSS"]
        os.sync()
        listing = "\n".join(str(shm / n / "fds" / str(t)) for n in names for t in range(n_files))
        dump = work / "baseline" / "dump-scale"
        dump.parent.mkdir(exist_ok=True)
        w, f, _n = run_tool([bins["iobench"], "pack", str(dump)], listing)
        (secs, _n) = run_tool([bins["iobench"], "unpack", str(dump)], "\n".join([str(file_size)] * nfiles))
        dump.unlink()
        res["baseline"] = {"write_fsync_s": float(w) + float(f), "readback_s": float(secs)}
        res["kexec_s"] = m.event("kexec")
        res["recovery_s"] = m.last_recovery_seconds()
        t = time.perf_counter()
        for name in names[:restore_instances]:
            for tok in range(n_files):
                os.close(os.open(m.mnt / name / "fds" / str(tok), os.O_RDONLY))
        res["restore_per_s"] = restore_instances * n_files / (time.perf_counter() - t)
        st = m.proc_status()
        res["daemon_VmHWM"] = st["VmHWM"]
        res["daemon_VmRSS_end"] = st["VmRSS"]
        m.event("finish")
        if "Traceback" in m.log_text():
            res["traceback"] = True
    finally:
        m.stop()
        shutil.rmtree(img, ignore_errors=True)
        shutil.rmtree(shm, ignore_errors=True)
    overhead = res["image_bytes"] / res["preserved_bytes"] - 1
    rows = [
        ["mkdir (instances/s)", res["mkdir_per_s"]["tmpfs"], res["mkdir_per_s"]["kexecfs"],
         f"{res['mkdir_per_s']['kexecfs'] / res['mkdir_per_s']['tmpfs']:.2f}x"],
        ["preserve via fd_preserve (files/s) | tmpfs file create+write", res["preserve_per_s"]["tmpfs_create"],
         res["preserve_per_s"]["kexecfs"], f"{res['preserve_per_s']['kexecfs'] / res['preserve_per_s']['tmpfs_create']:.2f}x"],
        [f"ls -R of the tree (s), {nfiles + 5 * n_inst} entries", min(ls["tmpfs"]), min(ls["kexecfs"]),
         f"{min(ls['kexecfs']) / min(ls['tmpfs']):.0f}x slower"],
        ["cat status (s)", "", res["cat_status_s"], ""],
        [f"image size ({fmt_bytes(res['preserved_bytes'])} preserved)", fmt_bytes(res["preserved_bytes"]),
         fmt_bytes(res["image_bytes"]), f"+{overhead * 100:.1f}%"],
        ["prepare+freeze | pack into one file + fsync (s)", res["baseline"]["write_fsync_s"],
         res["prepare_s"] + res["freeze_s"], f"{(res['prepare_s'] + res['freeze_s']) / res['baseline']['write_fsync_s']:.1f}x slower"],
        ["  of which freeze (blackout) (s)", "", res["freeze_s"], ""],
        ["simulated kexec (recovery) | read back into memfds (s)", res["baseline"]["readback_s"], res["kexec_s"],
         f"{res['kexec_s'] / res['baseline']['readback_s']:.1f}x slower"],
        [f"restore: open fds/<token> (files/s, {restore_instances} instances)", "", res["restore_per_s"], ""],
        ["daemon peak RSS (VmHWM)", "", fmt_bytes(res["daemon_VmHWM"]), ""],
        ["daemon RSS after preserving / frozen", "",
         f"{fmt_bytes(res['rss_after_preserve'])} / {fmt_bytes(res['rss_frozen'])}", ""],
    ]
    table(f"5. Scale: {n_inst} instances x {n_files} memfds of {fmt_bytes(file_size)} = {nfiles} files",
          ["what", "baseline", "kexecfs", "kexecfs vs baseline"], rows)
    return res


# ---------------------------------------------------------------------------- 6. memory

def report_memory(data: dict[str, Any]) -> dict[str, Any]:
    rows, mem = [], {}
    for label, d in data.items():
        runs = d["kexecfs"]
        growth = max(max(r["hwm_prepare"], r["hwm_freeze"]) - r["rss_before"] for r in runs)
        kexec_growth = max(r["hwm_kexec"] - r["rss_before"] for r in runs)
        before = runs[0]["rss_before"]
        mem[label] = {"rss_before": before, "freeze_peak_growth": growth, "kexec_peak_growth": kexec_growth}
        rows.append([label, fmt_bytes(before), fmt_bytes(before + growth), f"+{fmt_bytes(growth)}",
                     f"+{fmt_bytes(kexec_growth)}"])
    table("6. Memory: daemon RSS (VmHWM reset before the phase; worst repetition)",
          ["preserved", "RSS before", "peak in prepare+freeze", "growth", "growth in kexec+recovery"], rows)
    for label, m in mem.items():
        GOALS.at_most(f"daemon peak RSS growth during freeze of {label}", m["freeze_peak_growth"] / MiB, 64, " MiB",
                      profile=None)
        GOALS.print(items=GOALS.items[-1:])
    return mem


# ---------------------------------------------------------------------------- profiles

def pyspy_record(pyspy: str, pid: int, action: Callable[[], Any], path: Path) -> dict[str, Any]:
    """Sample ``pid`` with py-spy while ``action`` runs; the top of the profile."""
    # --native shows time inside C (zlib, libc, the kernel entry points) instead of
    # charging it to the Python frame that called it; it pauses the daemon per sample.
    proc = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
                             "--rate", "200", "--native"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    try:
        action()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    if not path.exists():
        return {"error": f"py-spy wrote nothing: {err.strip()[-300:]}"}
    return summarize_profile(path)


_OUTER = re.compile(r"\((kexecfs/(cli|daemon|__main__)\.py|<frozen runpy>)\)")


def summarize_profile(path: Path, top: int = 10) -> dict[str, Any]:
    """Top of a py-spy raw profile: leaf functions (self time), and each sample charged to
    the deepest kexecfs function on its stack (its own time plus the C, libc and kernel
    calls it makes); samples with no kexecfs function are the FUSE/trio stack itself."""
    self_t: collections.Counter[str] = collections.Counter()
    owner: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        frames = [re.sub(r"\(/[^)]*/((?:kexecfs|site-packages|lib/python3\.\d+)/[^)]*)\)", r"(\1)", f)
                  for f in frames]
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        self_t[frames[-1]] += n
        ours = [f for f in frames if "(kexecfs/" in f and not _OUTER.search(f) and "_fusehook.c" not in f]
        owner[ours[-1] if ours else "(no kexecfs function: pyfuse3, trio, libfuse, kernel, idle waits)"] += n
    if not total:
        return {"samples": 0, "self": [], "by_kexecfs_function": []}
    return {"samples": total,
            "self": [(f, n / total) for f, n in self_t.most_common(top)],
            "by_kexecfs_function": [(f, n / total) for f, n in owner.most_common(top)]}


def print_profile(title: str, prof: dict[str, Any]) -> None:
    out()
    out(f"-- profile: {title} ({prof.get('samples', 0)} samples of the daemon, py-spy --native)")
    if "error" in prof:
        out(f"   {prof['error']}")
        return
    out("   self time (leaf function):")
    for f, share in prof["self"]:
        out(f"   {share * 100:5.1f}%  {f}")
    out("   charged to the deepest kexecfs function on the stack (with what it calls):")
    for f, share in prof["by_kexecfs_function"]:
        out(f"   {share * 100:5.1f}%  {f}")


def profile_datapath(work: Path, bins: dict[str, str], pyspy: str, what: str, count: int, size: int) -> dict[str, Any]:
    """Re-run one live update under py-spy, sampling the phase that missed its goal."""
    fds = [make_memfd(size) for _ in range(count)]
    img = work / "img-profile"
    shutil.rmtree(img, ignore_errors=True)
    m = Mount("kexecfs", work / "mnt-profile", work / "kexecfs-profile.log", img).start()
    try:
        inst = m.mnt / "bench"
        inst.mkdir()
        preserve_all(inst, fds)
        os.sync()
        if what == "freeze":
            prof = pyspy_record(pyspy, m.pid, lambda: (m.event("prepare"), m.event("freeze")), work / "profile-freeze.txt")
            m.event("kexec")
        else:
            m.event("prepare")
            m.event("freeze")
            if what == "recovery":
                prof = pyspy_record(pyspy, m.pid, lambda: m.event("kexec"), work / "profile-recovery.txt")
            elif what == "restore":
                m.event("kexec")

                def restore_all() -> None:
                    for token in range(count):
                        os.close(os.open(inst / "fds" / str(token), os.O_RDONLY))
                prof = pyspy_record(pyspy, m.pid, restore_all, work / "profile-restore.txt")
            else:
                m.event("kexec")
                prof = pyspy_record(pyspy, m.pid,
                                    lambda: [run_tool([bins["iobench"], "read", str(inst / "fds" / "0")])
                                             for _ in range(3)], work / "profile-read.txt")
        m.event("finish")
        return prof
    finally:
        m.stop()
        shutil.rmtree(img, ignore_errors=True)
        for fd in fds:
            os.close(fd)


# ---------------------------------------------------------------------------- main

def environment() -> dict[str, Any]:
    qemu = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                comm = (p / "comm").read_text().strip()
            except OSError:
                continue
            if comm.startswith("qemu"):
                qemu.append(int(p.name))
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "kexecfs"],
                           capture_output=True, text=True)
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "loadavg": os.getloadavg(),
            "commit": git.stdout.strip() or "?",
            "uncommitted": [line[3:] for line in dirty.stdout.splitlines()],
            "python": platform.python_version(), "qemu_processes_running": len(qemu),
            "mem_total_GiB": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GiB, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save(name: str, data: Any) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the suite itself")
    ap.add_argument("--only", help="comma-separated sections: control,datapath,blackout,scale")
    ap.add_argument("--budget", type=float, default=540, help="seconds; optional points are dropped to fit")
    ap.add_argument("--no-profile", action="store_true", help="do not profile missed goals")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root (FUSE allow_other and pidfd_getfd need it), e.g. sudo make bench")
    q = args.quick
    only = set(args.only.split(",")) if args.only else {"control", "datapath", "blackout", "scale"}
    cfg = {
        "control_rounds": 2 if q else 5, "control_per_round": 200 if q else 500,
        "layouts": [(1, 64 * MiB), (64, MiB)] if q else [(1, GiB), (1024, MiB)],
        "reps": 1 if q else 3, "read_reps": 1 if q else 3,
        "sizes": [16 * MiB, 64 * MiB] if q else [64 * MiB, 256 * MiB, GiB, 2 * GiB],
        "counts": [1, 10, 100] if q else [1, 10, 100, 1000, 10000],
        "count_total": 16 * MiB if q else 64 * MiB,
        "scale": (20, 10, 4096, 5) if q else (1000, 100, 4096, 10),
    }
    progress(f"kexecfs bench: {'quick' if q else 'full'} run, budget {args.budget:.0f} s")
    fd_limit = raise_fd_limit()
    have_mpl = have_matplotlib()
    pyspy = None if args.no_profile else find_pyspy()
    work = Path(tempfile.mkdtemp(prefix="kexecfs-bench-", dir="/var/tmp"))
    bins = build(work)
    env = environment()
    env.update({"fd_limit": fd_limit, "work_dir": str(work), "config": {k: str(v) for k, v in cfg.items()}})
    out(f"kexecfs benchmark - {env['time']}, Linux {env['kernel']}, {env['cpus']} CPUs, {env['mem_total_GiB']} GiB, "
        f"load {env['loadavg'][0]:.2f}, {env['qemu_processes_running']} qemu process(es) running")
    out(f"kexecfs at commit {env['commit']}" + (f" with uncommitted changes to {', '.join(env['uncommitted'])}"
                                                  if env["uncommitted"] else ""))
    out(f"image dir and baseline files on {work} ({_fstype(work)}); daemon RLIMIT_NOFILE raised to {fd_limit}")
    summary: dict[str, Any] = {"environment": env}
    datapath: dict[str, Any] = {}
    blackout_points: list[dict[str, Any]] = []
    try:
        if "control" in only:
            save("controlplane", bench_control(work, bins, cfg["control_rounds"], cfg["control_per_round"]))
        if "datapath" in only:
            datapath = bench_datapath(work, bins, cfg["layouts"], cfg["reps"], cfg["read_reps"])
            save("datapath", datapath)
            save("memory", report_memory(datapath))
        if "blackout" in only:
            reuse = {}
            for d in datapath.values():
                best = min(d["kexecfs"], key=lambda r: r["blackout_s"])
                base = min(d["baseline"], key=lambda r: r["blackout_s"])
                reuse[(d["count"], d["size"])] = (best, base)
            scale_reserve = 0 if "scale" not in only else (20 if q else 150)
            blackout = bench_blackout(work, bins, cfg["sizes"], cfg["counts"], cfg["count_total"], reuse,
                                      lambda: args.budget - scale_reserve - 60 - elapsed())
            save("blackout", blackout)
            blackout_points = blackout["points"]
            if have_mpl:
                png = plot_blackout(blackout, RESULTS / "blackout.png")
                out(f"  plot: {png}")
        if "scale" in only:
            n_inst, n_files, fsize, restore_n = cfg["scale"]
            # The daemon holds one descriptor per preserved file: RLIMIT_NOFILE (whose hard
            # limit only CAP_SYS_RESOURCE can raise) bounds the number of files.
            fit_files = max(1, (fd_limit - 2000) // n_inst)
            if fit_files < n_files:
                out()
                out(f"  NOTE: scale reduced from {n_inst} x {n_files} to {n_inst} x {fit_files} files: the daemon "
                    f"holds a descriptor per preserved file and RLIMIT_NOFILE is {fd_limit} here (no CAP_SYS_RESOURCE)")
                summary["scale_reduced_files_from"] = n_files
                n_files = fit_files
            left = args.budget - 60 - elapsed()
            # ~1.5 ms per file end to end (preserve, prepare, freeze, recovery) measured on a
            # 2-core VM; scale the instance count down rather than blow the budget.
            fit = int(left / (n_files * 0.0015))
            if fit < n_inst:
                out()
                out(f"  NOTE: scale reduced from {n_inst} to {max(fit, 10)} instances to fit the time budget "
                    f"({left:.0f} s left)")
                summary["scale_reduced_from"] = n_inst
                n_inst = max(fit, 10)
            save("scale", bench_scale(work, bins, n_inst, n_files, fsize, restore_n))
        out()
        out("== Goals")
        GOALS.print()
        if pyspy and not args.no_profile:
            misses = [g for g in GOALS.items if not g["met"] and g["missed_by"] > 2 and g.get("profile")]
            profiles = {}
            seen = set()
            for g in misses:
                key = g["profile"]
                kind = key.split(":")[0]
                if g.get("profile_key", key) in seen:
                    continue
                seen.add(g.get("profile_key", key))
                progress(f"profiling: {g['goal']}")
                if kind == "control":
                    prof = profile_control(work, bins, pyspy, key.split(":", 1)[1])
                elif kind == "read":
                    prof = profile_datapath(work, bins, pyspy, "read", 1, 256 * MiB)
                else:
                    _k, count, size = key.split(":")
                    prof = profile_datapath(work, bins, pyspy, kind, int(count), int(size))
                profiles[g["goal"]] = prof
                print_profile(g["goal"], prof)
            # No goal covers blackout at many files, but a point far off its baseline is
            # worth a look: profile its slowest part.
            worst = max((p for p in blackout_points if p["axis"] == "count"),
                        key=lambda p: p["blackout_s"] / p["baseline_s"], default=None)
            if worst and worst["blackout_s"] > 5 * worst["baseline_s"] and elapsed() < args.budget - 40:
                part = "recovery" if worst["kexec_s"] >= worst["restore_s"] else "restore"
                title = (f"blackout of {worst['count']} x {fmt_bytes(worst['size'])} is "
                         f"{worst['blackout_s'] / worst['baseline_s']:.0f}x its baseline: its {part}")
                progress(f"profiling: {title}")
                prof = profile_datapath(work, bins, pyspy, part, worst["count"], worst["size"])
                profiles[title] = prof
                print_profile(title, prof)
            summary["profiles"] = profiles
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary["goals"] = GOALS.items
    summary["wall_s"] = elapsed()
    summary["loadavg_end"] = os.getloadavg()
    save("summary", summary)
    met = sum(g["met"] for g in GOALS.items)
    out()
    out(f"{met} of {len(GOALS.items)} goals met; wall time {elapsed():.0f} s; results in {RESULTS}/")
    return 0


def _fstype(path: Path) -> str:
    best = ("", "?")
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        mnt = parts[1]
        if str(path).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[0]):
            best = (mnt, parts[2])
    return best[1]


if __name__ == "__main__":
    sys.exit(main())
