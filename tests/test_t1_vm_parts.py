"""Tier 1: the parts of ``kexecfs vm`` without QEMU: the device-state record, QMP spoken
to a scripted monitor, the choice of migration mode, QEMU's command line."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kexecfs.vm import devstate
from kexecfs.vm.qemu import (GuestConfig, RunDir, VmError, check_options, command_line, migration_of, parse_size,
                             set_up_migration)
from kexecfs.vm.qmp import Monitor, MonitorClosed, QmpError

CONFIG = {"guest": {"name": "web", "memory": 1 << 30, "qemu": "qemu-system-x86_64", "options": []}}


def saved_state(stream: bytes = b"QEVM" + os.urandom(5000)) -> int:
    """A memfd holding a committed device state, as update leaves it."""
    fd = os.memfd_create("device-state")
    pending = devstate.begin(fd, CONFIG)
    os.write(fd, stream)  # QEMU writes at the offset begin() left
    devstate.commit(fd, pending)
    return fd


# ---------------------------------------------------------------------------- the device state

def flip_byte(fd: int, offset: int) -> None:
    """Change one byte, whatever it held: overwriting a random byte with a fixed value
    leaves it unchanged one time in 256."""
    os.pwrite(fd, bytes([os.pread(fd, 1, offset)[0] ^ 0xFF]), offset)


def test_device_state_round_trip() -> None:
    stream = b"QEVM" + os.urandom(300_000)
    fd = saved_state(stream)
    loaded = devstate.load(fd)
    assert loaded.config == CONFIG and loaded.stream == stream


def test_a_save_that_never_committed_reads_as_never_saved() -> None:
    fd = os.memfd_create("device-state")
    with pytest.raises(devstate.NeverSaved):
        devstate.load(fd)
    devstate.begin(fd, CONFIG)
    os.write(fd, b"QEVM half a stream")  # QEMU was writing when the freeze came
    with pytest.raises(devstate.NeverSaved):
        devstate.load(fd)


def test_a_new_save_first_takes_the_old_commit_away() -> None:
    fd = saved_state()
    devstate.begin(fd, CONFIG)
    with pytest.raises(devstate.NeverSaved):
        devstate.load(fd)


@pytest.mark.parametrize("where,damage", [
    ("magic", lambda fd, size: os.pwrite(fd, b"X", 0)),
    ("config", lambda fd, size: os.pwrite(fd, b"[", devstate.HEADER_SIZE)),
    ("stream", lambda fd, size: flip_byte(fd, size - 1)),
    ("truncated", lambda fd, size: os.ftruncate(fd, size - 1)),
    ("grown", lambda fd, size: os.pwrite(fd, b"x", size)),
    ("newer format", lambda fd, size: os.pwrite(fd, (devstate.MAJOR + 1).to_bytes(2, "little"), 8)),
])
def test_damage_anywhere_is_refused(where: str, damage: Callable[[int, int], object]) -> None:
    fd = saved_state()
    damage(fd, os.fstat(fd).st_size)
    with pytest.raises(devstate.Damaged):
        devstate.load(fd)


def test_commit_refuses_an_empty_stream() -> None:
    fd = os.memfd_create("device-state")
    pending = devstate.begin(fd, CONFIG)
    with pytest.raises(devstate.DeviceStateError):
        devstate.commit(fd, pending)


# ---------------------------------------------------------------------------- QMP

class ScriptedQemu:
    """The QEMU end of a monitor: answers each command from ``replies`` (a value, "Error:"
    and a description, or a function of the arguments giving either), sends ``events`` before a command's reply, and
    keeps every command and the descriptors that came with it."""

    def __init__(self, replies: dict[str, Any], events: dict[str, list[dict[str, Any]]] | None = None) -> None:
        self.replies, self.events = replies, events or {}
        self.received: list[tuple[dict[str, Any], list[int]]] = []
        self.client, self._qemu = socket.socketpair()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _send(self, message: dict[str, Any]) -> None:
        self._qemu.sendall(json.dumps(message).encode() + b"\n")

    def _serve(self) -> None:
        self._send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}}, "capabilities": []}})
        buffer = b""
        while True:
            data, fds, _, _ = socket.recv_fds(self._qemu, 65536, 4)
            if not data:
                return
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if not self._answer(json.loads(line), fds):
                    return
                fds = []

    def _answer(self, command: dict[str, Any], fds: list[int]) -> bool:
        """Answer one command; False once this QEMU has gone away."""
        self.received.append((command, fds))
        name = command["execute"]
        for event in self.events.get(name, []):
            self._send({"event": event["event"], "data": event.get("data", {})})
        reply = self.replies.get(name, {})
        if callable(reply):
            reply = reply(command.get("arguments", {}))
        if name == "close":
            self._qemu.close()
            return False
        if isinstance(reply, str) and reply.startswith("Error:"):
            self._send({"id": command["id"], "error": {"class": "GenericError", "desc": reply[6:]}})
        else:
            self._send({"id": command["id"], "return": reply})
        return True

    def monitor(self) -> Monitor:
        m = Monitor(self.client, timeout=5)
        m.greeting = m._read(time.monotonic() + 5)["QMP"]
        m.execute("qmp_capabilities")
        return m

    def commands(self) -> list[str]:
        return [c["execute"] for c, _ in self.received]


@pytest.fixture
def close_later() -> Iterator[list[int]]:
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def test_events_between_replies_are_kept_for_wait_event() -> None:
    qemu = ScriptedQemu({"migrate": {}}, {"migrate": [{"event": "MIGRATION", "data": {"status": "setup"}},
                                                       {"event": "MIGRATION", "data": {"status": "completed"}}]})
    m = qemu.monitor()
    assert m.execute("migrate", {"uri": "fd:x"}) == {}
    event = m.wait_event("MIGRATION", 1, lambda d: d["status"] == "completed")
    assert event["data"] == {"status": "completed"}, "the event came before the reply and was kept"


def test_a_refused_command_is_a_qmp_error() -> None:
    m = ScriptedQemu({"migrate": "Error:Migration is disabled"}).monitor()
    with pytest.raises(QmpError, match="Migration is disabled"):
        m.execute("migrate", {"uri": "fd:x"})


def test_a_descriptor_travels_with_its_command(close_later: list[int]) -> None:
    qemu = ScriptedQemu({})
    m = qemu.monitor()
    fd = os.memfd_create("device-state")
    m.execute("getfd", {"fdname": "state"}, fds=[fd])
    command, fds = qemu.received[-1]
    close_later.extend(fds)
    assert command["arguments"] == {"fdname": "state"} and len(fds) == 1
    assert os.fstat(fds[0]).st_ino == os.fstat(fd).st_ino


def test_qemu_going_away_is_monitor_closed() -> None:
    m = ScriptedQemu({}).monitor()
    with pytest.raises(MonitorClosed):
        m.execute("close")


# ---------------------------------------------------------------------------- migration mode

def qemu_with(capabilities: list[str], enums: list[list[str]]) -> ScriptedQemu:
    schema = [{"name": "1", "meta-type": "object"}] + [
        {"name": str(i + 2), "meta-type": "enum", "members": [{"name": v} for v in values]}
        for i, values in enumerate(enums)]
    return ScriptedQemu({"query-migrate-capabilities": [{"capability": c, "state": False} for c in capabilities],
                         "query-version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                         "query-qmp-schema": schema})


def test_qemu_7_2_migrates_in_normal_mode_with_x_ignore_shared() -> None:
    qemu = qemu_with(["events", "x-ignore-shared"], [["normal"], ["none", "zlib"]])
    m = qemu.monitor()
    migration = migration_of(m)
    assert migration.mode == "normal" and migration.version == "7.2.0"
    assert set_up_migration(m, migration.mode) == "normal"
    sent = [c["arguments"] for c, _ in qemu.received if c["execute"].startswith("migrate-set-")]
    assert {"capability": "x-ignore-shared", "state": True} in sent[0]["capabilities"]
    assert not any("mode" in args for args in sent), "QEMU 7.2 has no mode parameter: setting one would fail"


def test_a_qemu_with_cpr_reboot_uses_it() -> None:
    qemu = qemu_with(["events", "x-ignore-shared"], [["normal", "cpr-reboot", "cpr-transfer"]])
    m = qemu.monitor()
    migration = migration_of(m)
    assert migration.mode == "cpr-reboot"
    assert set_up_migration(m, migration.mode) == "cpr-reboot"
    assert qemu.received[-1][0]["arguments"] == {"mode": "cpr-reboot"}


def test_a_mode_qemu_refuses_falls_back_to_normal_for_a_save() -> None:
    qemu = qemu_with(["events", "x-ignore-shared"], [["normal", "cpr-reboot"]])
    qemu.replies["migrate-set-parameters"] = lambda args: "Error:no such mode" if "mode" in args else {}
    m = qemu.monitor()
    assert set_up_migration(m, "cpr-reboot", fall_back=True) == "normal"
    with pytest.raises(QmpError):
        set_up_migration(m, "cpr-reboot")  # a load must use the mode it was saved in


def test_a_qemu_without_x_ignore_shared_is_refused() -> None:
    with pytest.raises(VmError, match="x-ignore-shared"):
        migration_of(qemu_with(["events"], []).monitor())


# ---------------------------------------------------------------------------- the command line

def test_sizes_read_as_qemus_m() -> None:
    assert parse_size("512") == 512 << 20 and parse_size("4G") == 4 << 30 and parse_size("256M") == 256 << 20
    with pytest.raises(VmError):
        parse_size("lots")


@pytest.mark.parametrize("options,memory", [(["-m", "2G"], 1 << 30), (["-incoming", "defer"], 1 << 30),
                                            (["--daemonize"], 1 << 30), ([], (1 << 30) + 4096)])
def test_options_that_would_contradict_kexecfs_vm_are_refused(options: list[str], memory: int) -> None:
    with pytest.raises(VmError):
        check_options(options, memory)


def test_guest_ram_is_the_memfd_mapped_shared_and_never_discarded(tmp_path: Path) -> None:
    config = GuestConfig("web", 1 << 30, "qemu-system-x86_64", ["-display", "none"])
    argv = command_line(config, 7, RunDir(tmp_path), incoming=True)
    backend = argv[argv.index("-object") + 1].split(",")
    assert {"mem-path=/proc/self/fd/7", "share=on", "discard-data=off", f"size={1 << 30}"} <= set(backend)
    assert "memory-backend=kexecfs-ram" in argv[argv.index("-machine") + 1]
    assert argv[-3:] == ["-incoming", "defer", "-S"]
    assert argv.index("-display") < argv.index("-incoming"), "the user's options come before the incoming ones"


# ---------------------------------------------------------------------------- the command

@pytest.mark.parametrize("words,memory,options", [
    (["web", "--memory", "1G", "--", "-display", "none", "-m", "x"], "1G", ["-display", "none", "-m", "x"]),
    (["--memory", "1G", "web", "--", "-display", "none"], "1G", ["-display", "none"]),
    (["web", "-m", "2G", "--", "-a", "--", "b"], "2G", ["-a", "--", "b"]),
])
def test_start_takes_its_options_before_the_double_dash_and_qemus_after(words: list[str], memory: str,
                                                                           options: list[str]) -> None:
    from kexecfs.cli import _parser
    from kexecfs.vm.cli import _start_words

    args = _parser().parse_args(["vm", "start", *words])
    assert _start_words(args) == options and args.memory == memory and args.name == "web"


@pytest.mark.parametrize("words,complaint", [
    (["web", "--", "-display", "none"], "--memory"),
    (["web", "--memory", "1G", "-display", "none"], "after --"),
    (["web", "--memory", "1G", "--bogus", "--", "-a"], "unknown start options --bogus"),
])
def test_start_says_what_is_wrong_with_its_words(words: list[str], complaint: str) -> None:
    from kexecfs.cli import _parser
    from kexecfs.vm.cli import _start_words

    with pytest.raises(VmError, match=complaint):
        _start_words(_parser().parse_args(["vm", "start", *words]))
