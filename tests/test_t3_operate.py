"""Operating kexecfs: mount(8) and fstab, the kexecfs command, systemd units, containers."""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness import FUSE_SKIP, NOBODY, OTHERS_PYTHON, ROOT, Daemon, in_kernel_with_kexec, others_env, public_copy, sh

VENV_BIN = Path(sys.executable).parent
UNITS = sorted([*(ROOT / "systemd").glob("*.service"), *(ROOT / "systemd").glob("*.timer")])


def kexecfs(*args: str, mnt: Path | None = None, **kw) -> subprocess.CompletedProcess[str]:
    prefix = ["--mount", str(mnt)] if mnt else []
    env = kw.pop("env", {**os.environ, "PYTHONPATH": str(ROOT)})
    return subprocess.run([sys.executable, "-m", "kexecfs", *prefix, *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=60, **kw)


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


def daemon_pid_of(mnt: Path) -> int:
    """The daemon serving ``mnt`` (found by its command line, as an operator would with pgrep)."""
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if entry.name.isdigit() and os.fsencode(mnt) in argv and any(b"kexecfs" in a for a in argv):
            return int(entry.name)
    raise AssertionError(f"no daemon process serves {mnt}")


def held_descriptors(pid: int) -> dict[int, str]:
    fds = {}
    for entry in Path(f"/proc/{pid}/fd").iterdir():
        try:
            fds[int(entry.name)] = os.readlink(entry)
        except OSError:
            pass
    return fds


def test_mount_returns_under_captured_output(tmp_path: Path, mount_env: dict[str, str]) -> None:
    """`out=$(mount -t fuse.kexecfs ... 2>&1)` returns once the mount serves, even when the
    daemon logs to stderr until then: the daemon holds none of the caller's descriptors
    (not its stdout or stderr pipe, not a descriptor the shell let it inherit)."""
    mnt, other, held = tmp_path / "mnt", tmp_path / "other", tmp_path / "held"
    mnt.mkdir()
    other.mkdir()
    script = (f"exec 7>{held}; out=$(mount -t fuse.kexecfs kexecfs {mnt} -o image_dir={tmp_path}/images,"
              f"log_target=stderr 2>&1); echo \"rc=$?\"; cat {mnt}/state")
    try:
        r = subprocess.run(["bash", "-c", script], env=mount_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.splitlines() == ["rc=0", "normal"], r.stdout + r.stderr
        # And the kexecfs command itself, as a program runs it.
        r = subprocess.run([str(VENV_BIN / "kexecfs"), "mount", str(other), "--image-dir", str(tmp_path / "img2"),
                            "--log-target", "stderr"], env=mount_env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert (other / "state").read_text() == "normal\n"
        for path in (mnt, other):
            fds = held_descriptors(daemon_pid_of(path))
            assert [fds[n] for n in (0, 1, 2)] == ["/dev/null"] * 3, fds
            assert str(held) not in fds.values(), fds
    finally:
        for path in (mnt, other):
            subprocess.run(["umount", str(path)], capture_output=True)
    wait_unmounted(mnt)


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


@pytest.mark.skipif(not shutil.which("systemd-analyze") or not shutil.which("man"), reason="systemd-analyze or "
                    "man is missing (Debian packages systemd and man-db; `make test` installs them)")
def test_installed_units_verify_with_their_man_pages(tmp_path: Path) -> None:
    """systemd-analyze verify, man pages included (no --man=no), of the units as `make
    install` installs them, with the man pages it installs. Staged with DESTDIR; the
    command's path is swapped for the venv's, which `make install` would make /opt/kexecfs."""
    stage = tmp_path / "stage"
    r = subprocess.run(["make", "-s", "-C", str(ROOT), "install-files", f"DESTDIR={stage}"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    unitdir = stage / "etc/systemd/system"
    installed = sorted(unitdir.iterdir())
    assert {u.name for u in installed} == {u.name for u in UNITS} == {
        "kexecfs.service", "kexecfs-freeze.service", "kexecfs-example.service", "kexecfs-metrics.service",
        "kexecfs-metrics.timer"}
    for unit in installed:
        text = unit.read_text().replace("/usr/local/bin/kexecfs-keep-memfd", str(ROOT / "examples/keep_memfd.py"))
        unit.write_text(text.replace("/usr/local/bin/kexecfs", str(VENV_BIN / "kexecfs")))
    r = subprocess.run(["systemd-analyze", "verify", *map(str, installed)], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "MANPATH": str(stage / "usr/local/share/man")})
    # kexecfs.service keeps its fd store across a stop with FileDescriptorStorePreserve=,
    # which systemd knows from version 254 on; older ones ignore it (they keep the store
    # across restarts anyway), saying so.
    version = int(subprocess.run(["systemctl", "--version"], capture_output=True, text=True).stdout.split()[1])
    newer = "Unknown key 'FileDescriptorStorePreserve'"
    stderr = "\n".join(line for line in r.stderr.splitlines() if version >= 254 or newer not in line)
    assert r.returncode == 0 and not stderr.strip(), r.stderr
    assert (stage / "usr/local/share/bash-completion/completions/kexecfs").exists()
    assert os.access(stage / "usr/local/sbin/kexecfs-kexec", os.X_OK)


# Options that give a service a mount namespace of its own (systemd's exec_needs_mount_namespace).
MOUNT_NAMESPACE_OPTIONS = ("ProtectSystem=", "ProtectHome=", "PrivateTmp=", "PrivateDevices=", "PrivateMounts=",
                           "ProtectKernelTunables=", "ProtectKernelModules=", "ProtectKernelLogs=",
                           "ProtectControlGroups=", "ProtectHostname=", "ProtectProc=", "ProcSubset=", "BindPaths=",
                           "BindReadOnlyPaths=", "TemporaryFileSystem=", "ReadOnlyPaths=", "InaccessiblePaths=",
                           "ReadWritePaths=", "RootDirectory=", "RootImage=", "MountAPIVFS=", "PrivateIPC=")


def test_kexecfs_service_is_type_notify_and_ordered() -> None:
    unit = (ROOT / "systemd/kexecfs.service").read_text()
    assert "Type=notify" in unit and "OOMScoreAdjust=" in unit
    # The daemon mounts kexecfs in its own mount namespace: it must be the host's, or no
    # other service sees the mount (found by the systemd variant of make test-kexec).
    settings = [line.split("=", 1)[0] + "=" for line in unit.splitlines() if line and not line.startswith("#")]
    assert not set(settings) & set(MOUNT_NAMESPACE_OPTIONS), set(settings) & set(MOUNT_NAMESPACE_OPTIONS)
    freeze = (ROOT / "systemd/kexecfs-freeze.service").read_text()
    assert "After=kexecfs.service" in freeze and "ExecStop=/usr/local/bin/kexecfs shutdown-hook" in freeze
    example = (ROOT / "systemd/kexecfs-example.service").read_text()
    assert "BindPaths=-/run/kexecfs/example:/run/liveupdate" in example


def test_ready_notification_over_the_notify_socket(tmp_path: Path) -> None:
    """Type=notify readiness, sent without libsystemd, once requests are served."""
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


def notifications_until_ready(sock: socket.socket) -> list[dict[str, str]]:
    """The sd_notify datagrams a daemon sends up to and including READY=1, as dicts."""
    received = []
    while not received or "READY" not in received[-1]:
        message = sock.recv(4096).decode()
        received.append(dict(line.split("=", 1) for line in message.splitlines()))
    return received


def received_now(sock: socket.socket) -> list[dict[str, str]]:
    """The notifications waiting on ``sock``, without waiting for more."""
    received = []
    sock.setblocking(False)
    try:
        while True:
            received.append(dict(line.split("=", 1) for line in sock.recv(4096).decode().splitlines()))
    except BlockingIOError:
        return received
    finally:
        sock.settimeout(120)


def test_recovery_of_1gib_reports_progress_before_ready(tmp_path: Path) -> None:
    """Recovery runs before READY=1: under a notify socket the daemon sends STATUS= progress
    and EXTEND_TIMEOUT_USEC= meanwhile, so systemd's start timeout does not kill a large
    recovery (the daemon here recovers 1 GiB in one memfd after being killed with nothing
    kept outside it, so that the next one has the image alone, as after a kexec). Prepare
    and freeze report their progress the same way."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    d = Daemon(tmp_path / "m", tmp_path / "img", tmp_path / "log", env={"KEXECFS_FD_STORE": "none"})
    d.mountpoint.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(120)
    os.environ["NOTIFY_SOCKET"] = str(tmp_path / "notify")
    try:
        d.start()
        notifications_until_ready(sock)
        sh(f"mkdir {d.mountpoint}/vm", check=True)
        code = (f"import os; m=os.memfd_create('ram'); b=os.urandom(1<<20)\n"
                f"for i in range(1024): os.pwrite(m, b, i<<20)\n"
                f"open('{d.mountpoint}/vm/fd_preserve','w').write(f'{{m}} 1')")
        subprocess.run(["/usr/bin/python3", "-c", code], check=True, timeout=120)
        sh(f"echo prepare > {d.mountpoint}/state && echo freeze > {d.mountpoint}/state", check=True, timeout=300)
        statuses = [m["STATUS"] for m in received_now(sock) if "STATUS" in m]
        for phase in ("prepare", "freeze"):
            assert any(s.startswith(f"{phase}: ") for s in statuses), statuses
        assert statuses[-1] == f"serving {d.mountpoint}: state frozen", statuses
        d.kill()
        d.start()
        received = notifications_until_ready(sock)
        assert (d.mountpoint / "state").read_text() == "updated\n"
        before_ready = received[:-1]
        assert any(m.get("STATUS", "").startswith("recovery: ") and "of 1024 MiB" in m["STATUS"]
                   for m in before_ready), received
        extensions = [int(m["EXTEND_TIMEOUT_USEC"]) for m in before_ready if "EXTEND_TIMEOUT_USEC" in m]
        assert extensions and all(e >= 10_000_000 for e in extensions), received
        assert "state updated" in received[-1]["STATUS"], received
    finally:
        del os.environ["NOTIFY_SOCKET"]
        sock.close()
        d.stop()


def test_freeze_hook_extends_its_stop_timeout(daemon: Daemon, tmp_path: Path) -> None:
    """`kexecfs shutdown-hook` (kexecfs-freeze.service's ExecStop) tells systemd how the freeze
    goes, with EXTEND_TIMEOUT_USEC=, so the unit's stop timeout does not cut a long freeze."""
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/vm", check=True)
    code = (f"import os; m=os.memfd_create('ram'); b=os.urandom(1<<20)\n"
            f"for i in range(16): os.pwrite(m, b, i<<20)\n"
            f"open('{mnt}/vm/fd_preserve','w').write(f'{{m}} 1')")
    subprocess.run(["/usr/bin/python3", "-c", code], check=True, timeout=120)
    (mnt / "state").write_text("prepare\n")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(tmp_path / "notify"))
        sock.settimeout(0)
        r = kexecfs("shutdown-hook", "--force", mnt=mnt, env={**os.environ, "PYTHONPATH": str(ROOT),
                                                                 "NOTIFY_SOCKET": str(tmp_path / "notify")})
        assert r.returncode == 0 and r.stdout.strip() == "frozen", r.stdout + r.stderr
        received = []
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except BlockingIOError:
                break
    assert received and all("EXTEND_TIMEOUT_USEC=30000000" in m for m in received), received
    (mnt / "state").write_text("cancel\n")


def parse_journal_entry(data: bytes) -> dict[str, str]:
    """One datagram of the journal's native protocol, as journald reads it."""
    fields, pos = {}, 0
    while pos < len(data):
        end = data.index(b"\n", pos)
        line = data[pos:end]
        if b"=" in line:
            key, value = line.split(b"=", 1)
            pos = end + 1
        else:  # KEY, newline, 64-bit little-endian length, the value, newline
            key, size = line, int.from_bytes(data[end + 1:end + 9], "little")
            value = data[end + 9:end + 9 + size]
            assert data[end + 9 + size:end + 10 + size] == b"\n"
            pos = end + 10 + size
        fields[key.decode()] = value.decode()
    return fields


def test_journal_native_protocol_round_trip() -> None:
    """A value with a newline (a traceback) goes length-prefixed; the rest as KEY=value."""
    from kexecfs.systemd import journal_entry

    fields = {"MESSAGE": "line one\nline two", "INSTANCE": "db", "TOKEN": "3"}
    assert parse_journal_entry(journal_entry(fields)) == fields


def test_journal_entries_carry_instance_token_event(tmp_path: Path) -> None:
    """Under systemd (JOURNAL_STREAM names the daemon's stderr) the daemon logs to the journal
    over its native protocol, so that `journalctl INSTANCE=db` finds what happened to db:
    its preserve (INSTANCE=, TOKEN=) and the prepare that its deleted file failed (EVENT=).
    journald is a datagram socket of this test's, bind-mounted over
    /run/systemd/journal/socket in a mount namespace of the daemon's own."""
    if FUSE_SKIP:
        pytest.skip(FUSE_SKIP)
    mnt, journal, victim = tmp_path / "mnt", tmp_path / "journal.sock", tmp_path / "victim"
    mnt.mkdir()
    victim.write_bytes(b"v" * 100)
    stderr = open(tmp_path / "stderr", "wb")
    st = os.fstat(stderr.fileno())
    setup = (f"mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && touch /run/systemd/journal/socket "
             f"&& mount --bind {journal} /run/systemd/journal/socket && exec \"$@\"")
    entries: list[dict[str, str]] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(journal))
        sock.settimeout(0.2)
        done = threading.Event()

        def journald() -> None:
            """Read entries as they come, as journald does: the socket queues only
            net.unix.max_dgram_qlen datagrams (10 by default), and a logger whose entries
            nobody reads blocks in sendto() for good."""
            while True:
                try:
                    entries.append(parse_journal_entry(sock.recv(1 << 16)))
                except TimeoutError:
                    if done.is_set():  # the daemon is gone and nothing is queued any more
                        return
        reader = threading.Thread(target=journald, daemon=True)
        reader.start()
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", setup, "sh", sys.executable, "-m",
             "kexecfs", "mount", str(mnt), "--image-dir", str(tmp_path / "img"), "--foreground"],
            stderr=stderr, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        inside = ["nsenter", f"--target={proc.pid}", "--mount", "bash", "-c"]
        try:
            # nsenter right after Popen may join the namespace unshare has not made yet, and then
            # never see the mount: wait for the mount in the daemon's own mountinfo first.
            mountinfo = Path(f"/proc/{proc.pid}/mountinfo")
            for _ in range(600):
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                if f" {mnt} " in mountinfo.read_text():
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"no mount on {mnt} in the daemon's namespace after 60 s")
            script = (f"mkdir {mnt}/db; exec 5<>{victim}; echo '5 7' > {mnt}/db/fd_preserve; rm {victim}; "
                      f"echo prepare > {mnt}/state; umount {mnt}")
            r = subprocess.run([*inside, script], capture_output=True, text=True, timeout=60)
            assert "write error" in r.stderr, r.stdout + r.stderr
            assert proc.wait(30) == 0
        finally:
            proc.kill()
            done.set()
            reader.join()
    assert (tmp_path / "stderr").read_bytes() == b"", "every line went to the journal, none to stderr"
    assert all(e["SYSLOG_IDENTIFIER"] == "kexecfs" and e["PRIORITY"].isdigit() for e in entries), entries
    about_db = [e for e in entries if e.get("INSTANCE") == "db"]
    preserved = [e for e in about_db if "preserved token 7" in e["MESSAGE"]]
    assert preserved and preserved[0]["TOKEN"] == "7" and preserved[0]["PRIORITY"] == "6", about_db
    failed = [e for e in about_db if e.get("EVENT") == "prepare"]
    assert failed and failed[0]["TOKEN"] == "7" and failed[0]["PRIORITY"] == "3", about_db
    assert "fd_unpreserve" in failed[0]["MESSAGE"], failed


def kexec_script(mnt: Path, tmp_path: Path, fails: str = "") -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Run examples/kexecfs-kexec (installed as /usr/local/sbin/kexecfs-kexec) against a real
    mount, with the real kexecfs command, and stand-ins for kexec(8) and systemctl(1) that
    write down how they were called, in order (the systemd VM test runs the real ones)."""
    tools = tmp_path / "tools"
    tools.mkdir(exist_ok=True)
    calls = tmp_path / "calls"
    for name in ("kexec", "systemctl"):
        code = 1 if name == fails else 0
        (tools / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {calls}\nexit {code}\n')
        (tools / name).chmod(0o755)
    (tools / "kexecfs").symlink_to(VENV_BIN / "kexecfs")
    kernel = tmp_path / "vmlinuz-6.99"
    kernel.write_bytes(b"not really a kernel")
    env = {**os.environ, "PATH": f"{tools}:{os.environ['PATH']}", "KEXECFS_MOUNT": str(mnt)}
    r = in_kernel_with_kexec(str(ROOT / "examples/kexecfs-kexec"), "--kernel", str(kernel), "--initrd",
                             str(tmp_path / "initrd"), env=env)
    return r, calls.read_text().splitlines() if calls.exists() else []


def test_kexec_script_checks_prepares_loads_and_kexecs(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mountpoint
    sh(f"mkdir {mnt}/db", check=True)
    r, calls = kexec_script(mnt, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls == [f"kexec -l {tmp_path}/vmlinuz-6.99 --initrd={tmp_path}/initrd --reuse-cmdline", "systemctl kexec"]
    assert (mnt / "state").read_text() == "prepared\n", "prepared; the freeze hook freezes at the shutdown"


def test_kexec_script_changes_nothing_when_check_fails(daemon: Daemon, tmp_path: Path) -> None:
    mnt = daemon.mountpoint
    victim = tmp_path / "journal"
    victim.write_bytes(b"j")
    sh(f"mkdir {mnt}/db && exec 5<>{victim} && echo '5 3' > {mnt}/db/fd_preserve && rm {victim}", check=True)
    r, calls = kexec_script(mnt, tmp_path)
    assert r.returncode == 1 and calls == [], r.stdout + r.stderr
    assert f"fix: echo 3 > {mnt}/db/fd_unpreserve" in r.stdout and "nothing was changed" in r.stderr
    assert (mnt / "state").read_text() == "normal\n"


@pytest.mark.parametrize("fails", ["kexec", "systemctl"])
def test_kexec_script_cancels_when_the_kexec_cannot_happen(daemon: Daemon, tmp_path: Path, fails: str) -> None:
    """kexec -l refuses the kernel, or systemd refuses the kexec job: the host is left normal."""
    r, calls = kexec_script(daemon.mountpoint, tmp_path, fails=fails)
    assert r.returncode != 0 and calls[-1].startswith(fails) and len(calls) == (1 if fails == "kexec" else 2), r.stderr
    assert "cancelling the prepare" in r.stderr
    assert (daemon.mountpoint / "state").read_text() == "normal\n", "the prepare is cancelled"


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
