"""``kexecfs metrics``: a mount in the Prometheus text exposition format (0.0.4), for
node_exporter's textfile collector (``--textfile PATH``, replaced atomically: the
collector must never read half a file) or anything that scrapes text.

Every series is named ``kexecfs_*``; the per-instance ones carry ``kexecfs_instance="NAME"``. A duration that was never measured (no freeze yet,
nothing recovered) is absent rather than 0; a mount that does not answer gives
``kexecfs_up 0`` and nothing else, so that an alert can fire on it. Standard library only.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from . import report
from .abi import STATE_NUMBERS
from .client import Kexecfs, NotKexecfs

STATES = tuple(STATE_NUMBERS)
# Not "instance": Prometheus gives every scraped series an instance label (the target),
# and would rename ours to exported_instance.
LABEL = "kexecfs_instance"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}" if labels else ""


class Exposition:
    """Families of samples, each with its HELP and TYPE lines once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: list[tuple[dict[str, str], float]]) -> None:
        self.lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(**labels)} {_number(value)}" for labels, value in samples]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _machine(out: Exposition, status: dict[str, Any]) -> None:
    out.family("kexecfs_state", "gauge", "The global live-update state (1 for the current one).",
               [({"state": s}, int(status["state"] == s)) for s in STATES])
    out.family("kexecfs_kexec_count", "gauge", "Kexecs handed over so far, as the handover images count them.",
               [({}, status["kexec_count"])])
    for key, help_text in (("last_freeze_seconds", "Duration of the last freeze, the blackout step."),
                           ("last_recovery_seconds", "Duration of this boot's recovery of the handover image."),
                           ("last_blackout_seconds", "From the start of the freeze that wrote the recovered image "
                                                     "to the end of its recovery, kernel boot included.")):
        if status.get(key) is not None:
            out.family(f"kexecfs_{key}", "gauge", help_text, [({}, status[key])])
    out.family("kexecfs_recovery_failures_total", "counter", "Handover images this daemon refused to recover "
               "(damaged; kept aside).", [({}, status.get("recovery_failures") or 0)])
    out.family("kexecfs_unrestorable_files", "gauge", "Recovered files that cannot be restored (a regular file "
               "gone from disk).", [({}, status.get("unrestorable_files") or 0)])


def _instances(out: Exposition, instances: list[dict[str, Any]]) -> None:
    def per_instance(key: str) -> list[tuple[dict[str, str], float]]:
        return [({LABEL: i["name"]}, i[key]) for i in instances]

    out.family("kexecfs_instance_state", "gauge", "Each instance's state (1 for the current one).",
               [({LABEL: i["name"], "state": s}, int(i["state"] == s)) for i in instances for s in STATES])
    out.family("kexecfs_preserved_files", "gauge", "Files preserved in the instance.", per_instance("files"))
    out.family("kexecfs_preserved_bytes", "gauge", "Bytes of the files preserved in the instance.",
               per_instance("bytes"))
    out.family("kexecfs_image_bytes", "gauge", "Bytes of the instance's memfd contents, which the image holds.",
               per_instance("image_bytes"))
    out.family("kexecfs_blocked_files", "gauge", "Preserved files the next prepare would refuse (deleted, ...): "
               "each blocks the whole update.",
               [({LABEL: i["name"]}, sum(1 for p in i["preserved"] if p["problem"])) for i in instances])


def exposition(mount: Path) -> str:
    """The metrics of the mount at ``mount``."""
    out = Exposition()
    try:
        Kexecfs(mount)
        status = report.read_status(mount)
        instances = report.read_instances(mount)["instances"]
    except (NotKexecfs, OSError):
        out.family("kexecfs_up", "gauge", "Whether the kexecfs mount answered.", [({}, 0)])
        return out.text()
    out.family("kexecfs_up", "gauge", "Whether the kexecfs mount answered.", [({}, 1)])
    _machine(out, status)
    _instances(out, instances)
    return out.text()


def write_textfile(path: Path, text: str) -> None:
    """Replace ``path`` at once: a temporary file in the same directory, renamed over it
    (node_exporter ignores files not ending in .prom, so the temporary one is not read)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fchmod(f.fileno(), 0o644)
    os.rename(tmp, path)

