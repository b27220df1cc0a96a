"""Deterministic fault injection, for the crash and error tests only.

``KEXECFS_FAULTS="point[=action[@n]],..."`` in the daemon's environment arms named
points; ``action`` is ``raise`` (the default: an unexpected exception), ``kill``
(SIGKILL the daemon right there, as a crash would) or ``delay`` (for points read with
:func:`delay`: hold the request half a second, as a loaded machine would). ``@n`` lets the first ``n - 1``
passes through the point go by and acts from the ``n``-th on, so that a test can crash
at, say, the third file of a prepare. Unset, :func:`inject` is one dict lookup.
"""

from __future__ import annotations

import os
import signal


def _parse(spec: str) -> dict[str, list]:
    armed: dict[str, list] = {}
    for item in filter(None, spec.split(",")):
        point, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        armed[point] = [action or "raise", int(nth or 1)]
    return armed


_ARMED = _parse(os.environ.get("KEXECFS_FAULTS", ""))


class InjectedFault(RuntimeError):
    """Raised at an armed point; never caught by kexecfs except as 'unexpected'."""


def delay(point: str) -> float:
    """Seconds to hold the request at ``point`` (0 unless armed with ``delay``)."""
    armed = _ARMED.get(point)
    return 0.5 if armed is not None and armed[0] == "delay" else 0.0


def inject(point: str) -> None:
    armed = _ARMED.get(point)
    if armed is None:
        return
    armed[1] -= 1
    if armed[1] > 0:
        return
    if armed[0] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    raise InjectedFault(f"injected fault at {point}")
