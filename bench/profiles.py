"""Profiles of missed goals: py-spy attached to the daemon while an operation is re-run.

A goal missed by more than 2x (and a :class:`~bench.harness.Suspect`) carries a
``reproduce`` function from its section; :func:`profile_misses` runs each under
``py-spy record --native`` and prints the top leaf functions and each sample charged to
the deepest kexecfs function on its stack. py-spy comes with the ``bench`` extra
(``pip install -e '.[bench]'``, which ``make bench`` does).
"""

from __future__ import annotations

import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .harness import Goal, Suspect, Workspace, out, progress


def find_pyspy() -> str | None:
    """The py-spy of this venv (the bench extra), else one on PATH, else None."""
    exe = Path(sys.executable).parent / "py-spy"
    return str(exe) if exe.exists() else shutil.which("py-spy")


def pyspy_record(pyspy: str, pid: int, action: Callable[[], Any], path: Path) -> dict[str, Any]:
    """Sample ``pid`` with py-spy while ``action`` runs; the top of the profile."""
    # --native shows time inside C (zlib, libc, the kernel entry points) instead of
    # charging it to the Python frame that called it; it pauses the daemon per sample.
    proc = subprocess.Popen([pyspy, "record", "--pid", str(pid), "--format", "raw", "--output", str(path),
                             "--rate", "200", "--native"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # py-spy attaches asynchronously: the first second would go unsampled
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


# Frames every sample has (the daemon's main loop): never the kexecfs function to blame.
_OUTER = re.compile(r"\((kexecfs/(cli|daemon|__main__)\.py|<frozen runpy>)\)")
NO_KEXECFS_FUNCTION = "(no kexecfs function: pyfuse3, trio, libfuse, kernel, idle waits)"


def _frames(stack: str) -> list[str]:
    """The frames of one raw py-spy stack, without line numbers or install prefixes, so
    that samples of one function from different lines and venvs add up."""
    frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
    frames = [re.sub(r"\(/[^)]*/((?:kexecfs|site-packages|lib/python3\.\d+)/[^)]*)\)", r"(\1)", f)
              for f in frames]
    return [f for f in frames if not f.startswith(("process ", "thread "))]


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
        frames = _frames(stack)
        if not frames:
            continue
        self_t[frames[-1]] += n
        ours = [f for f in frames if "(kexecfs/" in f and not _OUTER.search(f) and "fusehook-c/" not in f]
        owner[ours[-1] if ours else NO_KEXECFS_FUNCTION] += n
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


def profile_misses(ws: Workspace, pyspy: str, goals: list[Goal], suspects: list[Suspect],
                   seconds_left: Callable[[], float]) -> dict[str, Any]:
    """Profile every goal missed by more than 2x (once per profile key), then the suspects
    while time is left; the profiles by title, for summary.json."""
    profiles: dict[str, Any] = {}
    seen: set[str | None] = set()
    for g in goals:
        if g.met or g.missed_by <= 2 or g.reproduce is None or g.profile_key in seen:
            continue
        seen.add(g.profile_key)
        progress(f"profiling: {g.goal}")
        profiles[g.goal] = g.reproduce(ws, pyspy)
        print_profile(g.goal, profiles[g.goal])
    for s in suspects:
        # A suspect re-runs a whole update (up to 10,000 files): only if it still fits.
        if seconds_left() < 40:
            out(f"  no time left to profile: {s.title}")
            continue
        progress(f"profiling: {s.title}")
        profiles[s.title] = s.reproduce(ws, pyspy)
        print_profile(s.title, profiles[s.title])
    return profiles
