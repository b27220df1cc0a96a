"""Tier 3: the kernel's own LUO selftests (Linux 6.19, unmodified) as outside clients.

``make test-luo LUO_SELFTESTS=DIR``: DIR holds a built ``liveupdate`` and
``luo_kexec_simple``, from a kernel tree's selftests build or from the kit in
``../shared/luo`` (``make -C ../shared/luo OUT=DIR``). They are judged by their own
output: ``liveupdate`` must report 8 of 8 passed with no skip, and ``luo_kexec_simple``
must print TEST PASSED in its second stage, after the operator's prepare and a simulated
kexec that kills the stage-1 child holding the sessions, as a real kexec would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness import ROOT, Daemon, sh

pytestmark = pytest.mark.kernel_selftests


@pytest.fixture(scope="module")
def selftests() -> Path:
    where = os.environ.get("LUO_SELFTESTS")
    if not where:
        pytest.fail("LUO_SELFTESTS is not set: make test-luo LUO_SELFTESTS=DIR, with DIR holding the built "
                    "liveupdate and luo_kexec_simple")
    path = Path(where)
    for name in ("liveupdate", "luo_kexec_simple"):
        if not os.access(path / name, os.X_OK):
            pytest.fail(f"{path / name} is not a built selftest")
    return path


def kexecfs_run(mnt: Path, *argv: str) -> str:
    """Output of ``kexecfs run -- ARGV`` (through a file: stage 1 leaves a child behind)."""
    cmd = [sys.executable, "-m", "kexecfs", "--mount", str(mnt), "run", "--", *argv]
    with tempfile.TemporaryFile("w+") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=120, cwd=ROOT)
        out.seek(0)
        text = out.read()
    print(f"$ kexecfs run -- {' '.join(argv)}  (exit {done.returncode})\n{text}")
    return text


def test_liveupdate_passes_8_of_8(mnt: Path, selftests: Path) -> None:
    out = kexecfs_run(mnt, str(selftests / "liveupdate"))
    assert "# Totals: pass:8 fail:0 xfail:0 xpass:0 skip:0 error:0" in out


def test_luo_kexec_simple_across_a_simulated_kexec(daemon: Daemon, selftests: Path) -> None:
    mnt = daemon.mountpoint
    stage1 = kexecfs_run(mnt, str(selftests / "luo_kexec_simple"), "-s", "1")
    assert "[STAGE 1] You may now perform kexec reboot." in stage1
    sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
    # The kexec kills every process of the old kernel, the one holding the sessions too.
    subprocess.run(["pkill", "-KILL", "-f", f"{selftests / 'luo_kexec_simple'} -s 1"], capture_output=True)
    stage2 = kexecfs_run(mnt, str(selftests / "luo_kexec_simple"), "-s", "2")
    assert "TEST PASSED" in stage2
    assert (mnt / "state").read_text() == "normal\n"
