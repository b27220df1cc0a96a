"""Tier 1: the state machine, instances and the image, driven without a mount."""

from __future__ import annotations

import errno
import fcntl
import gc
import hashlib
import os
from pathlib import Path

import pytest

from harness import digest, refused
from kexecfs.core import machine as machine_module
from kexecfs.core import syscalls
from kexecfs.core.errors import KexecfsError
from kexecfs.core.image import IMAGE_NAME
from kexecfs.core.instance import Caller, Instance
from kexecfs.core.machine import LiveUpdate, Policy, State

ROOT = Caller(pid=os.getpid(), uid=0, gid=0)
ALICE = Caller(pid=os.getpid(), uid=1000, gid=1000)
BOB = Caller(pid=os.getpid(), uid=1001, gid=1001)


def run(machine: LiveUpdate, event: str, caller: Caller = ROOT) -> None:
    machine.begin(event, caller)()


def refusal(fn, *args) -> KexecfsError:
    """The KexecfsError ``fn(*args)`` must raise: its errno for the caller, its message for the log."""
    return refused(fn, *args, error=KexecfsError)


def errno_of(fn, *args) -> int:
    return refusal(fn, *args).errno


def memfd(data: bytes, name: str = "t") -> int:
    fd = os.memfd_create(name, os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    return fd


def preserve_regular_file(machine: LiveUpdate, inst: Instance, tmp_path: Path, token: int) -> Path:
    """Preserve a small regular file (that a test may then delete) under ``token``."""
    path = tmp_path / f"file-{token}"
    path.write_bytes(b"x")
    machine.preserve(inst, ROOT, os.open(path, os.O_RDONLY), token)
    return path


@pytest.fixture
def machine(tmp_path: Path) -> LiveUpdate:
    return LiveUpdate.boot(tmp_path / "images", boot_id="boot-1")


@pytest.mark.parametrize("event,states,code", [
    ("prepare", [State.PREPARED, State.FROZEN, State.UPDATED], errno.EINVAL),
    ("freeze", [State.NORMAL, State.FROZEN, State.UPDATED], errno.EINVAL),
    ("cancel", [State.NORMAL, State.UPDATED], errno.ENOENT),
    ("finish", [State.NORMAL, State.PREPARED, State.FROZEN], errno.EINVAL),
])
def test_wrong_state_errnos(machine: LiveUpdate, event: str, states: list[State], code: int) -> None:
    for state in states:
        machine.state = state
        assert errno_of(machine.begin, event, ROOT) == code, (event, state)
        assert machine.busy is None


def test_events_need_root(machine: LiveUpdate) -> None:
    assert errno_of(machine.begin, "prepare", ALICE) == errno.EPERM
    machine.policy = Policy(admin_gid=ALICE.gid)
    run(machine, "prepare", ALICE)
    assert machine.state is State.PREPARED


def test_no_cyclic_collection_while_files_are_prepared_frozen_or_recovered(
        machine: LiveUpdate, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full collection scans every object of the daemon, millions with 100,000 files, and
    their allocations set one off again and again: 16-28 % of these events at the bench's
    scale point, the blackout included. The collector is back once they are done."""
    seen: list[tuple[str, bool]] = []
    real = machine_module.inject
    monkeypatch.setattr(machine_module, "inject", lambda point: (seen.append((point, gc.isenabled())), real(point)))
    monkeypatch.setattr(machine.record, "rewrite", lambda m, answered=None: seen.append(("rewrite", gc.isenabled())))
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"contents"), 1)
    for event in ("prepare", "freeze", "kexec"):
        run(machine, event)
    booted = LiveUpdate.boot(machine.image_dir, boot_id="boot-2")  # a daemon's start after a real kexec
    for i in booted.instances.values():
        i.drop_files()
    assert seen.pop() == ("recover.file", False)
    nxt = machine.reboot()  # the next boot of a simulated kexec
    try:
        assert gc.isenabled()
        assert dict(seen) == {"prepare.file": False, "freeze.file": False, "recover.file": False, "rewrite": False}
    finally:
        for i in nxt.instances.values():
            i.drop_files()


def test_unknown_event(machine: LiveUpdate) -> None:
    assert errno_of(machine.begin, "reboot", ROOT) == errno.EINVAL


def test_instance_names(machine: LiveUpdate) -> None:
    for bad in ["", ".hidden", "a/b", "x" * 64, "state", "control", "status", "sp ace"]:
        assert errno_of(machine.create_instance, bad, ROOT) == errno.EINVAL, bad
    machine.create_instance("vm-1.a_b", ROOT)
    assert errno_of(machine.create_instance, "vm-1.a_b", ROOT) == errno.EEXIST


def test_preserve_tokens_and_listing(machine: LiveUpdate) -> None:
    inst = machine.create_instance("svc", ALICE)
    assert machine.preserve(inst, ALICE, memfd(b"abc"), None).token == 0
    assert machine.preserve(inst, ALICE, memfd(b"de"), 42).token == 42
    assert machine.preserve(inst, ALICE, memfd(b""), None).token == 1
    assert errno_of(machine.preserve, inst, ALICE, memfd(b""), 42) == errno.EEXIST
    assert inst.listing() == "0 memfd 3 rw\n1 memfd 0 rw\n42 memfd 2 rw\n"
    assert errno_of(machine.preserve, inst, BOB, memfd(b""), 7) == errno.EACCES
    machine.unpreserve(inst, ALICE, 42)
    assert errno_of(machine.unpreserve, inst, ALICE, 42) == errno.ENOENT
    assert errno_of(machine.remove_instance, "svc", ALICE) == errno.EBUSY


def test_unsupported_kinds_are_enoent(machine: LiveUpdate) -> None:
    """Refused with ENOENT (as LUO), the log message naming what the file is."""
    inst = machine.create_instance("svc", ROOT)
    r, w = os.pipe()
    os.close(w)
    exc = refusal(machine.preserve, inst, ROOT, r, None)
    assert exc.errno == errno.ENOENT and "is a pipe;" in exc.message, exc


def test_linked_tmpfs_files_are_refused(machine: LiveUpdate) -> None:
    """A file with a name on tmpfs does not outlive a kexec the way a memfd's contents
    do: one created by name, or an O_TMPFILE given a name later, is refused; the same
    O_TMPFILE while it has no name is an unlinked shmem file, preserved as a memfd."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or syscalls.statfs_type(str(shm)) != syscalls.TMPFS_MAGIC:
        pytest.skip("/dev/shm is not a tmpfs here: no tmpfs to make files on without mounting one")
    inst = machine.create_instance("svc", ROOT)
    named = shm / f"kexecfs-test-{os.getpid()}"
    try:
        fd = os.open(named, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        exc = refusal(machine.preserve, inst, ROOT, fd, 1)
        assert exc.errno == errno.ENOENT and "is a linked tmpfs file;" in exc.message, exc
        named.unlink()

        anonymous = os.open(shm, os.O_RDWR | os.O_TMPFILE | os.O_CLOEXEC, 0o600)
        assert machine.preserve(inst, ROOT, os.dup(anonymous), 2).kind.name == "memfd"
        # linkat(AT_SYMLINK_FOLLOW) through /proc/self/fd gives it a name (os.link's plain
        # link(2) would link the /proc symlink itself; a src_dir_fd makes it use linkat).
        proc_fds = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.link(str(anonymous), named, src_dir_fd=proc_fds, follow_symlinks=True)
        finally:
            os.close(proc_fds)
        exc = refusal(machine.preserve, inst, ROOT, anonymous, 3)
        assert exc.errno == errno.ENOENT and "is a linked tmpfs file;" in exc.message, exc
    finally:
        named.unlink(missing_ok=True)
    assert sorted(inst.files) == [2]


def test_preserve_refused_outside_normal_and_updated(machine: LiveUpdate) -> None:
    inst = machine.create_instance("svc", ROOT)
    run(machine, "prepare")
    assert errno_of(machine.preserve, inst, ROOT, memfd(b"x"), None) == errno.EBUSY
    run(machine, "freeze")
    assert errno_of(machine.preserve, inst, ROOT, memfd(b"x"), None) == errno.EBUSY
    run(machine, "cancel")
    assert machine.state is State.NORMAL
    assert not (machine.image_dir / IMAGE_NAME).exists(), "cancel after freeze must retire the image"


def test_prepare_fails_whole_when_one_file_fails(machine: LiveUpdate, tmp_path: Path) -> None:
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"fine"), 1)
    doomed = preserve_regular_file(machine, inst, tmp_path, 2)
    doomed.unlink()  # a deleted file cannot be found again after a kexec
    assert errno_of(run, machine, "prepare") == errno.ENOENT
    assert machine.state is State.NORMAL and machine.busy is None
    assert "token 2" in machine.last_error
    assert not list(machine.image_dir.glob(".*.tmp")), "a failed prepare leaves no temporary image"


def test_freeze_kexec_recover_round_trip(machine: LiveUpdate, tmp_path: Path) -> None:
    inst = machine.create_instance("svc", ALICE)
    data = os.urandom(3 << 20)
    mfd = memfd(data, "guest-ram")
    os.lseek(mfd, 12345, os.SEEK_SET)
    fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    sparse = os.memfd_create("sparse")
    os.ftruncate(sparse, 64 << 20)
    os.pwrite(sparse, b"tail", (64 << 20) - 4)
    regular = tmp_path / "data.bin"
    regular.write_bytes(b"0123456789")
    rfd = os.open(regular, os.O_RDWR | os.O_APPEND)
    os.lseek(rfd, 4, os.SEEK_SET)
    machine.preserve(inst, ALICE, os.dup(mfd), 1)
    machine.preserve(inst, ALICE, os.dup(sparse), 2)
    machine.preserve(inst, ALICE, os.dup(rfd), 3)
    run(machine, "prepare")
    os.pwrite(sparse, b"late", 0)  # a change between prepare and freeze must reach the image
    run(machine, "freeze")
    assert machine.state is State.FROZEN
    assert os.lseek(mfd, 0, os.SEEK_CUR) == 12345, "serializing must not move the service's file offset"
    run(machine, "kexec")
    assert all(pf.fd == -1 for pf in inst.files.values()), "a kexec drops every held descriptor"

    after = machine.reboot()
    assert after.state is State.UPDATED and after.kexec_count == 1 and after.boot_id != machine.boot_id
    new = after.instances["svc"]
    assert (new.ino, new.uid) == (inst.ino, inst.uid)
    m = after.restore(new, ALICE, 1)
    assert digest(m.fd) == hashlib.sha256(data).hexdigest()
    assert os.lseek(m.fd, 0, os.SEEK_CUR) == 12345
    assert fcntl.fcntl(m.fd, fcntl.F_GET_SEALS) == fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
    s = after.restore(new, ALICE, 2)
    assert os.pread(s.fd, 4, 0) == b"late" and os.pread(s.fd, 4, (64 << 20) - 4) == b"tail"
    assert os.fstat(s.fd).st_blocks * 512 < 1 << 20, "holes stay holes"
    r = after.restore(new, ALICE, 3)
    assert os.fstat(r.fd).st_ino == regular.stat().st_ino and os.lseek(r.fd, 0, os.SEEK_CUR) == 4
    assert fcntl.fcntl(r.fd, fcntl.F_GETFL) & os.O_APPEND
    assert errno_of(after.restore, new, BOB, 1) == errno.EACCES
    after.finish_instance(new, ALICE)
    assert after.state is State.NORMAL
    assert sorted(new.files) == [1, 2, 3], "restored files stay preserved after finish"
    assert list((machine.image_dir / "retired").iterdir()), "finish keeps the image aside"


def test_unrestored_files_are_dropped_at_finish(machine: LiveUpdate, caplog: pytest.LogCaptureFixture) -> None:
    """...and finish names them: restores are logged at debug level only, so this line is
    where an operator learns which files a service never took back."""
    inst = machine.create_instance("svc", ROOT)
    for token in (1, 2, 3):
        machine.preserve(inst, ROOT, memfd(b"a"), token)
    run(machine, "prepare")
    run(machine, "kexec")  # freezes first
    after = LiveUpdate.boot(machine.image_dir, boot_id="b2")
    after.restore(after.instances["svc"], ROOT, 2)
    assert errno_of(run, after, "prepare") == errno.EINVAL
    with caplog.at_level("INFO", logger="kexecfs.machine"):
        run(after, "finish")
    assert sorted(after.instances["svc"].files) == [2]
    dropped = [r for r in caplog.records if "never restored" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in dropped] == [
        ("WARNING", "instance 'svc': 1 restored file(s) kept, 2 never restored and dropped (tokens 1, 3)")]


def test_plain_kexec_from_normal_loses_everything(machine: LiveUpdate) -> None:
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"a"), 1)
    run(machine, "kexec")
    after = LiveUpdate.boot(machine.image_dir)
    assert after.state is State.NORMAL and after.instances == {}


def test_restore_before_kexec_is_ebusy(machine: LiveUpdate) -> None:
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"a"), 1)
    assert errno_of(machine.restore, inst, ROOT, 1) == errno.EBUSY


def test_failed_freeze_goes_back_to_normal(machine: LiveUpdate, tmp_path: Path) -> None:
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"a"), 1)
    doomed = preserve_regular_file(machine, inst, tmp_path, 2)
    run(machine, "prepare")
    doomed.unlink()
    assert errno_of(run, machine, "freeze") == errno.ENOENT
    assert machine.state is State.NORMAL
    assert not (machine.image_dir / IMAGE_NAME).exists()
    assert not list(machine.image_dir.glob(".*.tmp"))


def test_damaged_image_is_kept_aside(machine: LiveUpdate) -> None:
    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(os.urandom(1 << 20)), 1)
    run(machine, "prepare")
    run(machine, "kexec")
    path = machine.image_dir / IMAGE_NAME
    with open(path, "r+b") as f:
        f.seek(4096 + 1000)
        byte = f.read(1)
        f.seek(4096 + 1000)
        f.write(bytes([byte[0] ^ 0x40]))
    after = LiveUpdate.boot(machine.image_dir)
    assert after.state is State.NORMAL and after.instances == {}
    assert "checksum mismatch" in after.last_error
    assert not path.exists() and list(machine.image_dir.glob(f"{IMAGE_NAME}.damaged-*"))


def test_a_file_that_cannot_be_restored_fails_alone(machine: LiveUpdate, monkeypatch: pytest.MonkeyPatch) -> None:
    """An OSError restoring one file (no room for a memfd, say) is that file's errno at
    open; the rest of the image is recovered."""
    from kexecfs.core.kinds.memfd import Memfd

    inst = machine.create_instance("svc", ROOT)
    machine.preserve(inst, ROOT, memfd(b"a"), 1)
    run(machine, "prepare")
    run(machine, "kexec")

    def no_room(self: Memfd, record: dict, image: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Memfd, "restore", no_room)
    after = machine.reboot()
    assert after.state is State.UPDATED
    assert errno_of(after.restore, after.instances["svc"], ROOT, 1) == errno.ENOSPC


def test_freeze_reads_again_only_what_can_have_changed(machine: LiveUpdate, caplog: pytest.LogCaptureFixture) -> None:
    """A memfd sealed against writes (F_SEAL_WRITE) at prepare is not read again at freeze;
    an unsealed one is, whole; both come back intact."""
    import fcntl

    inst = machine.create_instance("vm", ROOT)
    sealed, loose = memfd(os.urandom(1 << 20), "sealed"), memfd(os.urandom(1 << 20), "loose")
    fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    machine.preserve(inst, ROOT, sealed, 1)
    machine.preserve(inst, ROOT, loose, 2)
    run(machine, "prepare")
    os.pwrite(loose, b"changed", 4096)
    with caplog.at_level("INFO", logger="kexecfs.machine"):
        run(machine, "freeze")
    assert f"re-checked {1 << 20} bytes of contents, rewrote {1 << 20}" in caplog.text
    run(machine, "kexec")
    after = machine.reboot()
    files = after.instances["vm"].files
    assert os.pread(files[1].fd, 1 << 20, 0) == os.pread(sealed, 1 << 20, 0)
    assert os.pread(files[2].fd, 1 << 20, 0) == os.pread(loose, 1 << 20, 0)


def test_a_removed_instance_number_is_never_given_again_after_a_kexec(machine: LiveUpdate) -> None:
    """The kernel can still hold open files of a removed instance (they answer ENODEV); a
    new instance after a kexec must not take that number and receive their requests."""
    keep = machine.create_instance("keep", ROOT)
    gone = machine.create_instance("gone", ROOT)
    machine.preserve(keep, ROOT, memfd(b"x"), 1)
    machine.remove_instance("gone", ROOT)
    run(machine, "prepare")
    run(machine, "kexec")
    after = machine.reboot()
    fresh = after.create_instance("fresh", ROOT)
    assert fresh.ino not in (keep.ino, gone.ino), (fresh.ino, keep.ino, gone.ino)
