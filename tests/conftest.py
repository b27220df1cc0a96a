"""Fixtures and hooks only; what the tests share otherwise is in harness.py (and its
standard-library half, payload.py). The tiers, one per file-name prefix:

- ``test_t1_*``: no mount. The core (machine, instances, image, names) and the FUSE
  operations class driven directly with trio. Fast; no root, no /dev/fuse.
- ``test_t2_*``: a real mount, driven with the tools users use (bash, cat, echo, ls,
  ioctl from Python and C); the C extension against a mini daemon (:mod:`minifs`).
- ``test_t3_*``: scenarios: whole live updates (preserve, prepare, freeze, a simulated
  kexec or a killed daemon, restore, finish), damaged images, containers, other uids,
  restore grants, sessions, mount(8) and systemd, the kernel's LUO selftests.
- ``hard/test_t4_hard_*``: hardening: every fault point, disk full, fuzzing, thousands
  of damaged images, races, load, the permissions matrix. The random-timing runs are
  marked ``nondeterministic`` (make test-hard only); the rest is in make test.
- tier 5, the real kexec in a VM: tests/vm (``make test-kexec``), not pytest.

A test that mounts is skipped, saying why, where FUSE cannot be used (harness.FUSE_SKIP).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FUSE_SKIP, Daemon, public_tmp, remove_public_base, serving


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    remove_public_base()


@pytest.fixture
def tmp_path(request: pytest.FixtureRequest) -> Path:
    """A per-test directory the unprivileged test uids can traverse (see harness.public_tmp);
    replaces pytest's own."""
    return public_tmp(request.node.name)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A kexecfs daemon on tmp_path/mnt (images in tmp_path/images, log in
    tmp_path/daemon.log); the test fails if it logged an unexpected traceback."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with serving(Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log")) as d:
        yield d


@pytest.fixture
def mnt(daemon: Daemon) -> Path:
    return daemon.mountpoint
