"""Section 6, freeze memory: how much the daemon's RSS grows while it writes an image.

Read from the data-path runs (bench/update.py resets VmHWM with ``clear_refs`` 5 before
prepare and before the kexec, and reads it after each phase); the worst repetition
counts. Goal: freezing 1 GiB adds at most 64 MiB, i.e. the daemon streams the memfds
into the image instead of holding them.
"""

from __future__ import annotations

from typing import Any

from .harness import MiB, Goal, Section, fmt_bytes, print_goals, table

GROWTH_LIMIT_MIB = 64


def run(datapath: dict[str, Any]) -> Section:
    rows, mem = [], {}
    for label, d in datapath.items():
        runs = d["kexecfs"]
        growth = max(max(r["hwm_prepare"], r["hwm_freeze"]) - r["rss_before"] for r in runs)
        kexec_growth = max(r["hwm_kexec"] - r["rss_before"] for r in runs)
        before = runs[0]["rss_before"]
        mem[label] = {"rss_before": before, "freeze_peak_growth": growth, "kexec_peak_growth": kexec_growth}
        rows.append([label, fmt_bytes(before), fmt_bytes(before + growth), f"+{fmt_bytes(growth)}",
                     f"+{fmt_bytes(kexec_growth)}"])
    table("6. Memory: daemon RSS (VmHWM reset before the phase; worst repetition)",
          ["preserved", "RSS before", "peak in prepare+freeze", "growth", "growth in kexec+recovery"], rows)
    goals = [Goal.at_most(f"daemon peak RSS growth during freeze of {label}", m["freeze_peak_growth"] / MiB,
                          GROWTH_LIMIT_MIB, " MiB") for label, m in mem.items()]
    print_goals(goals)
    return Section("memory", mem, goals)
