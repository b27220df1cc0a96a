"""``kexecfs check``: is this machine ready for a live update? A preflight in the style of
``criu check``: one finding per line, and the answer in the exit status (0 ready, 1 not).

Each finding has a level: ``ok``; ``warn``, for what works but is worth knowing (no kexec
kernel loaded yet: the update script loads it after the check); ``fail``, for what would
make the update fail or lose what services preserved. Failures name the instance and
token they are about and the one command that clears them.

It reads the mount as :mod:`kexecfs.report` does and looks at the machine around it; it
takes one descriptor from a child of its own to see that pidfd_getfd works. Standard
library only.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import report
from .client import Kexecfs, NotKexecfs
from .core.capture import take_descriptor
from .core.errors import KexecfsError

KEXEC_LOADED = Path("/sys/kernel/kexec_loaded")
LIVEUPDATE_DEVICE = Path("/dev/liveupdate")
# Filesystems whose contents are RAM of the running kernel: an image there is lost by a real kexec.
_VOLATILE = {"tmpfs", "ramfs"}


@dataclass
class Finding:
    check: str  # what was looked at: mount, pidfd_getfd, passthrough, image_dir, free_space, kexec_loaded, luo, ...
    level: str  # ok, warn, fail
    message: str
    fix: str | None = None  # the one command that clears a failure
    instance: str | None = None
    token: int | None = None

    def line(self) -> str:
        about = self.check if self.instance is None else f"instance {self.instance}" + (
            "" if self.token is None else f" token {self.token}")
        return f"{self.level:<5} {about}: {self.message}" + (f"; fix: {self.fix}" if self.fix else "")


def check_pidfd_getfd() -> Finding:
    """Take a descriptor from a child process as the daemon takes a caller's (pidfd_getfd)."""
    child = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        assert child.stdin is not None
        fd = take_descriptor(child.pid, 0)
        same = os.fstat(fd).st_ino == os.fstat(child.stdin.fileno()).st_ino
        os.close(fd)
    except KexecfsError as exc:
        return Finding("pidfd_getfd", "fail", f"cannot take a descriptor from another process: {exc.message} "
                       f"(Linux >= 5.6, CAP_SYS_PTRACE, and no Yama ptrace_scope 3 or seccomp filter against it)")
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait()
    if not same:
        return Finding("pidfd_getfd", "fail", "pidfd_getfd returned another file than the one the process holds")
    return Finding("pidfd_getfd", "ok", "takes descriptors from other processes"
                   + ("" if os.geteuid() == 0 else " (as this user; the daemon needs root's CAP_SYS_PTRACE)"))


def check_passthrough(status: dict[str, Any]) -> Finding:
    if status.get("restore") == "passthrough":
        return Finding("passthrough", "ok", "restored files are served by FUSE passthrough")
    return Finding("passthrough", "warn", "restored files are served through the daemon (proxy): slower, and "
                   "no shared mmap (FUSE passthrough needs Linux >= 6.9; or the mount has no_passthrough)")


def mount_of(path: Path) -> tuple[str, str, str]:
    """(filesystem type, source, super options) of the mount holding ``path``."""
    best: tuple[int, tuple[str, str, str]] = (-1, ("", "", ""))
    dev = os.stat(path).st_dev
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            major, minor = (int(n) for n in fields[2].split(":"))
            point = fields[4].replace("\\040", " ")
            rest = fields[fields.index("-", 6) + 1:]
            inside = str(path) == point or str(path).startswith(point.rstrip("/") + "/")
            if os.makedev(major, minor) == dev and inside and len(point) > best[0]:
                best = (len(point), (rest[0], rest[1], rest[2] if len(rest) > 2 else ""))
    return best[1]


def check_image_dir(status: dict[str, Any]) -> Finding:
    image_dir = Path(status["image_dir"])
    try:
        fstype, source, options = mount_of(image_dir)
    except OSError as exc:
        return Finding("image_dir", "fail", f"{image_dir}: {exc.strerror}")
    if fstype in _VOLATILE:
        return Finding("image_dir", "fail", f"{image_dir} is on {fstype}: the image would not survive a real kexec "
                       "(it is RAM of the old kernel)", fix="kexecfs mount --image-dir DIR on a disk or a DAX "
                       "(pmem) filesystem")
    dax = " with DAX (persistent memory)" if "dax" in options.split(",") else ""
    return Finding("image_dir", "ok", f"{image_dir} is on {fstype or 'an unknown filesystem'} ({source}){dax}")


def check_free_space(status: dict[str, Any], instances: list[dict[str, Any]]) -> Finding:
    image_dir = Path(status["image_dir"])
    needed = sum(inst["image_bytes"] for inst in instances)
    st = os.statvfs(image_dir)
    free = st.f_bavail * st.f_frsize
    if status["state"] in ("prepared", "frozen"):  # the image is written already: its space is taken
        return Finding("free_space", "ok", f"{_size(free)} free in {image_dir}; the image is written ({status['state']})")
    text = f"{_size(free)} free in {image_dir}, the image needs {_size(needed)} of preserved contents"
    if free < needed:
        return Finding("free_space", "fail", text, fix=f"free space in {image_dir} (old images are in "
                       f"{image_dir}/retired)")
    return Finding("free_space", "ok", text)


def check_kexec_loaded(path: Path = KEXEC_LOADED) -> Finding:
    try:
        loaded = path.read_text().strip() == "1"
    except OSError:
        return Finding("kexec_loaded", "fail", f"{path} is missing: the running kernel cannot kexec "
                       f"(CONFIG_KEXEC or CONFIG_KEXEC_FILE)", fix="boot a kernel built with kexec")
    if loaded:
        return Finding("kexec_loaded", "ok", "a kernel is loaded for kexec")
    # Not a failure: the update script loads the kernel after this check (kexecfs-kexec).
    return Finding("kexec_loaded", "warn", "no kernel is loaded for kexec yet (kexec -l KERNEL --initrd=INITRD "
                   "--reuse-cmdline before systemctl kexec)")


def check_luo(path: Path = LIVEUPDATE_DEVICE) -> Finding:
    if path.exists():
        return Finding("luo", "ok", f"the running kernel has LUO ({path})")
    return Finding("luo", "ok", f"the running kernel has no LUO ({path} is missing): kexecfs hands files over "
                   f"through its image")


def check_state(mount: Path, status: dict[str, Any]) -> list[Finding]:
    state = status["state"]
    found = [Finding("state", "ok" if state != "updated" else "fail", f"{state}" + (
        ": the last update is not finished, so prepare is refused" if state == "updated" else ""),
        fix=f"echo finish > {mount}/state (drops what was not restored)" if state == "updated" else None)]
    if status.get("last_error"):
        found.append(Finding("last_error", "warn", status["last_error"]))
    return found


def check_instances(mount: Path, instances: list[dict[str, Any]]) -> list[Finding]:
    """Every instance's state, and each preserved file that the next prepare would refuse."""
    found = []
    for inst in instances:
        name = inst["name"]
        owner = inst["owner"]
        found.append(Finding("instance", "ok", f"{inst['state']}, {inst['files']} file(s), {inst['bytes']} bytes, "
                             f"owner {owner['uid']}:{owner['gid']}", instance=name))
        limit = inst["limits"]["bytes_max"]
        if limit is not None and inst["image_bytes"] > limit:
            found.append(Finding("instance", "fail", f"holds {inst['image_bytes']} bytes of memfd contents, over "
                                 f"its bytes.max of {limit}: prepare would fail (EDQUOT)", instance=name,
                                 fix=f"echo TOKEN > {mount}/{name}/fd_unpreserve, or raise "
                                     f"{mount}/{name}/bytes.max"))
        for pf in inst["preserved"]:
            if pf["problem"]:
                found.append(Finding("instance", "fail", pf["problem"], instance=name,
                                     token=pf["token"], fix=f"echo {pf['token']} > {mount}/{name}/fd_unpreserve"))
    return found


def run_checks(mount: Path) -> list[Finding]:
    found = [check_pidfd_getfd(), check_kexec_loaded(), check_luo()]
    try:
        Kexecfs(mount)  # NotKexecfs unless a kexecfs daemon serves there
        status = report.read_status(mount)
        instances = report.read_instances(mount)["instances"]
    except (NotKexecfs, OSError) as exc:
        return [Finding("mount", "fail", f"{mount}: {exc.strerror or exc}",
                        fix="systemctl start kexecfs.service (or: kexecfs mount MOUNTPOINT)"), *found]
    found.insert(0, Finding("mount", "ok", f"{mount} serves"))
    found[1:1] = [check_passthrough(status), check_image_dir(status), check_free_space(status, instances)]
    return found + check_state(mount, status) + check_instances(mount, instances)


def ready(findings: list[Finding]) -> bool:
    return not any(f.level == "fail" for f in findings)


def as_json(findings: list[Finding]) -> dict[str, Any]:
    return {"version": report.SCHEMA_VERSION, "ready": ready(findings), "findings": [asdict(f) for f in findings]}


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
