"""Operating kexecfs: mount(8) and fstab, the kexecfs command, systemd units, containers."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FUSE_SKIP, NOBODY, OTHERS_PYTHON, ROOT, Daemon, others_env, public_copy, sh

VENV_BIN = Path(sys.executable).parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def kexecfs(*args: str, mnt: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:
    prefix = ["--mount", str(mnt)] if mnt else []
    return subprocess.run([sys.executable, "-m", "kexecfs", *prefix, *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60, **kw)


def wait_unmounted(path: Path) -> None:
    deadline = time.monotonic() + 10
    while os.path.ismount(path) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.ismount(path)


@pytest.fixture
def mount_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    if not shutil.which("mount.fuse3"):
        pytest.skip("mount.fuse3 is missing (Debian package fuse3; `make test` installs it)")
    # mount.fuse3 runs "kexecfs SOURCE MOUNTPOINT -o OPTS" with mount(8)'s fixed PATH,
    # so the command must be in /usr/local/bin, where `make install` puts it.
    link = Path("/usr/local/bin/kexecfs")
    made = not link.exists() and not link.is_symlink()
    if made:
        link.symlink_to(VENV_BIN / "kexecfs")
    try:
        yield {**os.environ, "PYTHONPATH": str(ROOT)}
    finally:
        if made:
            link.unlink()


def test_mount_t_fuse_kexecfs_and_umount(tmp_path: Path, mount_env: dict[str, str]) -> None:
    mnt, images, log = tmp_path / "mnt", tmp_path / "images", tmp_path / "daemon.log"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "fuse.kexecfs", "kexecfs", str(mnt), "-o",
                        f"image_dir={images},log_file={log},nodev"], env=mount_env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr + (log.read_text() if log.exists() else "")
    try:
        assert os.path.ismount(mnt), "mount returned before the filesystem was mounted"
        assert (mnt / "state").read_text() == "normal\n"
        assert f"image_dir: {images}\n" in (mnt / "status").read_text()
        fstype = [line.split()[2] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1] == str(mnt)]
        assert fstype == ["fuse.kexecfs"]
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    wait_unmounted(mnt)
    time.sleep(0.3)
    assert "stopped" in log.read_text(), "the daemon exits cleanly on umount"


def test_fstab_line(tmp_path: Path, mount_env: dict[str, str]) -> None:
    mnt, images = tmp_path / "mnt", tmp_path / "images"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"kexecfs {mnt} fuse.kexecfs image_dir={images},log_file={tmp_path}/log,nofail 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mnt)], env=mount_env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "state").read_text() == "normal\n"
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    wait_unmounted(mnt)


def test_kexecfs_command(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mountpoint
    status = json.loads(kexecfs("status", "--json", mnt=mnt).stdout)
    assert status["state"] == "normal" and status["image_dir"] == str(daemon.image_dir)
    assert "kexec_count" in kexecfs("status", mnt=mnt).stdout
    sh(f"mkdir {mnt}/db", check=True)
    journal = tmp_path / "journal"
    journal.write_bytes(b"j" * 1000)
    r = subprocess.run(f"exec 5<>{journal}; {sys.executable} -m kexecfs --mount {mnt} preserve --instance db --fd 5"
                       f" --token 9", shell=True, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "9", r.stderr
    lines = kexecfs("instances", mnt=mnt).stdout.splitlines()
    assert lines[0].split() == ["INSTANCE", "STATE", "OWNER", "FILES", "BYTES"]
    assert lines[1].split() == ["db", "normal", "0:0", "1", "1000"]
    assert kexecfs("event", "prepare", mnt=mnt).stdout.strip() == "prepared"
    assert kexecfs("kexec", mnt=mnt).stdout.strip() == "updated"
    image = daemon.image_dir / "handover.kximg"
    shown = json.loads(kexecfs("image", "show", str(image)).stdout)
    assert [f["token"] for f in shown["files"]] == [9] and shown["instances"][0]["name"] == "db"
    assert shown["files"][0]["path"] == str(journal)
    assert "OK" in kexecfs("image", "verify", str(image)).stdout
    damaged = tmp_path / "damaged.kximg"
    damaged.write_bytes(image.read_bytes()[:-10])
    r = kexecfs("image", "verify", str(damaged))
    assert r.returncode == 1, f"verify of a truncated image exited {r.returncode}: {r.stdout}{r.stderr}"
    assert "no trailer: the image is truncated" in r.stderr and "OK" not in r.stdout, r.stdout + r.stderr
    r = kexecfs("event", "cancel", mnt=mnt)
    assert r.returncode == 1 and "No such file or directory" in r.stderr


def test_shutdown_hook_freezes_only_for_kexec(daemon: Daemon) -> None:
    mnt = daemon.mountpoint
    (mnt / "state").write_text("prepare\n")
    # No kexec.target job is queued here: an ordinary shutdown must not freeze.
    r = kexecfs("shutdown-hook", mnt=mnt)
    assert r.returncode == 0 and "not a kexec" in r.stdout
    assert (mnt / "state").read_text() == "prepared\n"
    r = kexecfs("shutdown-hook", "--force", mnt=mnt)
    assert r.returncode == 0 and (mnt / "state").read_text() == "frozen\n"
    (mnt / "state").write_text("cancel\n")
    assert "nothing prepared" in kexecfs("shutdown-hook", "--force", mnt=mnt).stdout


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze is missing "
                    "(Debian package systemd; `make test` installs it)")
def test_systemd_units_verify(tmp_path: Path) -> None:
    """systemd-analyze verify every unit; the installed paths are swapped for ones that
    exist here, as `make install` would create them."""
    assert {u.name for u in UNITS} == {"kexecfs.service", "kexecfs-freeze.service", "kexecfs-example.service"}
    for unit in UNITS:
        text = unit.read_text().replace("/usr/local/bin/kexecfs-keep-memfd", str(ROOT / "examples/keep_memfd.py"))
        (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/kexecfs", str(VENV_BIN / "kexecfs")))
    r = subprocess.run(["systemd-analyze", "verify", "--man=no", *(str(tmp_path / u.name) for u in UNITS)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr


def test_kexecfs_service_is_type_notify_and_ordered() -> None:
    unit = (ROOT / "systemd/kexecfs.service").read_text()
    assert "Type=notify" in unit and "OOMScoreAdjust=" in unit
    freeze = (ROOT / "systemd/kexecfs-freeze.service").read_text()
    assert "After=kexecfs.service" in freeze and "ExecStop=/usr/local/bin/kexecfs shutdown-hook" in freeze
    example = (ROOT / "systemd/kexecfs-example.service").read_text()
    assert "BindPaths=/run/kexecfs/example:/run/liveupdate" in example


def test_ready_notification_over_the_notify_socket(tmp_path: Path) -> None:
    """Type=notify readiness, sent without libsystemd, once requests are served."""
    import socket

    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    sock_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(30)
        d = Daemon(tmp_path / "m", tmp_path / "img", tmp_path / "log")
        d.mountpoint.mkdir()
        os.environ["NOTIFY_SOCKET"] = str(sock_path)
        try:
            d.start()
        finally:
            del os.environ["NOTIFY_SOCKET"]
        try:
            assert sock.recv(4096).startswith(b"READY=1")
        finally:
            d.stop()


def test_container_sees_only_its_instance(daemon: Daemon, tmp_path: Path) -> None:
    """A 'container' (new mount and pid namespaces, an unprivileged uid) gets one instance
    by bind mount, preserves a memfd from inside, survives a simulated kexec made outside,
    restores it inside, and cannot reach the other instance."""
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/ctr {mnt}/other && chown {NOBODY}:{NOBODY} {mnt}/ctr", check=True)
    (tmp_path / "lu").mkdir()
    inside = f"""
set -e
mount --bind {mnt}/ctr {tmp_path}/lu
umount -l {mnt}          # the container keeps only its bind mount of one instance
echo "parent of lu: $(ls -A {tmp_path}/lu/.. | tr '\\n' ' ')"
exec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {OTHERS_PYTHON} - <<'PY'
import os, sys
sys.path.insert(0, {str(public_copy())!r})
from pathlib import Path
from kexecfs.client import InstanceDir
lu = Path({str(tmp_path / 'lu')!r})
print("mount visible:", sorted(os.listdir({str(mnt)!r})))
svc = InstanceDir(lu)
m = os.memfd_create("ctr-ram")
os.write(m, b"container memory " * 1000)
with open(lu / "fd_preserve", "w") as f:
    f.write(f"{{m}} 1")
svc.preserve(m, 2)
print("preserved:", (lu / "fd_preserve").read_text().split())
print("pid inside:", os.getpid(), flush=True)
print("state:", svc.wait_for_state("updated", timeout=60), flush=True)
fd = svc.restore(1)
print("restored ok:", os.pread(fd, 1 << 20, 0) == b"container memory " * 1000)
svc.finish()
print("finished:", (lu / "state").read_text().strip())
PY
"""
    proc = subprocess.Popen(["unshare", "--mount", "--pid", "--fork", "bash", "-c", inside],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while (mnt / "ctr/fd_preserve").read_text().count("\n") < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the container did not preserve its memfd"
            time.sleep(0.05)
        sh(f"echo prepare > {mnt}/state && echo kexec > {mnt}/state", check=True)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    lines = dict(line.split(": ", 1) for line in out.splitlines())
    assert lines["mount visible"] == "[]", "the kexecfs root is not visible inside"
    assert "other" not in lines["parent of lu"] and "state" not in lines["parent of lu"]
    assert lines["preserved"] == str(["1", "memfd", "17000", "rw", "2", "memfd", "17000", "rw"])
    assert lines["pid inside"] == "1"
    assert lines["state"] == "updated" and lines["restored ok"] == "True" and lines["finished"] == "normal"
    assert (mnt / "state").read_text() == "updated\n", "'other' has not finished"


def test_example_service_keeps_its_memfd_across_kexecs(daemon: Daemon) -> None:
    """examples/keep_memfd.py (kexecfs-example.service's program) as its unit runs it:
    as its own uid, on its instance only; its start count survives two kexecs."""
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/example && chown -R {NOBODY}:{NOBODY} {mnt}/example", check=True)

    def start_service() -> subprocess.Popen[str]:
        return subprocess.Popen(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
                                 OTHERS_PYTHON, str(public_copy("examples/keep_memfd.py")), str(mnt / "example")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=others_env())

    outputs = []
    for _ in range(3):
        svc = start_service()
        assert svc.stdout is not None
        ready, _, _ = select.select([svc.stdout], [], [], 30)
        assert ready, "the example service reported nothing within 30 s"
        outputs.append(svc.stdout.readline().strip())  # it reports what it found, then waits
        assert svc.poll() is None, svc.stderr.read() if svc.stderr else ""
        sh(f"echo prepare > {mnt}/state", check=True)
        svc.kill()  # stopped for the kexec, as systemd would before the freeze hook
        svc.wait()
        sh(f"echo freeze > {mnt}/state && echo kexec > {mnt}/state", check=True)
    assert outputs == ["new memfd preserved as token 1",
                       "restored memfd after a kexec: started 1 time(s) before",
                       "restored memfd after a kexec: started 2 time(s) before"]
