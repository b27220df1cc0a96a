"""QEMU as ``kexecfs vm`` runs it: the command line around the user's options, the
process, and the migration settings that leave guest RAM where it is.

Guest RAM is a memfd mapped shared (``memory-backend-file,mem-path=/proc/self/fd/N,
share=on``): QEMU never copies it, the memfd lives on in kexecfs across the kexec, and
with the ``x-ignore-shared`` migration capability a migration carries everything but that
RAM (about 0.3 MB for a small PC). QEMU 7.2 (Debian 12) has exactly this; QEMU 8.2 and
later add the ``cpr-reboot`` migration mode for this very use (a host reboot or kexec
between save and load; it lets some devices that block ordinary migration through, VFIO
since 9.0), which is used where the QEMU offers it. ``cpr-transfer`` (QEMU 10) hands
descriptors from one QEMU to the next while both run on the same kernel, so it cannot
cross a kexec and is not used.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .qmp import Monitor, MonitorClosed, QmpError

RAM_BACKEND_ID = "kexecfs-ram"  # also the RAM block's name in the migration stream: fixed
# Options kexecfs vm sets itself: the user's own would contradict them.
OWN_OPTIONS = {"m", "mem-path", "mem-prealloc", "incoming", "daemonize", "pidfile"}
UNLIMITED_BANDWIDTH = 1 << 40  # bytes/s: a stopped guest's state is written at full speed
_SIZE = re.compile(r"(\d+)([KMGT]?)(i?B?)", re.IGNORECASE)


class VmError(Exception):
    """What ``kexecfs vm`` could not do, said for the person at the terminal."""


@dataclass
class GuestConfig:
    """A VM as ``kexecfs vm start`` was asked for it; saved with its device state, so
    that ``resume`` starts the same machine after the kexec."""

    name: str
    memory: int  # bytes of guest RAM
    qemu: str = "qemu-system-x86_64"
    options: list[str] = field(default_factory=list)  # the user's, passed through

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> GuestConfig:
        try:
            config = cls(str(data["name"]), int(data["memory"]), str(data["qemu"]),
                         [str(o) for o in data["options"]])
        except (KeyError, TypeError, ValueError) as exc:
            raise VmError(f"the saved VM configuration is incomplete or wrong: {exc!r}") from None
        return config


def parse_size(text: str) -> int:
    """A size as QEMU's ``-m`` takes it: a number of MiB, or with K, M, G or T (binary)."""
    m = _SIZE.fullmatch(text.strip())
    if not m:
        raise VmError(f"not a size: {text!r} (say 512M, 4G, or a number of MiB)")
    number, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return number << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def check_options(options: list[str], memory: int) -> None:
    for opt in options:
        if opt.startswith("-") and opt.lstrip("-") in OWN_OPTIONS:
            raise VmError(f"QEMU option {opt} is kexecfs vm's own (guest RAM, monitor and process); "
                          f"leave it out (the RAM size is --memory)")
    page = os.sysconf("SC_PAGE_SIZE")
    if memory <= 0 or memory % (1 << 20):
        raise VmError(f"guest RAM of {memory} bytes: give a whole number of MiB")
    if memory % page:
        raise VmError(f"guest RAM of {memory} bytes is not a multiple of the page size {page}")


@dataclass(frozen=True)
class RunDir:
    """Where a VM's QEMU keeps its monitor socket, pid file and log while it runs
    (``/run/kexecfs-vm/NAME``): nothing here needs to survive a kexec."""

    path: Path

    @property
    def monitor(self) -> Path:
        return self.path / "qmp.sock"

    @property
    def pidfile(self) -> Path:
        return self.path / "qemu.pid"

    @property
    def log(self) -> Path:
        return self.path / "qemu.log"

    def prepare(self) -> None:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.monitor.unlink(missing_ok=True)
        self.pidfile.unlink(missing_ok=True)

    def pid(self) -> int | None:
        """The pid of this VM's QEMU if it runs, else None."""
        try:
            pid = int(self.pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if alive(pid) else None

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log.read_text(errors="replace").strip().splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join("  qemu: " + line for line in text)


def command_line(config: GuestConfig, ram_fd: int, run: RunDir, incoming: bool) -> list[str]:
    """QEMU's argv: guest RAM from the memfd at ``ram_fd`` (shared, never discarded) and the
    monitor; then the user's options. :func:`launch` also lets QEMU inherit the VM's next
    device-state memfd, which QEMU holds without knowing (not in an fdset: QEMU closes the
    fds of its fdsets whenever no monitor is connected)."""
    ram = (f"memory-backend-file,id={RAM_BACKEND_ID},mem-path=/proc/self/fd/{ram_fd},share=on,"
           f"size={config.memory},discard-data=off")  # discard-data=on would drop the guest at exit
    argv = [config.qemu, "-object", ram, "-machine", f"memory-backend={RAM_BACKEND_ID}",
            "-qmp", f"unix:{run.monitor},server=on,wait=off", "-pidfile", str(run.pidfile), *config.options]
    # -S: the loaded guest waits for "cont", which resume sends once everything checks out.
    return argv + (["-incoming", "defer", "-S"] if incoming else [])


def launch(argv: list[str], fds: list[int], run: RunDir, timeout: float) -> tuple[subprocess.Popen[bytes], Monitor]:
    """Start QEMU in a session of its own (it outlives this command) and connect to its
    monitor; VmError with QEMU's own words if it exits first."""
    run.prepare()
    with open(run.log, "ab") as log:
        log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(argv)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    start_new_session=True)
        except OSError as exc:
            raise VmError(f"cannot run {argv[0]}: {exc.strerror} (install qemu-system-x86, or say --qemu PATH)")
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise VmError(f"QEMU exited with status {proc.returncode} while starting:\n{run.log_tail()}")
        try:
            return proc, Monitor.connect(run.monitor, max(1.0, deadline - time.monotonic()))
        except (FileNotFoundError, ConnectionRefusedError, MonitorClosed, TimeoutError):
            pass  # not listening yet, or not greeting yet: QEMU is still starting
        if time.monotonic() > deadline:
            kill(proc.pid)
            raise VmError(f"QEMU did not open its monitor within {timeout:.0f} s:\n{run.log_tail()}")
        time.sleep(0.01)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait for QEMU to be gone. It is rarely this process's child (start and update are
    different commands), so a zombie waiting for its reaper counts as gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            if not alive(pid):
                return True
        time.sleep(0.002)
    return False


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# ---------------------------------------------------------------------------- migration

@dataclass(frozen=True)
class Migration:
    """How this QEMU migrates without its guest RAM."""

    mode: str  # "normal" (x-ignore-shared alone) or "cpr-reboot"
    version: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def migration_of(monitor: Monitor) -> Migration:
    """What this QEMU offers: VmError if it cannot leave shared RAM out of a migration."""
    caps = {c["capability"] for c in monitor.execute("query-migrate-capabilities")}
    if "x-ignore-shared" not in caps:
        raise VmError("this QEMU has no x-ignore-shared migration capability (QEMU >= 4.0 has it): "
                      "it would copy all guest RAM into the device state")
    v = monitor.execute("query-version")["qemu"]
    return Migration("cpr-reboot" if _has_enum_value(monitor, "cpr-reboot") else "normal",
                     f"{v['major']}.{v['minor']}.{v['micro']}")


def _has_enum_value(monitor: Monitor, value: str) -> bool:
    """Does QMP's schema know ``value`` in some enum (MigMode's cpr-reboot: QEMU >= 8.2)?"""
    for entry in monitor.execute("query-qmp-schema"):
        if entry.get("meta-type") != "enum":
            continue
        names = entry.get("values") or [m.get("name") for m in entry.get("members", [])]
        if value in names:
            return True
    return False


def set_up_migration(monitor: Monitor, mode: str, fall_back: bool = False) -> str:
    """Capabilities and parameters, the same on both sides (the incoming side must match);
    returns the mode set. With ``fall_back``, a QEMU that refuses ``mode`` (a newer mode
    than this code was tried with) migrates in normal mode, which every QEMU here can."""
    monitor.execute("migrate-set-capabilities", {"capabilities": [
        {"capability": "x-ignore-shared", "state": True}, {"capability": "events", "state": True}]})
    monitor.execute("migrate-set-parameters", {"max-bandwidth": UNLIMITED_BANDWIDTH})
    if mode != "normal":
        try:
            monitor.execute("migrate-set-parameters", {"mode": mode})
        except QmpError:
            if not fall_back:
                raise
            return "normal"
    return mode


def wait_migration(monitor: Monitor, timeout: float) -> None:
    """Until the migration is completed; VmError (with QEMU's reason) if it failed or took too long."""
    try:
        event = monitor.wait_event("MIGRATION", timeout,
                                   lambda d: d.get("status") in ("completed", "failed", "cancelled"))
    except TimeoutError:
        raise VmError(f"the migration did not complete within {timeout:.0f} s") from None
    status = event["data"]["status"]
    if status != "completed":
        info = query_migrate(monitor)
        raise VmError(f"the migration {status}: {info.get('error-desc', 'QEMU gave no reason')}")


def query_migrate(monitor: Monitor) -> dict[str, Any]:
    try:
        return monitor.execute("query-migrate") or {}
    except (QmpError, MonitorClosed, TimeoutError):
        return {}


def wait_runstate(monitor: Monitor, leaving: str, timeout: float) -> str:
    """Poll the run state until it is no longer ``leaving`` (an incoming migration
    completes in a bottom half after its last event)."""
    deadline = time.monotonic() + timeout
    while True:
        status = monitor.execute("query-status")["status"]
        if status != leaving or time.monotonic() > deadline:
            return status
        time.sleep(0.001)


def machine_type(monitor: Monitor) -> str:
    """The machine type QEMU resolved (``pc`` is an alias of the newest ``pc-i440fx-X.Y``)."""
    return str(monitor.execute("qom-get", {"path": "/machine", "property": "type"})).removesuffix("-machine")


def holder_name(vm: str) -> str:
    """The name of a VM's device-state memfd (memfd_create's), by which update finds it in QEMU."""
    return f"kexecfs-vm:{vm}:device-state"


def holder_of(pid: int, vm: str) -> int:
    """The device-state memfd QEMU ``pid`` holds for kexecfs, opened anew, read-write."""
    want = f"/memfd:{holder_name(vm)} (deleted)"
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(entry.path) == want:
                    return os.open(entry.path, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
    except OSError as exc:
        raise VmError(f"cannot look into the descriptors of QEMU {pid}: {exc.strerror}") from None
    raise VmError(f"QEMU {pid} holds no memfd {holder_name(vm)!r}: it was not started by kexecfs vm")
