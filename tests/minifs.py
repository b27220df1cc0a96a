"""A tiny pyfuse3 daemon in a child process, for tests of the C extension itself.

The daemon is a script the test module supplies: it mounts on argv[1], prints
``READY`` once serving, and exits 0 after an unmount. :func:`mini_daemon` runs it and
always unmounts (lazily if a failed test left a caller stuck in the mount).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def python_env() -> dict[str, str]:
    """Environment for child interpreters: kexecfs from this tree (with the extension
    built in place: `python setup.py build_ext --inplace` or `pip install -e .`)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


class MiniMount:
    def __init__(self, path: Path, proc: subprocess.Popen[str], stderr: Path) -> None:
        self.path = path
        self.proc = proc
        self.stderr_path = stderr

    def stderr(self) -> str:
        return self.stderr_path.read_text()


@contextlib.contextmanager
def mini_daemon(script: str, workdir: Path, mnt: Path, *args: Any) -> Iterator[MiniMount]:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse: cannot mount FUSE here")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 not installed (Debian package fuse3)")
    path = workdir / "daemon.py"
    path.write_text(script)
    stderr = workdir / "daemon.stderr"
    with stderr.open("w") as err:
        proc = subprocess.Popen([sys.executable, str(path), str(mnt), *map(str, args)], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=python_env())
    assert proc.stdout is not None
    line = proc.stdout.readline()
    proc.stdout.close()
    if line != "READY\n":
        proc.kill()
        proc.wait()
        # It may have died after mounting (e.g. ensure_live() failed).
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False, capture_output=True)
        pytest.fail(f"daemon did not start: {line!r}\n{stderr.read_text()}")
    try:
        yield MiniMount(mnt, proc, stderr)
    finally:
        if subprocess.run(["fusermount3", "-u", str(mnt)], check=False).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
        try:
            proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"daemon did not exit after unmount\n{stderr.read_text()}")
        # A failing daemon exits non-zero: its traceback is the interesting part.
        assert proc.returncode == 0, stderr.read_text()
