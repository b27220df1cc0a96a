"""Deterministic fault injection, for the crash and error tests only.

``KEXECFS_FAULTS="point[=action],..."`` in the daemon's environment arms named points;
``action`` is ``raise`` (the default: an unexpected exception) or ``kill`` (SIGKILL the
daemon right there, as a crash would). Unset, :func:`inject` is one dict lookup.
"""

from __future__ import annotations

import os
import signal

_ARMED = dict(item.partition("=")[::2] for item in os.environ.get("KEXECFS_FAULTS", "").split(",") if item)


class InjectedFault(RuntimeError):
    """Raised at an armed point; never caught by kexecfs except as 'unexpected'."""


def inject(point: str) -> None:
    action = _ARMED.get(point)
    if action is None:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {point}")
