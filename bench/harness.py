"""The bench's harness: what every section uses to mount, measure, compare and report.

A section (``bench/controlplane.py``, ``datapath.py``, ...) mounts daemons with
:class:`Daemon`, makes and preserves memfds, times its operations against a baseline
taken in the same run (:func:`turns` decides who goes first in each round, so that a
busy machine slows both sides alike), prints its tables with :func:`table` and returns
a :class:`Section`: its data (written to ``bench/results/<name>.json``) and its
:class:`Goal` records. Nothing here keeps state between sections except the clock.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
MiB, GiB = 1 << 20, 1 << 30
PATTERN = os.urandom(MiB)  # file contents: this MiB, repeated
IMAGE = "handover.kximg"
T0 = time.monotonic()
T = TypeVar("T")


# ---------------------------------------------------------------------------- clock and output

def elapsed() -> float:
    return time.monotonic() - T0


def progress(msg: str) -> None:
    print(f"[{elapsed():6.1f} s] {msg}", file=sys.stderr, flush=True)


def out(text: str = "") -> None:
    print(text, flush=True)


def turns(sides: Sequence[T], round_: int) -> list[T]:
    """The order of ``sides`` in round ``round_``: rotated by one each round, so that every
    side goes first equally often (for two sides: baseline first, then kexecfs first)."""
    k = round_ % len(sides)
    return list(sides[k:]) + list(sides[:k])


class Stopwatch:
    """Seconds spent inside ``with stopwatch:`` blocks, added up: times the operation under
    test and not the set-up between its calls."""

    def __init__(self) -> None:
        self.total = 0.0

    def __enter__(self) -> Stopwatch:
        self._t = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._t


# ---------------------------------------------------------------------------- the workspace

@dataclass(frozen=True)
class Workspace:
    """The run's scratch directory under /var/tmp (images and baseline files share its
    filesystem, so both sides write to the same disk) and the C clients built into it."""

    work: Path
    ctlbench: str
    iobench: str
    fd_limit: int

    @classmethod
    def create(cls, work: Path, fd_limit: int) -> Workspace:
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            sys.exit("bench: no C compiler (cc/gcc)")
        exes = {}
        for name in ("ctlbench", "iobench"):
            exes[name] = str(work / name)
            # -I include: the C clients take the ioctl numbers and struct from kexecfs.h.
            subprocess.run([cc, "-O2", "-Wall", "-I", str(ROOT / "include"), "-o", exes[name],
                            str(BENCH / f"{name}.c")], check=True)
        return cls(work, exes["ctlbench"], exes["iobench"], fd_limit)

    def fresh_dir(self, name: str) -> Path:
        path = self.work / name
        shutil.rmtree(path, ignore_errors=True)
        return path


def raise_fd_limit() -> int:
    """The daemon inherits this limit, and its keepers (which hold the preserved descriptors) from it."""
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


# ---------------------------------------------------------------------------- daemons

class Daemon:
    """A mounted filesystem served by a child process: the real kexecfs program
    (:meth:`kexecfs`) or the floor, bench/floorfs.py (:meth:`floor`)."""

    def __init__(self, kind: str, cmd: list[str], mnt: Path, logfile: Path,
                 env: dict[str, str] | None = None, image_dir: Path | None = None) -> None:
        self.kind, self.cmd, self.mnt, self.logfile = kind, cmd, mnt, logfile
        self.env = env or {}
        self.image_dir = image_dir
        self.proc: subprocess.Popen[bytes] | None = None

    @classmethod
    def kexecfs(cls, ws: Workspace, tag: str) -> Daemon:
        """A kexecfs daemon on mnt-<tag> with a new, empty image directory img-<tag>
        (removed again by :meth:`stop`: a 2 GiB image per section would fill /var/tmp)."""
        image_dir = ws.fresh_dir(f"img-{tag}")
        mnt = ws.work / f"mnt-{tag}"
        cmd = [PY, "-m", "kexecfs", "mount", str(mnt), "--image-dir", str(image_dir), "--foreground"]
        return cls("kexecfs", cmd, mnt, ws.work / f"kexecfs-{tag}.log", image_dir=image_dir).start()

    @property
    def image(self) -> Path:
        assert self.image_dir is not None
        return self.image_dir / IMAGE

    @classmethod
    def floor(cls, ws: Workspace, tag: str, take: bool = False) -> Daemon:
        cmd = [PY, str(BENCH / "floorfs.py"), str(ws.work / f"mnt-{tag}")]
        return cls("floor", cmd, ws.work / f"mnt-{tag}", ws.work / f"floorfs-{tag}.log",
                   {"FLOOR_TAKE": "1"} if take else None).start()

    def start(self) -> Daemon:
        self.mnt.mkdir(parents=True, exist_ok=True)
        # BENCH_DAEMON_PYTHONPATH: extra entries for experiments (e.g. a sitecustomize
        # that swaps in another implementation of something, to measure a proposed fix).
        pythonpath = ":".join(filter(None, [os.environ.get("BENCH_DAEMON_PYTHONPATH"), str(ROOT)]))
        with open(self.logfile, "ab") as logf:
            self.proc = subprocess.Popen(self.cmd, stdout=logf, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, "PYTHONPATH": pythonpath, **self.env})
        deadline = time.monotonic() + 60
        while not self._serving():
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.kind} did not mount within 60 s:\n{self.log_tail()}")
            time.sleep(0.02)
        return self

    def _serving(self) -> bool:
        # Mounted is not enough: the first request may still wait for the daemon's loop.
        if not os.path.ismount(self.mnt):
            return False
        try:
            (self.mnt / "state").read_bytes()
            return True
        except OSError:
            return False

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

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
        if self.image_dir is not None:
            shutil.rmtree(self.image_dir, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def logged_traceback(self) -> bool:
        return "Traceback" in self.log_text()

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


# ---------------------------------------------------------------------------- memfds and tools

def make_memfd(size: int, name: str = "bench") -> int:
    """A memfd of ``size`` bytes, sealed against shrinking and growing as QEMU seals guest
    RAM: kexecfs reads such a file through a mapping, and one that can shrink with
    pread(2), which costs a freeze about 1.4x as much (bench/README.md, section 8)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    done = 0
    while done < size:
        done += os.write(fd, PATTERN[:min(MiB, size - done)])
    os.lseek(fd, 0, os.SEEK_SET)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


def preserve_all(inst: Path, fds: Sequence[int], first_token: int = 0) -> float:
    """Preserve ``fds`` as tokens first_token.. through fd_preserve; the seconds spent in write(2)."""
    pfd = os.open(inst / "fd_preserve", os.O_WRONLY)
    spent = Stopwatch()
    try:
        for i, fd in enumerate(fds):
            line = f"{fd} {first_token + i}\n".encode()
            with spent:
                os.write(pfd, line)
    finally:
        os.close(pfd)
    return spent.total


def restore_all(inst: Path, count: int) -> float:
    """Open (= restore) fds/0..count-1 of ``inst``; the seconds it took. Each is closed at
    once, so that 10,000 files fit in RLIMIT_NOFILE twice over (here and the daemon's dup)."""
    t = time.perf_counter()
    for token in range(count):
        os.close(os.open(inst / "fds" / str(token), os.O_RDONLY))
    return time.perf_counter() - t


def run_tool(args: list[str], stdin: str = "", lines: bool = False) -> list[str]:
    r = subprocess.run(args, input=stdin, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout.splitlines() if lines else r.stdout.split()


def self_fd(fd: int) -> str:
    return f"/proc/{os.getpid()}/fd/{fd}"


# ---------------------------------------------------------------------------- tables

def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.2f} {unit}"
    return f"{n:.0f} B"


def rate(nbytes: float, seconds: float) -> float:
    """GB/s (10^9 bytes per second)."""
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


# ---------------------------------------------------------------------------- goals and sections

# How a missed goal's operation is reproduced under py-spy: given the workspace and the
# py-spy executable, the summary of the profile (see bench/profiles.py).
Reproduce = Callable[[Workspace, str], dict[str, Any]]


@dataclass
class Goal:
    """One goal line: what is wanted of a ratio (or a size), what was measured, and how
    to reproduce the operation for a profile if it is missed by far."""

    goal: str
    want: str
    value: float | None
    met: bool
    missed_by: float  # 1.0 when met; how many times too slow (or too big) otherwise
    unit: str = "x"
    profile: str | None = None  # names the reproduction in summary.json
    profile_key: str | None = None  # goals with the same key share one profile
    reproduce: Reproduce | None = None

    @classmethod
    def at_least(cls, goal: str, value: float | None, target: float, profile: str | None = None,
                 reproduce: Reproduce | None = None) -> Goal:
        met = value is not None and value >= target
        missed_by = 1.0 if met else (target / value if value else float("inf"))
        return cls(goal, f">= {target}x", value, met, missed_by, "x", profile, profile, reproduce)

    @classmethod
    def at_most(cls, goal: str, value: float | None, target: float, unit: str = "x", profile: str | None = None,
                profile_key: str | None = None, reproduce: Reproduce | None = None) -> Goal:
        met = value is not None and value <= target
        missed_by = 1.0 if met else (value / target if value is not None else float("inf"))
        return cls(goal, f"<= {target}{unit}", value, met, missed_by, unit, profile, profile_key or profile,
                   reproduce)

    def line(self) -> str:
        value = "n/a" if self.value is None else f"{self.value:.2f}{self.unit}"
        verdict = "met" if self.met else f"NOT MET (missed by {self.missed_by:.1f}x)"
        return f"  GOAL {self.goal}: want {self.want}, got {value}: {verdict}"

    def to_json(self) -> dict[str, Any]:
        return {"goal": self.goal, "want": self.want, "value": self.value, "met": self.met,
                "missed_by": self.missed_by, "profile": self.profile, "unit": self.unit,
                "profile_key": self.profile_key}


def print_goals(goals: Sequence[Goal]) -> None:
    for g in goals:
        out(g.line())


@dataclass
class Suspect:
    """A figure no goal covers but far enough off its baseline to be worth a profile."""

    title: str
    reproduce: Reproduce


@dataclass
class Section:
    """What a section hands back: ``data`` for bench/results/<name>.json, its goals, the
    suspects worth a profile, and notes for summary.json (e.g. a scale it had to reduce)."""

    name: str
    data: Any
    goals: list[Goal] = field(default_factory=list)
    suspects: list[Suspect] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)


NO_MATPLOTLIB = "  no plot: matplotlib is not installed (it comes with the bench extra: pip install -e '.[bench]')"


def pyplot() -> Any:
    """matplotlib.pyplot drawing to files only, or None if matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_plot(plt: Any, fig: Any, path: Path) -> str:
    """Write ``fig`` to ``path``; the line to print about it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"  plot: {path}"


def save(results: Path, name: str, data: Any) -> None:
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
