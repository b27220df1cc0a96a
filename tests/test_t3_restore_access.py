"""Tier 3: a restore never grants more than the preserved descriptor had.

Every kind (memfd, regular file) preserved with every access (r, w, rw, w+append,
rw+append), including a root-owned file and append-only (chattr +a) files, is opened
after a kexec with every access (O_RDONLY, O_WRONLY, O_RDWR, O_APPEND, O_TRUNC) by its
unprivileged owner and by root, through FUSE passthrough and through the proxy, after a
simulated kexec and again after a daemon restart (a second restore of the same files).
Each open that works tries every way of writing (write, pwrite, writev, pwritev2 with
RWF_NOAPPEND, a shared mapping, fallocate, ftruncate, clearing O_APPEND with F_SETFL);
the verdict is the file's bytes, read outside kexecfs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness import FUSE_SKIP, NOBODY, ROOT, Daemon, sh

REQUESTS = {
    "O_RDONLY": os.O_RDONLY, "O_WRONLY": os.O_WRONLY, "O_RDWR": os.O_RDWR,
    "O_RDONLY|O_APPEND": os.O_RDONLY | os.O_APPEND, "O_WRONLY|O_APPEND": os.O_WRONLY | os.O_APPEND,
    "O_RDWR|O_APPEND": os.O_RDWR | os.O_APPEND, "O_WRONLY|O_TRUNC": os.O_WRONLY | os.O_TRUNC,
    "O_RDWR|O_TRUNC": os.O_RDWR | os.O_TRUNC,
}
MODE_BITS = {"r": 0o400, "w": 0o200, "wa": 0o200, "rw": 0o600, "rwa": 0o600}


@dataclass
class Preserved:
    token: int
    kind: str  # "memfd" | "file"
    access: str  # r, w, rw, wa, rwa
    original: bytes
    path: Path | None = None  # regular files
    note: str = ""

    def may_open(self, flags: int) -> bool:
        """The rule, stated apart from the product: no more than the preserved access."""
        wants = flags & os.O_ACCMODE
        wants_write = wants != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if wants != os.O_WRONLY and "r" not in self.access:
            return False
        if wants_write and "w" not in self.access:
            return False
        return not (wants_write and "a" in self.access and (flags & os.O_TRUNC or not flags & os.O_APPEND))


def _files(disk: Path) -> list[Preserved]:
    files = []
    root_owned = disk / "passwd"
    shutil.copyfile("/etc/passwd", root_owned)
    os.chmod(root_owned, 0o644)  # readable by the owner, writable by root only
    files.append(Preserved(1, "file", "r", root_owned.read_bytes(), root_owned, "root-owned 0644"))
    for n, access in enumerate(MODE_BITS, 10):
        path = disk / f"own-{access}"
        path.write_bytes(os.urandom(8192))
        os.chown(path, NOBODY, NOBODY)
        files.append(Preserved(n, "file", access, path.read_bytes(), path))
    for n, access in enumerate(("wa", "rwa"), 20):
        path = disk / f"append-only-{access}"
        path.write_bytes(os.urandom(8192))
        os.chmod(path, 0o666)
        subprocess.run(["chattr", "+a", str(path)], check=True)
        files.append(Preserved(n, "file", access, path.read_bytes(), path, "chattr +a"))
    for n, access in enumerate(MODE_BITS, 30):
        files.append(Preserved(n, "memfd", access, os.urandom(8192)))
    return files


def _agent(tmp: Path, uid: int, *args: str) -> str:
    cmd = ["/usr/bin/python3", str(tmp / "access_agent.py"), *args]
    if uid:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _memfd_bytes(daemon: Daemon, token: int) -> bytes:
    """A restored memfd's bytes, read from the daemon's own descriptor (not through the mount)."""
    assert daemon.proc is not None
    fds = Path(f"/proc/{daemon.proc.pid}/fd")
    for fd in fds.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(f"/memfd:agent-{token} "):
            return fd.read_bytes()
    raise AssertionError(f"the daemon holds no memfd for token {token}")


def _probe(tmp: Path, mnt: Path, files: list[Preserved], uid: int, tag: str) -> list[dict]:
    plan = [{"token": f.token, "flags": flags} for f in files for flags in REQUESTS.values()]
    (tmp / f"plan-{tag}.json").write_text(json.dumps(plan))
    return json.loads(_agent(tmp, uid, "probe", str(mnt), "sec", str(tmp / f"plan-{tag}.json")))


def _check_round(daemon: Daemon, tmp: Path, files: list[Preserved], round_name: str) -> tuple[int, list[str]]:
    """Run the whole matrix once; the number of combinations tried and every crossing."""
    mnt = daemon.mountpoint
    by_token = {f.token: f for f in files}
    crossings: list[str] = []
    combos = 0
    for f in files:
        mode = os.stat(mnt / "sec" / "fds" / str(f.token)).st_mode & 0o777
        if mode != MODE_BITS[f.access]:
            crossings.append(f"{round_name}: token {f.token} ({f.access}) shows mode {mode:o}")
    for uid, who in ((NOBODY, "owner"), (0, "root")):
        for result in _probe(tmp, mnt, files, uid, f"{round_name}-{who}"):
            combos += 1
            f = by_token[result["token"]]
            name = next(k for k, v in REQUESTS.items() if v == result["flags"])
            expected = 0 if f.may_open(result["flags"]) else 13  # EACCES
            if result["open"] != expected:
                crossings.append(f"{round_name}: {who} open of {f.kind} {f.access} {f.note} with {name}: "
                                 f"errno {result['open']}, expected {expected}")
    for f in files:
        now = f.path.read_bytes() if f.path else _memfd_bytes(daemon, f.token)
        if "w" not in f.access and now != f.original:
            crossings.append(f"{round_name}: read-only {f.kind} {f.note} changed")
        if "a" in f.access and not now.startswith(f.original):
            crossings.append(f"{round_name}: append-only {f.kind} {f.note} ({f.access}) was written "
                             f"before its end")
    return combos, crossings


@pytest.mark.parametrize("passthrough", [True, False], ids=["passthrough", "proxy"])
def test_restore_grants_no_more_than_was_preserved(tmp_path: Path, passthrough: bool) -> None:
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    mnt, disk = tmp_path / "mnt", tmp_path / "disk"
    mnt.mkdir()
    disk.mkdir(mode=0o755)
    shutil.copy(ROOT / "tests" / "access_agent.py", tmp_path / "access_agent.py")
    daemon = Daemon(mnt, tmp_path / "images", tmp_path / "daemon.log",
                    extra=[] if passthrough else ["--no-passthrough"])
    daemon.start()
    files = _files(disk)
    try:
        sh(f"mkdir {mnt}/sec && chown -R {NOBODY}:{NOBODY} {mnt}/sec", check=True)
        spec = [{"token": f.token, "kind": f.kind, "access": f.access, "path": str(f.path or ""),
                 "data_hex": f.original.hex()} for f in files]
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        _agent(tmp_path, NOBODY, "preserve", str(mnt), "sec", str(tmp_path / "spec.json"))
        restore = (mnt / "status").read_text()
        assert ("restore: passthrough" in restore) == passthrough, restore

        sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
        combos, crossings = _check_round(daemon, tmp_path, files, "after a simulated kexec")

        # The same files carried into a second update, across a daemon killed while frozen:
        # the restarted one is still frozen (nothing lost), and the kexec recovers them.
        sh(f"echo finish > {mnt}/state && echo prepare > {mnt}/state && echo freeze > {mnt}/state", check=True)
        daemon.kill()
        daemon.start()
        assert (mnt / "state").read_text() == "frozen\n"
        sh(f"echo kexec > {mnt}/state", check=True)
        assert (mnt / "state").read_text() == "updated\n"
        more, later = _check_round(daemon, tmp_path, files, "after a daemon restart, restored a second time")
        print(f"\n{combos + more} access combinations ({'passthrough' if passthrough else 'proxy'}), "
              f"{len(crossings) + len(later)} crossings")
        assert not crossings + later, "\n".join(crossings + later)
        assert "a restore never grants more" in daemon.log_text()
    finally:
        daemon.stop()
        for f in files:
            if f.path is not None:
                subprocess.run(["chattr", "-a", str(f.path)], capture_output=True)


def test_a_command_is_taken_only_from_the_uid_that_opened_the_file(daemon: Daemon, tmp_path: Path) -> None:
    """The confused deputy: an owner hands its open fd_preserve to a privileged program
    (a set-uid one's stdout, say). What that program writes must not move the program's
    own descriptors into the owner's instance."""
    from kexecfs.core.syscalls import pidfd_getfd

    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/sec && chown -R {NOBODY}:{NOBODY} {mnt}/sec", check=True)
    owner = subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                              "bash", "-c", f"exec 7>{mnt}/sec/fd_preserve; exec sleep 60"])
    try:
        fd = -1
        for _ in range(200):  # until bash has opened fd 7 and become sleep
            try:
                pidfd = os.pidfd_open(owner.pid)
                fd = pidfd_getfd(pidfd, 7)
                os.close(pidfd)
                break
            except OSError:
                subprocess.run(["sleep", "0.05"])
        assert fd >= 0, "the owner never opened fd_preserve"
        secret = os.open("/etc/passwd", os.O_RDONLY)
        with pytest.raises(PermissionError):
            os.write(fd, f"{secret}\n".encode())  # root writing through the owner's open file
        assert (mnt / "sec" / "fd_preserve").read_text() == ""
        assert "commands are taken only from the uid that opened the file" in daemon.log_text()
        os.close(secret)
        os.close(fd)
    finally:
        owner.kill()
        owner.wait()
