"""A VM whose guest RAM lives in kexecfs, through a host kernel update.

Each VM has an instance of its own, named after it, holding two memfds:

- token 1, the **device-state memfd** (:mod:`.devstate`): empty while the VM runs (its
  QEMU holds a descriptor of it); ``update`` fills it with the migration stream and seals it;
- token 2, the **guest RAM** memfd, mapped shared by QEMU.

The device state has the lower token on purpose: a freeze writes an instance's files in
token order, so if a (mistimed) freeze catches the device state's commit record, it
reads the RAM after it, when the guest was already stopped. Stopped RAM with a
committed state, or no committed state at all: never running RAM with a state that
claims otherwise.

The update itself is the operator's: ``echo prepare > state`` copies every instance
(guest RAM included) into the next image while the guests still run; then
``kexecfs vm update NAME`` stops each VM, saves its device state and quits its QEMU
(systemd: as the VM service's ExecStop, before the freeze hook); then the kexec, whose
freeze rewrites only what changed since prepare. After it, ``kexecfs vm resume NAME``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..client import InstanceDir, Kexecfs, Session
from . import devstate
from .qemu import (GuestConfig, Migration, RunDir, VmError, check_options, command_line, holder_name, holder_of,
                   kill, launch, machine_type, migration_of, query_migrate, set_up_migration, wait_exit,
                   wait_migration, wait_runstate)
from .qmp import Monitor, MonitorClosed, QmpError

DEVICE_STATE_TOKEN, RAM_TOKEN = 1, 2
STREAM_FD_NAME = "kexecfs-device-state"


@dataclass(frozen=True)
class SaveTimes:
    """Seconds of ``update``, from QMP ``stop``."""

    saved: float  # stop until the device state is committed
    quit: float  # until QEMU is gone
    stream_bytes: int
    stopped_at: float  # time.perf_counter() when "stop" was sent: where the downtime starts


@dataclass(frozen=True)
class ResumeTimes:
    """Seconds of ``resume``, from starting the new QEMU."""

    started: float  # its monitor answers
    loaded: float  # the device state is loaded
    running: float  # "cont" returned: the guest runs
    running_at: float  # time.perf_counter() then: where the downtime ends


def default_run_base() -> Path:
    if os.geteuid() == 0:
        return Path("/run/kexecfs-vm")
    return Path(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/kexecfs-vm-{os.geteuid()}") / "kexecfs-vm"


@contextmanager
def doing(what: str) -> Iterator[None]:
    """Turn a refused kexecfs request into a VmError that says what was being done."""
    try:
        yield
    except OSError as exc:
        raise VmError(f"cannot {what}: {exc.strerror or exc}") from None


# ---------------------------------------------------------------------------- start

def start(kx: Kexecfs, config: GuestConfig, run: RunDir, fill: Callable[[int], None] | None = None,
          timeout: float = 30) -> int:
    """Create and preserve the VM's memfds in its instance, then start QEMU on them.
    ``fill`` may write the guest RAM's first contents (a benchmark's data). Returns QEMU's pid."""
    check_options(config.options, config.memory)
    inst, created = _instance(kx, config.name)
    if inst.preserved():
        raise VmError(f"instance {config.name!r} already holds preserved files: a VM of that name is "
                      f"running or suspended (kexecfs vm list); kexecfs vm stop {config.name} ends it")
    ram = _memfd(f"kexecfs-vm:{config.name}:ram", config.memory)
    holder = _memfd(holder_name(config.name), 0)
    try:
        if fill:
            fill(ram)
        with doing(f"preserve the VM's memfds in instance {config.name!r}"):
            inst.preserve(holder, DEVICE_STATE_TOKEN)
            inst.preserve(ram, RAM_TOKEN)
        try:
            proc, monitor = launch(command_line(config, ram, run, incoming=False), [ram, holder], run,
                                   timeout)
        except BaseException:
            _drop_files(inst)  # a VM that never ran has nothing to keep
            if created:
                kx.delete_instance(config.name)
            raise
        monitor.close()
        _save_config(run, config)
        return proc.pid
    finally:
        os.close(ram)
        os.close(holder)


def _instance(kx: Kexecfs, name: str) -> tuple[InstanceDir, bool]:
    if (kx.path / name).is_dir():
        return kx.instance(name), False
    with doing(f"create instance {name!r} (only root makes instances; for a service: "
               f"mkdir {kx.path / name} && chown -R USER {kx.path / name})"):
        return kx.create_instance(name), True


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _drop_files(inst: InstanceDir) -> None:
    for p in inst.preserved():
        inst.unpreserve(p.token)


def _save_config(run: RunDir, config: GuestConfig) -> None:
    (run.path / "config.json").write_text(json.dumps(config.to_json(), indent=2) + "\n")


def _load_config(run: RunDir, name: str) -> GuestConfig:
    try:
        return GuestConfig.from_json(json.loads((run.path / "config.json").read_text()))
    except (OSError, ValueError) as exc:
        raise VmError(f"VM {name!r} has no run directory {run.path} ({exc}): is it running, and was it "
                      f"started with the same --run-dir?") from None


# ---------------------------------------------------------------------------- update

def update(kx: Kexecfs, name: str, run: RunDir, timeout: float = 60, prepare: bool = False) -> SaveTimes:
    """Stop the VM, save its device state into its instance, quit its QEMU.

    Everything that can be checked is checked while the guest still runs. A failure
    before the device state is committed lets the guest run on; after it, never (the
    saved state is what the next boot resumes: a guest running on would fork it)."""
    inst = kx.instance(name)
    _check_holds_vm(inst)
    config = _load_config(run, name)
    pid = run.pid()
    if pid is None:
        raise VmError(f"QEMU of VM {name!r} is not running (updated already? then it resumes after the kexec)")
    _check_prepared(kx, name, prepare)
    with Monitor.connect(run.monitor) as monitor:
        offered = migration_of(monitor)
        migration = Migration(set_up_migration(monitor, offered.mode, fall_back=True), offered.version)
        record = {"guest": config.to_json(), "migration": migration.to_json(),
                  "machine_type": machine_type(monitor),
                  "saved_on": {"boot_id": _boot_id(), "time": time.time()}}
        holder = holder_of(pid, name)
        try:
            times = _suspend(monitor, holder, record, timeout, pid)
        finally:
            os.close(holder)
    after = kx.state()
    if after != "prepared":
        print(f"kexecfs vm: warning: the machine went {after} while {name!r} was saved; if the image was "
              f"written before, resume will say that {name!r} was not saved", file=sys.stderr)
    return times


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _check_holds_vm(inst: InstanceDir) -> None:
    tokens = {p.token: p for p in inst.preserved()}
    if RAM_TOKEN not in tokens or tokens[RAM_TOKEN].kind != "memfd":
        raise VmError(f"instance {inst.name!r} holds no VM: no guest RAM memfd at token {RAM_TOKEN}")
    if DEVICE_STATE_TOKEN not in tokens:
        raise VmError(f"the device state of {inst.name!r} is missing (token {DEVICE_STATE_TOKEN} was "
                      f"unpreserved). Its guest RAM stays preserved in {inst.path}/fds/{RAM_TOKEN}; "
                      f"nothing was discarded")


def _check_prepared(kx: Kexecfs, name: str, prepare: bool) -> None:
    state = kx.state()
    if state == "normal" and prepare:
        with doing("send prepare (root's, as every global event)"):
            state = kx.event("prepare")
    if state != "prepared":
        hint = {"normal": "the operator sends prepare first (echo prepare > MOUNT/state), or say --prepare",
                "frozen": "the image is complete without it: too late for this kexec (cancel, then again)",
                }.get(state, "update belongs between prepare and the kexec")
        raise VmError(f"the machine is {state}, not prepared, so {name!r} keeps running: {hint}")


def _suspend(monitor: Monitor, holder: int, record: dict[str, Any], timeout: float, pid: int) -> SaveTimes:
    pending = devstate.begin(holder, record)
    monitor.execute("getfd", {"fdname": STREAM_FD_NAME}, fds=[holder])
    t0 = time.perf_counter()
    monitor.execute("stop")
    try:
        monitor.execute("migrate", {"uri": f"fd:{STREAM_FD_NAME}"})
        wait_migration(monitor, timeout)
        stream_bytes = devstate.commit(holder, pending)
    except (VmError, QmpError, devstate.DeviceStateError, TimeoutError, OSError) as exc:
        _carry_on(monitor, holder)
        raise VmError(f"saving the device state failed: {exc}; the guest runs on, and will not survive "
                      f"this kexec unless update succeeds") from None
    saved = time.perf_counter() - t0
    try:
        monitor.execute("quit")
    except MonitorClosed:
        pass  # gone before it answered: what quit asks
    if not wait_exit(pid, 30):
        kill(pid)
    return SaveTimes(saved, time.perf_counter() - t0, stream_bytes, t0)


def _carry_on(monitor: Monitor, holder: int) -> None:
    """After a failed save: the migration cancelled, no commit record, the guest running again."""
    try:
        if query_migrate(monitor).get("status") not in (None, "none", "completed", "failed", "cancelled"):
            monitor.execute("migrate_cancel")
            # Cancelling is asynchronous: QEMU may write a little more before it stops writing.
            monitor.wait_event("MIGRATION", 5, lambda d: d.get("status") in ("cancelled", "failed", "completed"))
    except (QmpError, MonitorClosed, TimeoutError):
        pass
    os.ftruncate(holder, 0)
    try:
        monitor.execute("cont")
    except (QmpError, MonitorClosed, TimeoutError):
        pass


# ---------------------------------------------------------------------------- resume

def resume(kx: Kexecfs, name: str, run: RunDir, qemu: str | None = None, timeout: float = 60) -> ResumeTimes:
    """After the kexec: a new QEMU on the preserved RAM, loading the saved device state;
    then the instance's update is finished. Any failure before the guest runs changes
    nothing in the instance, so resume can be run again."""
    inst = kx.instance(name)
    _check_holds_vm(inst)
    state = inst.state()
    if state != "updated":
        raise VmError(f"instance {name!r} is {state}: resume is for after a kexec (VMs that were updated "
                      f"come back after the next one)")
    saved = _saved_state(inst)
    config = GuestConfig.from_json(saved.config.get("guest"))
    if qemu:
        config.qemu = qemu
    with doing(f"restore the guest RAM of {name!r} (instance {name}, token {RAM_TOKEN})"):
        ram = _retrieve(inst, RAM_TOKEN)
    stream, holder = _memfd("kexecfs-vm:stream", 0), _memfd(holder_name(name), 0)
    try:
        _check_ram(ram, config)
        os.write(stream, saved.stream)
        os.lseek(stream, 0, os.SEEK_SET)
        times = _start_loaded(config, saved.config, ram, holder, stream, run, timeout)
        # The guest runs: its old device state is spent; the fresh memfd takes its token.
        with doing(f"preserve the next device-state memfd of {name!r}"):
            inst.unpreserve(DEVICE_STATE_TOKEN)
            inst.preserve(holder, DEVICE_STATE_TOKEN)
        _save_config(run, config)
        with doing(f"finish instance {name!r}"):
            inst.finish()
        return times
    finally:
        for fd in (ram, stream, holder):
            os.close(fd)


def _saved_state(inst: InstanceDir) -> devstate.SavedState:
    with doing(f"restore the device state of {inst.name!r} (token {DEVICE_STATE_TOKEN})"):
        fd = _retrieve(inst, DEVICE_STATE_TOKEN)
    try:
        return devstate.load(fd)
    except devstate.NeverSaved:
        raise VmError(f"{inst.name!r} was not stopped in time: its device state was never saved (kexecfs vm "
                      f"update did not run, or not to the end, before the freeze). Its guest RAM stays preserved "
                      f"in {inst.path}/fds/{RAM_TOKEN}; nothing was discarded") from None
    except devstate.Damaged as exc:
        raise VmError(f"the device state of {inst.name!r} is damaged: {exc}. Its guest RAM stays preserved in "
                      f"{inst.path}/fds/{RAM_TOKEN}; nothing was discarded") from None
    finally:
        os.close(fd)


def _retrieve(inst: InstanceDir, token: int) -> int:
    """The restored memfd itself (not a FUSE stand-in): QEMU maps it on any kernel,
    with or without FUSE passthrough."""
    control = os.open(inst.path / "control", os.O_RDWR | os.O_CLOEXEC)
    # A plain open of an instance's control is no LUO session: closing it finishes nothing.
    with Session(inst.path.parent, inst.path.name, control) as session:
        return session.retrieve(token)


def _check_ram(ram: int, config: GuestConfig) -> None:
    size = os.fstat(ram).st_size
    if size != config.memory:
        raise VmError(f"the preserved guest RAM of {config.name!r} is {size} bytes; its device state was saved "
                      f"for {config.memory}")


def _start_loaded(config: GuestConfig, record: dict[str, Any], ram: int, holder: int, stream: int, run: RunDir,
                  timeout: float) -> ResumeTimes:
    untouched = (f"Nothing was changed in instance {config.name!r}: its guest RAM and device state stay "
                 f"preserved; resume can be run again")
    t0 = time.perf_counter()
    try:
        proc, monitor = launch(command_line(config, ram, run, incoming=True), [ram, holder], run, timeout)
    except VmError as exc:
        raise VmError(f"{exc}\n{untouched}") from None
    try:
        started = time.perf_counter() - t0
        _check_same_machine(monitor, record)
        set_up_migration(monitor, record.get("migration", {}).get("mode", "normal"))
        monitor.execute("getfd", {"fdname": STREAM_FD_NAME}, fds=[stream])
        monitor.execute("migrate-incoming", {"uri": f"fd:{STREAM_FD_NAME}"})
        wait_migration(monitor, timeout)
        wait_runstate(monitor, "inmigrate", timeout)
        loaded = time.perf_counter() - t0
        monitor.execute("cont")
        running_at = time.perf_counter()
        return ResumeTimes(started, loaded, running_at - t0, running_at)
    except (VmError, QmpError, MonitorClosed, TimeoutError) as exc:
        try:
            proc.wait(5)  # a failed incoming migration ends QEMU, which says why on its way out
        except subprocess.TimeoutExpired:
            kill(proc.pid)
            proc.wait()
        raise VmError(f"QEMU could not resume {config.name!r}: {exc}\n{run.log_tail()}\n{untouched}") from None
    finally:
        monitor.close()


def _check_same_machine(monitor: Monitor, record: dict[str, Any]) -> None:
    saved = record.get("machine_type")
    mine = machine_type(monitor)
    if saved and mine != saved:
        raise VmError(f"this QEMU makes a {mine} machine of the options; the guest was saved on {saved}: "
                      f"name the versioned machine type in the options (-machine {saved})")
    mode = record.get("migration", {}).get("mode", "normal")
    if mode != "normal" and migration_of(monitor).mode != mode:
        raise VmError(f"the device state was saved in QEMU's {mode} mode, which this QEMU lacks")


# ---------------------------------------------------------------------------- stop and list

def stop(kx: Kexecfs, name: str, run: RunDir, timeout: float = 30) -> list[str]:
    """End the VM for good: power its QEMU off, drop its RAM and device state, remove its
    instance. Returns what was done, one line each."""
    done = []
    pid = run.pid()
    if pid is not None:
        try:
            with Monitor.connect(run.monitor, timeout) as monitor:
                monitor.execute("quit")
        except (OSError, QmpError, MonitorClosed, TimeoutError):
            kill(pid)
        if not wait_exit(pid, timeout):
            kill(pid)
        done.append(f"QEMU {pid} quit")
    if (kx.path / name).is_dir():
        inst = kx.instance(name)
        with doing(f"drop the files of instance {name!r}"):
            for p in inst.preserved():
                inst.unpreserve(p.token)
                done.append(f"token {p.token} ({p.kind}, {p.size} bytes) dropped")
        if inst.state() == "updated":  # an instance is removed only once its update is over
            with doing(f"finish instance {name!r}"):
                inst.finish()
        try:
            kx.delete_instance(name)
            done.append(f"instance {name!r} removed")
        except OSError as exc:
            done.append(f"instance {name!r} kept ({exc.strerror}: root removes it)")
    return done


@dataclass(frozen=True)
class VmStatus:
    name: str
    status: str  # running | suspended | resumable | not saved
    memory: int
    pid: int | None


def vms(kx: Kexecfs, run_base: Path) -> list[VmStatus]:
    """Every instance that holds a VM, and what it is doing."""
    out = []
    for name in kx.instances():
        inst = kx.instance(name)
        tokens = {p.token: p for p in inst.preserved()}
        if not {DEVICE_STATE_TOKEN, RAM_TOKEN} <= tokens.keys():
            continue
        pid = RunDir(run_base / name).pid()
        if pid is not None:
            status = "running"
        elif inst.state() == "updated":
            status = "resumable" if tokens[DEVICE_STATE_TOKEN].size else "not saved"
        else:
            status = "suspended" if tokens[DEVICE_STATE_TOKEN].size else "not saved"
        out.append(VmStatus(name, status, tokens[RAM_TOKEN].size, pid))
    return out
