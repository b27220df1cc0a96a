"""Tier 1: the journal and the machine a restarted daemon resumes, without a mount.

A crash is simulated in-process: at a fault point, the image directory and the store's
descriptors are copied as a dead daemon would leave them, and a machine is resumed from
the copy. It must be the machine from before or from after the interrupted operation,
never a mix; and every registration must come back paired with its descriptor.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kexecfs.core import faults, journal as journal_mod
from kexecfs.core.instance import Caller
from kexecfs.core.journal import JOURNAL_NAME, Journal, JournalDamaged, load
from kexecfs.core.machine import LiveUpdate, Policy, kernel_boot_id
from kexecfs.core.resume import resume

ROOT = Caller(pid=os.getpid(), uid=0, gid=0)
KERNEL = kernel_boot_id()


class Store:
    """A descriptor store in the test process (a keeper without the process)."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}

    def keep(self, name: str, fd: int, watch: bool = False) -> None:
        self.release(name)
        self.held[name] = os.dup(fd)

    def release(self, name: str) -> None:
        if name in self.held:
            os.close(self.held.pop(name))

    def copy(self) -> dict[str, int]:
        """What a restarted daemon gets back: its own descriptors of everything held."""
        return {name: os.dup(fd) for name, fd in self.held.items()}


@pytest.fixture(autouse=True)
def no_leaked_descriptors(tmp_path: Path) -> Iterator[None]:
    """The machines of these tests hold memfds and files; the whole suite runs in one
    process (and some tests use select(), which fails past descriptor 1023)."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    for name in set(os.listdir("/proc/self/fd")) - before:
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("/memfd:") or target.startswith(str(tmp_path)):
            os.close(int(name))


def memfd(data: bytes) -> int:
    fd = os.memfd_create("t", os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


def journaled(image_dir: Path, store: Store) -> LiveUpdate:
    m = LiveUpdate.boot(image_dir, boot_id="boot-1")
    m.record = Journal(image_dir, store, KERNEL)
    m.record.rewrite(m)
    return m


def run(m: LiveUpdate, event: str) -> None:
    m.begin(event, ROOT)()


def picture(m: LiveUpdate) -> dict[str, Any]:
    """Everything a restart must keep: state, instances, and each file's record, inode and
    contents (through its descriptor)."""
    files = {}
    for inst in m.instances.values():
        for token, pf in sorted(inst.files.items()):
            data = os.pread(pf.fd, 1 << 20, 0) if pf.fd >= 0 else None
            files[inst.name, token] = (pf.kind.name, pf.ino, pf.recovered, pf.opened,
                                       hashlib.sha256(data).hexdigest() if data is not None else None)
    return {"state": m.state.word, "boot_id": m.boot_id, "kexec_count": m.kexec_count,
            "instances": {i.name: (i.ino, i.uid, i.gid, i.mode, i.max_files, i.finished, i.incoming)
                          for i in m.instances.values()}, "files": files}


def resumed(image_dir: Path, held: dict[str, int]) -> dict[str, Any]:
    """The picture of the machine a restarted daemon resumes from ``image_dir`` (a copy of
    it: the live machine of the test goes on writing in its own) and ``held``, whose
    descriptors it takes; they are closed after (hundreds of resumes run in one process)."""
    copy = image_dir.with_name(f"{image_dir.name}-restart-{next(_copies)}")
    shutil.copytree(image_dir, copy)
    state = load(copy / JOURNAL_NAME, KERNEL)
    assert state is not None, "no journal"
    try:
        r = resume(copy, state, held, Policy())
        assert not r.lost, r.lost
        got = picture(r.machine)
        for inst in r.machine.instances.values():
            inst.drop_files()
        return got
    finally:
        for fd in held.values():
            os.close(fd)


_copies = itertools.count()


def populated(tmp_path: Path) -> tuple[LiveUpdate, Store, list[int]]:
    store = Store()
    m = journaled(tmp_path / "images", store)
    fds = []
    for name, files in (("vm", 3), ("db", 2)):
        inst = m.create_instance(name, ROOT)
        for token in range(files):
            fd = memfd(f"{name}-{token}".encode() * 1000)
            fds.append(fd)
            m.preserve(inst, ROOT, fd, token + 1)
    m.set_limit(m.instances["db"], ROOT, "files", 9)
    return m, store, fds


def test_a_restart_in_every_state_gives_the_same_machine(tmp_path: Path) -> None:
    m, store, _fds = populated(tmp_path)
    image_dir = tmp_path / "images"
    for step in ("normal", "prepare", "freeze", "kexec", "restore", "finish-db"):
        if step == "kexec":
            run(m, "kexec")
            m = m.reboot()
        elif step == "restore":
            m.restore(m.instances["vm"], ROOT, 2)
        elif step == "finish-db":
            m.finish_instance(m.instances["db"], ROOT)
        elif step != "normal":
            run(m, step)
        assert resumed(image_dir, store.copy()) == picture(m), f"after {step}"


@pytest.mark.parametrize("operation", ["mkdir", "preserve", "unpreserve", "rmdir", "limit", "restore", "finish"])
def test_a_torn_last_frame_is_the_operation_not_done(tmp_path: Path, operation: str) -> None:
    """Cut the journal at every byte of the operation's frame: before it, or (whole) after."""
    m, store, fds = populated(tmp_path)
    image_dir = tmp_path / "images"
    if operation in ("restore", "finish"):
        run(m, "prepare")
        run(m, "freeze")
        run(m, "kexec")
        m = m.reboot()
    do: dict[str, Callable[[], object]] = {
        "mkdir": lambda: m.create_instance("new", ROOT),
        "preserve": lambda: m.preserve(m.instances["vm"], ROOT, memfd(b"late"), 9),
        "unpreserve": lambda: m.unpreserve(m.instances["vm"], ROOT, 1),
        "rmdir": lambda: m.remove_instance("empty", ROOT),
        "limit": lambda: m.set_limit(m.instances["vm"], ROOT, "bytes", 12345),
        "restore": lambda: m.restore(m.instances["vm"], ROOT, 1),
        "finish": lambda: m.finish_instance(m.instances["vm"], ROOT),
    }
    if operation == "rmdir":
        m.create_instance("empty", ROOT)
    before, held_before = picture(m), store.copy()  # a torn frame's crash: these may be needed
    size = (image_dir / JOURNAL_NAME).stat().st_size
    do[operation]()
    after, data = picture(m), (image_dir / JOURNAL_NAME).read_bytes()
    assert len(data) > size, "the operation wrote no frame"
    for cut in range(size, len(data) + 1, max(1, (len(data) - size) // 40)):
        (image_dir / JOURNAL_NAME).write_bytes(data[:cut])
        # Descriptors stored for the frame are there whether or not it was written.
        held = {name: os.dup(fd) for name, fd in {**held_before, **store.held}.items()}
        got = resumed(image_dir, held)
        assert got == (after if cut == len(data) else before), f"cut at {cut} of {size}..{len(data)}"
    (image_dir / JOURNAL_NAME).write_bytes(data)
    assert resumed(image_dir, store.copy()) == after
    for fd in held_before.values():
        os.close(fd)


def test_a_damaged_frame_before_the_last_is_refused(tmp_path: Path) -> None:
    m, store, _ = populated(tmp_path)
    path = tmp_path / "images" / JOURNAL_NAME
    data = bytearray(path.read_bytes())
    data[len(journal_mod.PREAMBLE) + journal_mod.FRAME.size + 3] ^= 0xFF  # inside the first frame
    path.write_bytes(bytes(data))
    with pytest.raises(JournalDamaged):
        load(path, KERNEL)


def test_another_boots_journal_is_read_up_to_its_snapshot_only(tmp_path: Path) -> None:
    """Frames after the snapshot are not fsync'd: a power loss may leave them zeroed. Read
    by another boot (which only reports what it was), they are not read at all, so they
    can neither fail the load nor count."""
    m, store, _ = populated(tmp_path)
    path = tmp_path / "images" / JOURNAL_NAME
    m.preserve(m.instances["vm"], ROOT, memfd(b"after the snapshot"), 7)
    snapshot = load(path, KERNEL)
    assert snapshot is not None and ("vm", 7) in snapshot.files
    first = len(journal_mod.PREAMBLE) + journal_mod.FRAME.size + journal_mod.FRAME.unpack_from(
        path.read_bytes(), len(journal_mod.PREAMBLE))[0]
    data = bytearray(path.read_bytes())
    assert len(data) > first, "the preserve wrote no frame after the snapshot"
    payload = first + journal_mod.FRAME.size
    data[payload:payload + 4] = bytes(4)  # what a power loss may leave: zeroes, then the rest
    path.write_bytes(bytes(data))
    with pytest.raises(JournalDamaged):
        load(path, KERNEL)  # in this boot such a frame is damage, and is refused
    other = load(path, "another boot")
    assert other is not None and ("vm", 7) not in other.files and other.machine["kernel_boot_id"] == KERNEL


def test_one_open_file_preserved_twice_is_stored_once(tmp_path: Path) -> None:
    """systemd's store keeps an open file once, whatever names it is sent under."""
    store = Store()
    m = journaled(tmp_path / "images", store)
    inst = m.create_instance("svc", ROOT)
    fd = memfd(b"twice")
    m.preserve(inst, ROOT, fd, 1)
    m.preserve(inst, ROOT, fd, 2)
    assert len(store.held) == 1
    again = resumed(tmp_path / "images", store.copy())
    assert sorted(token for _, token in again["files"]) == [1, 2]
    m.unpreserve(inst, ROOT, 1)
    assert len(store.held) == 1, "the other registration still needs it"
    m.unpreserve(inst, ROOT, 2)
    assert not store.held


def test_a_journal_that_cannot_be_written_fails_the_preserve_and_changes_nothing(tmp_path: Path,
                                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    m, store, _ = populated(tmp_path)
    before, names = picture(m), set(store.held)

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(journal_mod, "_write_all", full)
    with pytest.raises(Exception) as info:
        m.preserve(m.instances["vm"], ROOT, memfd(b"no room"), 7)
    assert getattr(info.value, "errno", None) == errno.ENOSPC
    assert picture(m) == before and set(store.held) == names, "the failed preserve left something behind"


# Where a crash can hit a slow event, and what the restart must give ("before"/"after").
CRASH_POINTS = [
    ("prepare", "prepare.file@2", "before"),
    ("prepare", "image.copy_window@1", "before"),
    ("freeze", "freeze.file@3", "before"),
    ("freeze", "commit.before_rename", "before"),
    ("freeze", "commit.after_rename", "after"),
    ("kexec", "freeze.file@1", "before"),
    ("kexec", "commit.after_rename", "after"),
    ("kexec", "recover.file@2", "after"),
    ("finish", "retire.before_rename", "before"),
    ("cancel", "retire.before_rename", "before"),
]


class Crashed(BaseException):
    """The simulated death of the daemon: nothing after the point runs."""


@pytest.mark.parametrize("event,point,outcome", CRASH_POINTS, ids=[f"{e}-{p}" for e, p, _ in CRASH_POINTS])
def test_a_crash_in_an_event_resumes_before_or_after_it(tmp_path: Path, event: str, point: str, outcome: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    m, store, _ = populated(tmp_path)
    image_dir, dead = tmp_path / "images", tmp_path / "dead"
    if event in ("freeze", "kexec", "cancel", "finish"):
        run(m, "prepare")
    if event in ("cancel", "finish"):
        run(m, "freeze")
    if event == "finish":
        run(m, "kexec")
        m = m.reboot()
    before = picture(m)
    name, _, nth = point.partition("@")
    left = [int(nth or 1)]
    saved: dict[str, int] = {}

    def crash_at(where: str) -> None:
        if where == name:
            left[0] -= 1
            if not left[0]:  # the directory and the store as the dead daemon leaves them
                shutil.copytree(image_dir, dead)
                saved.update(store.copy())
                raise Crashed(where)
    monkeypatch.setattr(faults, "_ARMED", {})
    for module in ("machine", "image"):
        monkeypatch.setattr(f"kexecfs.core.{module}.inject", crash_at)
    with pytest.raises(Crashed):
        run(m, event)
        if event == "kexec":
            m = m.reboot()
    monkeypatch.undo()
    again = resumed(dead, saved)
    if outcome == "before":
        assert again == before
    else:
        assert again["state"] == {"freeze": "frozen", "kexec": "updated"}[event]
        # The same contents under the same inode numbers (the kernel keeps fds/<token> by them).
        assert {k: (v[1], v[4]) for k, v in again["files"].items()} == \
            {k: (v[1], v[4]) for k, v in before["files"].items()}


def _chmod(m: LiveUpdate) -> None:
    inst = m.instances["vm"]
    inst.mode = 0o750
    m.instance_changed(inst)


# Each operation of normal that changes what is registered, with one frame of its own.
REGISTRATIONS: dict[str, Callable[[LiveUpdate], object]] = {
    "mkdir": lambda m: m.create_instance("new", ROOT),
    "rmdir": lambda m: m.remove_instance("empty", ROOT),
    "chmod": _chmod,
    "limit": lambda m: m.set_limit(m.instances["db"], ROOT, "bytes", 1 << 20),
    "preserve": lambda m: m.preserve(m.instances["vm"], ROOT, memfd(b"one more"), 9),
    "unpreserve": lambda m: m.unpreserve(m.instances["vm"], ROOT, 2),
}


@pytest.mark.parametrize("point,outcome", [("journal.append", "before"), ("journal.durable", "after")])
@pytest.mark.parametrize("op", sorted(REGISTRATIONS))
def test_a_crash_in_a_registration_resumes_before_or_after_it(tmp_path: Path, op: str, point: str, outcome: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon dies just before the operation's frame is written, or just after: the
    restarted daemon has the machine from before the operation, or from after it, whole
    (the same as a twin machine that did the operation and lived)."""
    pictures = {}
    for side in ("twin", "crashed"):
        m, store, _ = populated(tmp_path / side)
        m.create_instance("empty", ROOT)
        if side == "twin":
            pictures["before"] = picture(m)
            REGISTRATIONS[op](m)
            pictures["after"] = picture(m)
            continue
        image_dir, dead = tmp_path / side / "images", tmp_path / side / "dead"
        saved: dict[str, int] = {}

        def crash_at(where: str) -> None:
            if where == point:  # the directory and the store as the dead daemon leaves them
                shutil.copytree(image_dir, dead)
                saved.update(store.copy())
                raise Crashed(where)
        monkeypatch.setattr("kexecfs.core.journal.inject", crash_at)
        with pytest.raises(Crashed):
            REGISTRATIONS[op](m)
        monkeypatch.undo()
        assert resumed(dead, saved) == pictures[outcome]


def test_a_file_preserved_after_a_restart_gets_a_descriptor_of_its_own(tmp_path: Path) -> None:
    """The restarted daemon's first new file must not take the store name of an old one
    (preserve frames do not repeat the machine record that says which name is next)."""
    m, store, _ = populated(tmp_path)
    image_dir = tmp_path / "images"
    state = load(image_dir / JOURNAL_NAME, KERNEL)
    assert state is not None
    r = resume(image_dir, state, store.copy(), Policy())
    again, j = r.machine, Journal(image_dir, store, KERNEL)
    j.adopt(again, r.names, r.next_name, r.requests)
    again.record = j
    j.rewrite(again)
    again.preserve(again.instances["vm"], ROOT, memfd(b"new after the restart"), 9)
    assert resumed(image_dir, store.copy()) == picture(again)
    assert picture(again)["files"]["vm", 1] == picture(m)["files"]["vm", 1], "an old file's descriptor was replaced"


def test_churn_without_events_keeps_the_journal_small(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Preserve and unpreserve for ever in normal: a snapshot now and then replaces the frames."""
    monkeypatch.setattr(journal_mod, "COMPACT_SLACK", 64 << 10)
    store = Store()
    m = journaled(tmp_path / "images", store)
    inst = m.create_instance("svc", ROOT)
    sizes = []
    for _ in range(2000):
        fd = memfd(b"x" * 100)
        m.preserve(inst, ROOT, fd, 1)
        m.unpreserve(inst, ROOT, 1)
        os.close(fd)
        sizes.append((tmp_path / "images" / JOURNAL_NAME).stat().st_size)
    assert max(sizes) < 2 * journal_mod.COMPACT_SLACK, f"the journal grew to {max(sizes)} bytes"
    assert resumed(tmp_path / "images", store.copy())["instances"].keys() == {"svc"}


def close_resumed(m: LiveUpdate, held: dict[str, int]) -> None:
    """Close what a resume in the test took (its files) and what it left in ``held``."""
    for inst in m.instances.values():
        inst.drop_files()
    for fd in held.values():
        try:
            os.close(fd)
        except OSError:
            pass


def test_a_resumed_machine_gives_no_inode_number_twice(tmp_path: Path) -> None:
    """Instances and files made after the last snapshot are in no machine record: the
    resumed machine's next inode numbers must still be past theirs (a new instance with
    an old one's number would take its registrations' names in the journal too)."""
    m, store, _fds = populated(tmp_path)  # mkdir and preserves only: frames without a machine record
    image_dir = tmp_path / "images"
    state = load(image_dir / JOURNAL_NAME, KERNEL)
    assert state is not None
    held = store.copy()
    r = resume(image_dir, state, held, Policy())
    try:
        old_instances = {i.ino for i in r.machine.instances.values()}
        old_files = {pf.ino for i in r.machine.instances.values() for pf in i.files.values()}
        new = r.machine.create_instance("new", ROOT)
        fd = memfd(b"new")
        pf = r.machine.preserve(new, ROOT, fd, 0)
        assert new.ino not in old_instances and new.ino > max(old_instances)
        assert pf.ino not in old_files and pf.ino > max(old_files)
    finally:
        close_resumed(r.machine, held)


def test_a_file_whose_descriptor_the_store_lost_is_dropped_and_reported(tmp_path: Path) -> None:
    """Both keepers killed, say: the journal names a descriptor the store no longer holds.
    That file is reported lost and dropped; every other file resumes."""
    m, store, _fds = populated(tmp_path)
    image_dir = tmp_path / "images"
    state = load(image_dir / JOURNAL_NAME, KERNEL)
    assert state is not None
    held = store.copy()
    gone = state.files["vm", 2]["fd"]
    os.close(held.pop(gone))
    r = resume(image_dir, state, held, Policy())
    try:
        assert r.lost == ["vm/2"]
        assert sorted(r.machine.instances["vm"].files) == [1, 3] and sorted(r.machine.instances["db"].files) == [1, 2]
    finally:
        close_resumed(r.machine, held)
