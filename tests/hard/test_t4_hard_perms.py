"""The permissions matrix: for root, an instance's owner (the creator, root, or the uid
it was delegated to with chown) and other uids, every file and operation of three
instances, before and after a simulated kexec, checked against SPEC section 7 — also
from inside a user + pid + mount namespace, through bind mounts of the instances. Every
answer is compared with the policy; then the instances' contents show that nothing
crossed from one to another.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from harness import (NOBODY, OTHERS_PYTHON, Daemon, needs_fuse, others_env, public_copy, sh_state_event, state,
                     write_errno)

pytestmark = needs_fuse

UA, UB = 1001, 1002
INSTANCES = {"a": UA, "b": UB, "r": 0}  # r: created by root and kept (its creator owns it)


class Role:
    def __init__(self, name: str, uid: int, slot: int, userns: bool = False) -> None:
        self.name, self.uid, self.slot, self.userns = name, uid, slot, userns

    def manages(self, inst: str) -> bool:
        return self.uid == 0 or self.uid == INSTANCES[inst]

    def __repr__(self) -> str:
        return self.name


ROLES = [Role("root", 0, 0), Role("owner-a", UA, 1), Role("owner-b", UB, 2), Role("nobody", NOBODY, 3),
         Role("owner-a-in-userns", UA, 4, userns=True), Role("owner-b-in-userns", UB, 5, userns=True)]


def run_agent(role: Role, ops: list[list[Any]], mnt: Path, binds: Path) -> dict[str, list[Any]]:
    cmd = [OTHERS_PYTHON, str(public_copy("tests/hard/perm_agent.py")), json.dumps(ops)]
    if role.userns:
        # A container: its own user (mapped root = the role's uid), pid and mount namespaces,
        # with each instance bind-mounted into it.
        mounts = " && ".join(f"mount --bind {mnt}/{i} {binds}/{i}" for i in INSTANCES)
        cmd = ["unshare", "--user", "--map-root-user", "--mount", "--pid", "--fork", "--mount-proc",
               "bash", "-c", f"{mounts} && exec \"$@\"", "agent", *cmd]
    if role.uid:
        cmd = ["setpriv", f"--reuid={role.uid}", f"--regid={role.uid}", "--clear-groups", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=others_env())
    assert r.returncode == 0, f"{role}: {r.stderr}"
    return json.loads(r.stdout)


def instance_ops(role: Role, mnt: Path, binds: Path) -> list[tuple[list[Any], str]]:
    """(operation, expected answer) before any kexec, per SPEC: mode bits first (the kernel,
    default_permissions), the owner check in the daemon as well."""
    s = role.slot
    out: list[tuple[list[Any], str]] = []
    for inst in INSTANCES:
        base = f"{binds if role.userns else mnt}/{inst}"
        m = role.manages(inst)
        deny = "EACCES"

        def op(name: str, expected: str, *spec: Any) -> None:
            out.append(([f"{inst}:{name}", *spec], expected))

        op("read state", "ok", "read", f"{base}/state")
        op("read fd_preserve", "ok", "read", f"{base}/fd_preserve")
        op("ls fds", "ok", "listdir", f"{base}/fds")
        op("stat fds/3000", "ok", "stat", f"{base}/fds/3000")
        op("fd_preserve", "ok" if m else deny, "preserve", f"{base}/fd_preserve", 100 + s)
        op("fd_unpreserve", "ok" if m else deny, "write", f"{base}/fd_unpreserve", 1000 + s)
        op("GET_STATE", "ok" if m else deny, "ioctl_get_state", f"{base}/control")
        op("FD_PRESERVE", "ok" if m else deny, "ioctl_preserve", f"{base}/control", 200 + s)
        op("FD_UNPRESERVE", "ok" if m else deny, "ioctl_unpreserve", f"{base}/control", 2000 + s)
        op("FD_RESTORE before kexec", "EBUSY" if m else deny, "ioctl_restore", f"{base}/control", 3000)
        op("open fds/3000 before kexec", "EBUSY" if m else deny, "open", f"{base}/fds/3000", os.O_RDONLY)
        op("finish while normal", "EINVAL" if m else deny, "write", f"{base}/state", "finish")
        op("chmod", "ok" if m else "EPERM", "chmod", base, 0o755)
        if role.uid:
            # One door for events: an owner may only send finish through its instance (SPEC 3).
            op("PREPARE", "EINVAL" if m else deny, "ioctl_prepare", f"{base}/control")
            op("event in instance state", "EINVAL" if m else deny, "write", f"{base}/state", "prepare")
        if not role.userns:  # uids of other instances are not mapped into the user namespace
            op("chown to its owner", "ok" if role.uid == 0 else "EPERM", "chown", base, INSTANCES[inst],
               INSTANCES[inst])
            if role.uid:
                op("chown to itself", "EPERM", "chown", base, role.uid, role.uid)
            op("rmdir", "EBUSY" if role.uid == 0 else deny, "rmdir", base)
    g = str(mnt)
    out += [
        (["mkdir", "mkdir", f"{g}/made-by-{s}"], "ok" if role.uid == 0 else "EACCES"),
        (["read status", "read", f"{g}/status"], "ok"),
        (["top control GET_STATE", "ioctl_get_state", f"{g}/control"], "ok"),
        (["top control FD_PRESERVE into default", "ioctl_preserve", f"{g}/control", 300 + s],
         "ok" if role.uid == 0 else "EACCES"),
    ]
    if role.uid:
        out.append((["global prepare", "write", f"{g}/state", "prepare"], "EACCES"))
        out.append((["global PREPARE", "ioctl_prepare", f"{g}/control"], "EPERM"))
    return out


def after_kexec_ops(role: Role, mnt: Path, binds: Path) -> list[tuple[list[Any], str]]:
    s = role.slot
    out: list[tuple[list[Any], str]] = []
    for inst in INSTANCES:
        base = f"{binds if role.userns else mnt}/{inst}"
        m = role.manages(inst)

        def op(name: str, expected: str, *spec: Any) -> None:
            out.append(([f"{inst}:{name}", *spec], expected))

        op("open fds/3000 (restore)", "ok" if m else "EACCES", "open", f"{base}/fds/3000", os.O_RDONLY)
        op("open own fds/100+slot", "ok" if m else "ENOENT", "open", f"{base}/fds/{100 + s}", os.O_RDONLY)
        op("xattr pos", "ok" if m else "EACCES", "getxattr", f"{base}/fds/3000", "user.kexecfs.pos")
        op("FD_RESTORE", errno.errorcode[errno.EOPNOTSUPP] if m else "EACCES", "ioctl_restore", f"{base}/control", 3000)
        op("fd_preserve while updated", "ok" if m else "EACCES", "preserve", f"{base}/fd_preserve", 400 + s)
        op("stat fds/3000", "ok", "stat", f"{base}/fds/3000")
    return out


def check(role: Role, expected_ops: list[tuple[list[Any], str]], got: dict[str, list[Any]]) -> list[str]:
    wrong = []
    for spec, expected in expected_ops:
        answer, detail = got[spec[0]]
        if answer != expected:
            wrong.append(f"{role} {spec[0]}: {answer}, policy says {expected}")
        elif spec[1] == "open" and answer == "ok" and spec[0].endswith("fds/3000 (restore)"):
            if detail != "preserved by root":
                wrong.append(f"{role} {spec[0]}: restored {detail!r}")
    return wrong


def test_permissions_matrix(tmp_path: Path) -> None:
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    binds = tmp_path / "binds"
    binds.mkdir(mode=0o777)
    os.chmod(binds, 0o777)
    held = []
    try:
        for inst, uid in INSTANCES.items():
            (binds / inst).mkdir()
            os.chmod(binds / inst, 0o777)
            os.mkdir(mnt / inst)
            if uid:
                os.chown(mnt / inst, uid, uid)  # delegated
            # What each role will unpreserve (by write and by ioctl), and a file to restore.
            tokens = [1000 + r.slot for r in ROLES] + [2000 + r.slot for r in ROLES] + [3000]
            for token in tokens:
                fd = os.memfd_create(f"{inst}-{token}")
                os.write(fd, b"preserved by root")
                held.append(fd)
                assert write_errno(mnt / inst / "fd_preserve", f"{fd} {token}".encode()) == 0
        os.mkdir(mnt / "default")
        wrong: list[str] = []
        cases = 0
        for role in ROLES:
            ops = instance_ops(role, mnt, binds)
            wrong += check(role, ops, run_agent(role, [spec for spec, _ in ops], mnt, binds))
            cases += len(ops)
        assert state(mnt) == "normal"
        # Nothing crossed: each instance holds exactly what its managers put there.
        for inst in INSTANCES:
            managers = [r for r in ROLES if r.manages(inst)]
            want = sorted({1000 + r.slot for r in ROLES} - {1000 + r.slot for r in managers}
                          | {2000 + r.slot for r in ROLES} - {2000 + r.slot for r in managers}
                          | {3000} | {100 + r.slot for r in managers} | {200 + r.slot for r in managers})
            got = [int(line.split()[0]) for line in (mnt / inst / "fd_preserve").read_text().splitlines()]
            assert got == want, f"{inst}: tokens {got}, expected {want}"
        assert [int(line.split()[0]) for line in (mnt / "default/fd_preserve").read_text().splitlines()] == [300]
        for event in ("prepare", "kexec"):
            sh_state_event(mnt, event)
        for role in ROLES:
            ops = after_kexec_ops(role, mnt, binds)
            wrong += check(role, ops, run_agent(role, [spec for spec, _ in ops], mnt, binds))
            cases += len(ops)
        # finish: everyone but the owner is refused; the owner's ends that instance's update.
        for inst, owner in INSTANCES.items():
            for role in ROLES:
                if not role.manages(inst) and not role.userns:
                    r = run_agent(role, [["finish", "write", f"{mnt}/{inst}/state", "finish"]], mnt, binds)
                    wrong += [f"{role} finish {inst}: {r['finish'][0]}"] if r["finish"][0] != "EACCES" else []
                    cases += 1
            owner_role = next(r for r in ROLES if r.uid == owner and not r.userns)
            r = run_agent(owner_role, [["finish", "write", f"{mnt}/{inst}/state", "finish"]], mnt, binds)
            wrong += [f"{owner_role} finish {inst}: {r['finish'][0]}"] if r["finish"][0] != "ok" else []
            cases += 1
            assert (mnt / inst / "state").read_text() == "normal\n"
        assert wrong == [], "\n".join(wrong)
        print(f"{cases} permission cases, all as the policy says")
    finally:
        for fd in held:
            os.close(fd)
        d.stop()
    d.check_log()


def test_only_root_creates_the_default_instance(tmp_path: Path) -> None:
    """Regression: the FD ioctls of the top-level control created the 'default' instance
    for whoever came first, so any uid could own an instance although only root may
    create instances (mkdir at the top is root's): it would then hold root's 'default'."""
    d = Daemon.at(tmp_path)
    d.start()
    try:
        ops = [["preserve", "ioctl_preserve", f"{d.mountpoint}/control", 1],
               ["unpreserve", "ioctl_unpreserve", f"{d.mountpoint}/control", 1]]
        got = run_agent(Role("nobody", NOBODY, 3), ops, d.mountpoint, tmp_path)
        assert got == {"preserve": ["EACCES", None], "unpreserve": ["EACCES", None]}
        assert not (d.mountpoint / "default").exists()
        assert run_agent(Role("root", 0, 0), ops[:1], d.mountpoint, tmp_path)["preserve"][0] == "ok"
        assert os.stat(d.mountpoint / "default").st_uid == 0
    finally:
        d.stop()
    d.check_log()
