"""The journal: the instances and registrations of the running machine, durable across a
daemon restart (SPEC section 10).

The handover image carries a machine across a kexec; the journal carries it across a
restart of the daemon in the same kernel, while the descriptors themselves wait in the
descriptor store (a keeper or systemd's fd store, see ``kexecfs.fs.fdstore``). A
restarted daemon rebuilds exactly what was registered, each preserved file paired with
the descriptor stored under the name its record gives (:mod:`.resume`).

Format (``journal.kxj`` in the image directory, root-only like the images)::

    preamble  b"KXJRNL\\n" + u8 major + u8 minor          (8 bytes)
    frame     u32 length, u32 CRC-32 of the payload, payload   (little-endian)
    payload   msgpack list of records, each a map with "op":
      machine        the machine's own fields: kernel_boot_id, boot_id, kexec_count, state,
                     last_image, last_error, next_ino, next_file_ino, next_name, and
                     "intent": the slow event under way (null when none)
      instance       one instance, whole (name, ino, uid, gid, mode, limits, finished,
                     incoming, session)
      instance-gone  name
      file           one preserved file, whole: instance, token, kind, record (the kind's
                     fields), ino, fd (its name in the descriptor store, null if it has no
                     descriptor), recovered, opened, error ([errno, message] or null),
                     inode ([st_dev, st_ino] of the open file, or null; 1.0 journals lack it)
      file-gone      instance, token
      request        unique: the FUSE request whose effect this frame is

A frame is one operation, applied whole or not at all: it is appended with one write(2)
before the operation answers. A torn last frame (short, or a bad checksum) is an
operation that never completed and is dropped; a bad frame before the last one means
the file is damaged, and it is not used at all. Every record is whole (a later one of
the same key replaces an earlier one), so replaying the frames in order gives the state.
At each event of the state machine the journal is rewritten as one snapshot frame
(temporary file, fsync, rename, fsync of the directory), which also keeps it small.

Why a frame is written but not fsync'd: only a daemon of the kernel boot that wrote it
ever uses the frames (``kexecfs.fs.restart`` resumes from a journal only on the adopted
connection of the same boot), and in one boot a write(2) that returned is what every
later read sees, whatever kills the daemon. Whatever ends the boot (a crash, a power
loss, a kexec) also ends the descriptors the frames name, so no frame is worth a
flush to the disk: it cost 250 of a preserve's 500 us here. The snapshot, the first
frame, is fsync'd: it is rare (once per event), and :func:`load` reads it alone to say
what another boot left, which a power loss may have left torn after it.

Descriptors go into the store *before* the frame that names them is written, and leave
it only *after* the frame that drops them is durable: whatever point a crash hits, every
name the journal gives is in the store. Names in the store that no record gives (a
crash between the two) are released at the next start.

Once a frame naming a descriptor is durable, the daemon closes its own copy: the store
is the owner of preserved descriptors, and the daemon fetches one back while it works
on the file (:mod:`.descriptors`). Restored files of a recovery go to the store as they
are made (:meth:`Journal.park`), before any frame names them.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from .descriptors import DescriptorCache
from .errors import KexecfsError, fail
from .faults import inject
from .syscalls import same_open_file

if TYPE_CHECKING:
    from .instance import Instance, PreservedFile
    from .machine import LiveUpdate

log = logging.getLogger("kexecfs.journal")

JOURNAL_NAME = "journal.kxj"
MAGIC = b"KXJRNL\n"
VERSION = (1, 0)
PREAMBLE = MAGIC + bytes(VERSION)
FRAME = struct.Struct("<II")
MAX_FRAME = 256 << 20  # a snapshot of 100,000 files is ~20 MiB; anything far beyond is damage
RECENT_REQUESTS = 4096  # uniques remembered for requests the kernel may resend
COMPACT_SLACK = 1 << 20  # frames beyond 4x the last snapshot and this: a snapshot replaces them

#: The FUSE request being served, set by the filesystem for each request (tasks it starts
#: inherit it): the journal records it with the change, so that the same request, resent
#: by the kernel to a restarted daemon, is answered as it was and not done twice.
current_request: contextvars.ContextVar[int | None] = contextvars.ContextVar("current_request", default=None)


class Keeping(Protocol):
    """Where descriptors outlive the daemon (``kexecfs.fs.fdstore.DescriptorStore``)."""

    def keep(self, name: str, fd: int, watch: bool = False) -> None: ...

    def release(self, name: str) -> None: ...


class JournalDamaged(Exception):
    """A frame before the last one is unreadable: the journal is not used."""


# ---------------------------------------------------------------------------- reading


@dataclass
class JournalState:
    """What a journal says: the machine, its instances and files, as of its last frame."""

    machine: dict[str, Any] = field(default_factory=dict)
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    files: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    requests: dict[int, int] = field(default_factory=dict)  # unique of a request done -> its errno (0: success)
    # The store names of files are f<n>; the next one must be new: frames of preserves do
    # not repeat the machine record, so the highest name in any record counts too.
    next_name: int = 0

    def apply(self, record: dict[str, Any]) -> None:
        op = record.get("op")
        if op == "machine":
            self.machine = record
            self.next_name = max(self.next_name, record.get("next_name", 0))
        elif op == "instance":
            self.instances[record["name"]] = record
        elif op == "instance-gone":
            self.instances.pop(record["name"], None)
            for key in [k for k in self.files if k[0] == record["name"]]:
                del self.files[key]
        elif op == "file":
            self.files[record["instance"], record["token"]] = record
            name = record.get("fd")
            if isinstance(name, str) and name[1:].isdigit():
                self.next_name = max(self.next_name, int(name[1:]) + 1)
        elif op == "file-gone":
            self.files.pop((record["instance"], record["token"]), None)
        elif op == "request":
            self.requests[record["unique"]] = record.get("errno", 0)
            while len(self.requests) > RECENT_REQUESTS:
                del self.requests[next(iter(self.requests))]


def frames(data: bytes) -> Iterator[list[dict[str, Any]]]:
    """The complete frames of a journal's bytes; stops at a torn last frame."""
    if not data.startswith(MAGIC) or len(data) < len(PREAMBLE):
        raise JournalDamaged("no journal preamble")
    if data[len(MAGIC)] != VERSION[0]:
        raise JournalDamaged(f"journal format {data[len(MAGIC)]}.x; this kexecfs reads {VERSION[0]}.x")
    pos = len(PREAMBLE)
    while pos < len(data):
        if pos + FRAME.size > len(data):
            return  # torn header of the last frame
        length, crc = FRAME.unpack_from(data, pos)
        end = pos + FRAME.size + length
        if length > MAX_FRAME or end > len(data):
            return  # torn last frame (a length beyond the end can only be the last)
        payload = data[pos + FRAME.size:end]
        if zlib.crc32(payload) != crc:
            if end == len(data):
                return  # the last frame, torn
            raise JournalDamaged(f"frame at byte {pos} has a bad checksum")
        records = msgpack.unpackb(payload, raw=False, strict_map_key=False)
        if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
            raise JournalDamaged(f"frame at byte {pos} is not a list of records")
        yield records
        pos = end


def load(path: Path, kernel_boot_id: str) -> JournalState | None:
    """The state a journal file gives; None if there is none. Raises JournalDamaged.

    Written in another kernel boot (``kernel_boot_id`` is this one's), only the first
    frame counts, the fsync'd snapshot: the frames after it were never flushed to the
    disk, and that boot's crash may have left them torn or zeroed."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    state = JournalState()
    try:
        for records in frames(data):
            for record in records:
                state.apply(record)
            if state.machine.get("kernel_boot_id") != kernel_boot_id:
                break
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
        raise JournalDamaged(f"unreadable record: {exc}") from None
    return state if state.machine else None


# ---------------------------------------------------------------------------- writing


def encode(records: list[dict[str, Any]]) -> bytes:
    payload = msgpack.packb(records, use_bin_type=True)
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def instance_record(inst: Instance) -> dict[str, Any]:
    return {"op": "instance", "name": inst.name, "ino": inst.ino, "uid": inst.uid, "gid": inst.gid,
            "mode": inst.mode, "max_files": inst.max_files, "max_bytes": inst.max_bytes,
            "finished": inst.finished, "incoming": inst.incoming, "session": inst.session}


def machine_record(m: LiveUpdate, kernel_boot_id: str, next_name: int) -> dict[str, Any]:
    return {"op": "machine", "kernel_boot_id": kernel_boot_id, "boot_id": m.boot_id,
            "kexec_count": m.kexec_count, "state": m.state.word, "intent": m.intent,
            "intent_request": m.intent_request,
            "last_image": str(m.last_image) if m.last_image else None, "last_error": m.last_error,
            "next_ino": m.next_ino, "next_file_ino": m.next_file_ino, "next_name": next_name}


class Journal:
    """The running machine's journal: the machine calls the ``*_changed``/``*_removed``
    methods as it changes, then :meth:`commit` once per operation (one frame)."""

    def __init__(self, image_dir: Path, store: Keeping, kernel_boot_id: str,
                 cache: DescriptorCache | None = None) -> None:
        self.path = image_dir / JOURNAL_NAME
        self.store = store
        # Where the daemon's copies of stored descriptors come from; None: a store that
        # cannot give one back on demand, and the daemon keeps its own descriptors.
        self.cache = cache
        self.kernel_boot_id = kernel_boot_id
        self.names: dict[tuple[int, int], str] = {}  # (instance ino, token) -> name in the store
        self.users: dict[str, int] = {}  # name -> files it serves (one open file preserved twice)
        # (st_dev, st_ino) -> (name, file) of each stored file: where to look for its twins
        self.by_inode: dict[tuple[int, int], list[tuple[str, PreservedFile]]] = {}
        self.next_name = 0
        self.answered_requests: dict[int, int] = {}  # unique -> errno, as JournalState.requests
        self.pending: list[dict[str, Any]] = []
        self.on_success: list[Callable[[], None]] = []  # what the pending frame does once durable
        self.on_failure: list[Callable[[], None]] = []  # what undoes its side effects if it is not
        self.machine: LiveUpdate | None = None
        self._parking: list[tuple[str, PreservedFile]] = []  # recovered, named, not stored yet
        self.fd = -1
        self.size = self.snapshot_size = 0  # bytes now, and as the last snapshot left it

    def request(self) -> int | None:
        return current_request.get()

    def answered(self, unique: int) -> int | None:
        """The errno request ``unique`` was answered with (0: success), if its effect is in
        the journal; None if it is not (then it is to be done)."""
        return self.answered_requests.get(unique)

    # ------------------------------------------------------------------ what changed

    def instance_changed(self, inst: Instance) -> None:
        self.pending.append(instance_record(inst))

    def instance_removed(self, inst: Instance) -> None:
        self.pending.append({"op": "instance-gone", "name": inst.name})

    def file_changed(self, inst: Instance, pf: PreservedFile) -> None:
        key = (inst.ino, pf.token)
        if key not in self.names and pf.held:
            self._keep(key, pf)
        self.pending.append(self._file_record(inst, pf))

    def _file_record(self, inst: Instance, pf: PreservedFile) -> dict[str, Any]:
        return {"op": "file", "instance": inst.name, "token": pf.token, "kind": pf.kind.name, "record": pf.record,
                "ino": pf.ino, "fd": self.names.get((inst.ino, pf.token)), "recovered": pf.recovered,
                "opened": pf.opened, "error": [pf.error.errno, pf.error.message] if pf.error else None,
                "inode": list(pf.inode) if pf.inode else None}

    def file_removed(self, inst: Instance, pf: PreservedFile) -> None:
        """Call while the file's descriptor is still open (its twins are found through it)."""
        self.pending.append({"op": "file-gone", "instance": inst.name, "token": pf.token})
        key = (inst.ino, pf.token)
        if key in self.names:
            inode = pf.inode_key()
            self.on_success.append(lambda: self._drop(key, inode, pf))

    def machine_changed(self, m: LiveUpdate) -> None:
        self.machine = m
        self.pending.append(machine_record(m, self.kernel_boot_id, self.next_name))

    # ------------------------------------------------------------------ descriptors

    def _keep(self, key: tuple[int, int], pf: PreservedFile) -> None:
        """Store ``pf``'s descriptor, or find it stored already: a file preserved before that
        is the same open file (systemd's store keeps one open file once) serves both, and
        a file :meth:`park` stored keeps its name. Once the frame is durable the daemon
        lets go of its own descriptor (``on_success``)."""
        inode = pf.inode_key()
        twins = self.by_inode.setdefault(inode, [])  # type: ignore[arg-type]
        if pf.stored is not None:
            name = pf.stored
        else:
            name = next((n for n, twin in twins if twin.held and _same(twin, pf.fd)), None)
            if name is None:
                name = f"f{self.next_name}"
                self.next_name += 1
                self.store.keep(name, pf.fd)
                self.on_failure.append(lambda: self.store.release(name))
            if self.cache is not None:
                cache = self.cache
                self.on_success.append(lambda: pf.hand_over(name, cache))
        self.users[name] = self.users.get(name, 0) + 1
        self.names[key] = name
        twins.append((name, pf))
        self.on_failure.append(lambda: self._drop(key, inode, pf, release=False))

    def _drop(self, key: tuple[int, int], inode: tuple[int, int] | None, pf: PreservedFile,
              release: bool = True) -> None:
        name = self.names.pop(key, None)
        if name is None:
            return
        twins = [(n, f) for n, f in self.by_inode.get(inode, []) if f is not pf] if inode else []
        if twins:
            self.by_inode[inode] = twins  # type: ignore[index]
        elif inode:
            self.by_inode.pop(inode, None)
        self.users[name] -= 1
        if not self.users[name]:
            del self.users[name]
            if release:
                self._release_all([name])

    def _release_all(self, names: list[str]) -> None:
        """Let the store go of ``names``: in batches where it can (keepers), since a
        simulated kexec lets go of every file of the old kernel at once."""
        release_many = getattr(self.store, "release_many", None)
        if release_many is not None:
            release_many(names)
        else:
            for name in names:
                self.store.release(name)
        if self.cache is not None:
            for name in names:
                self.cache.forget(name)

    def park(self, pf: PreservedFile) -> None:
        """A file recovered from an image goes to the store, under a new name that the next
        :meth:`rewrite` journals (a crash before leaves a name no record gives, released at
        the next start): a recovery holds a batch of restored descriptors at a time (half
        the cache), stored in one message per keeper."""
        if self.cache is None or pf.fd < 0:
            return
        self._parking.append((f"f{self.next_name}", pf))
        self.next_name += 1
        if len(self._parking) >= max(1, self.cache.size // 2):
            self._park_pending()

    def _park_pending(self) -> None:
        parking, self._parking = self._parking, []
        if not parking or self.cache is None:
            return
        keep_many = getattr(self.store, "keep_many", None)
        if keep_many is not None:
            keep_many([(name, pf.fd) for name, pf in parking])
        else:
            for name, pf in parking:
                self.store.keep(name, pf.fd)
        for name, pf in parking:
            pf.hand_over(name, self.cache)

    def adopt(self, m: LiveUpdate, names: dict[tuple[int, int], str], next_name: int,
              answered: dict[int, int]) -> None:
        """Take over a resumed machine (see :mod:`.resume`): what its files are stored under."""
        self.machine, self.next_name, self.answered_requests = m, next_name, dict(answered)
        self.names, self.users, self.by_inode = {}, {}, {}
        for key, name in names.items():
            pf = m.by_ino[key[0]].files[key[1]]
            self.names[key] = name
            self.users[name] = self.users.get(name, 0) + 1
            if pf.held:
                self.by_inode.setdefault(pf.inode_key(), []).append((name, pf))  # type: ignore[arg-type]

    # ------------------------------------------------------------------ durability

    def commit(self, unique: int | None = None, *, answers: bool = True, errno_: int = 0) -> None:
        """Make the pending records one durable frame; KexecfsError if that fails, and then
        nothing of them happened (the caller undoes its change).

        ``answers``: the frame is the effect of the request being served (or of
        ``unique``'s, a slow event's), answered with ``errno_``; a frame that only announces
        an event (its intent) answers nothing yet."""
        if not self.pending:
            return
        unique = (self.request() if unique is None else unique) if answers else None
        if unique is not None:
            self.pending.append({"op": "request", "unique": unique, "errno": errno_})
        frame = encode(self.pending)
        on_success, on_failure = self.on_success, self.on_failure
        self.pending, self.on_success, self.on_failure = [], [], []
        try:
            if self.fd < 0:
                raise fail(errno.EIO, "the journal is not open")
            inject("journal.append")
            _write_all(self.fd, frame)  # no fdatasync: see the module docstring
        except (OSError, KexecfsError) as exc:
            for undo in reversed(on_failure):
                undo()
            raise _journal_error(exc) from None
        inject("journal.durable")
        if unique is not None:
            self._answer(unique, errno_)
        for action in on_success:
            action()
        self.size += len(frame)
        if self.size > 4 * self.snapshot_size + COMPACT_SLACK and self.machine is not None:
            self._compact()

    def _compact(self) -> None:
        """Many operations and no event (whose snapshot would shrink it): a snapshot now.
        The frame just written is durable already; failing here only leaves it longer."""
        try:
            self.rewrite(self.machine)  # type: ignore[arg-type]
        except KexecfsError as exc:
            log.error("compacting the journal: %s", exc.message)

    def _answer(self, unique: int, errno_: int) -> None:
        self.answered_requests[unique] = errno_
        while len(self.answered_requests) > RECENT_REQUESTS:
            del self.answered_requests[next(iter(self.answered_requests))]

    def rewrite(self, m: LiveUpdate, answered: tuple[int | None, int] | None = None) -> None:
        """Replace the journal by one frame holding the whole of ``m`` (at start, after each
        event, and for the machine a simulated kexec swaps in). ``answered``: the request
        (unique, errno) whose effect this is."""
        self._park_pending()  # the files a recovery parked last are in the store before any is named
        old_names, old = set(self.users), (self.names, self.by_inode, self.machine)
        self.pending, self.on_success, self.on_failure = [], [], []
        if m is not self.machine:
            old = ({}, {}, None)  # another machine's files: keep each anew
            if self.machine is not None and self.machine.intent == "kexec" and self.machine.state.word == "frozen":
                # The next boot of a simulated kexec from a committed image: the journal says
                # so already (the intent), and a restart from here recovers from the image,
                # needing none of the old kernel's descriptors. Released first, so that the
                # store holds both kernels' files no longer than it must: a store in one
                # process could pass its RLIMIT_NOFILE, and a descriptor it cannot receive
                # is not kept. (Keepers hold the next boot's files already, parked by the
                # recovery; they are sharded, so no one process holds both kernels' files.)
                self._release_all(sorted(old_names))
                old_names = set()
        self.machine, self.names, self.users, self.by_inode = m, {}, {}, {}
        files = []
        for inst in m.instances.values():
            for token in sorted(inst.files):
                pf, key = inst.files[token], (inst.ino, token)
                if key in old[0] and pf.held:
                    name = self.names[key] = old[0][key]
                    self.users[name] = self.users.get(name, 0) + 1
                    self.by_inode.setdefault(pf.inode_key(), []).append((name, pf))  # type: ignore[arg-type]
                elif pf.held:
                    self._keep(key, pf)
                files.append(self._file_record(inst, pf))
        if answered is not None and answered[0] is not None:
            self._answer(*answered)  # type: ignore[arg-type]
        records = [machine_record(m, self.kernel_boot_id, self.next_name)]
        records += [instance_record(inst) for inst in m.instances.values()] + files
        records += [{"op": "request", "unique": u, "errno": e} for u, e in self.answered_requests.items()]
        on_failure, self.on_failure = self.on_failure, []
        on_success, self.on_success = self.on_success, []
        try:
            self._replace(PREAMBLE + encode(records))
        except OSError as exc:
            for undo in reversed(on_failure):
                undo()
            raise _journal_error(exc) from None
        for action in on_success:
            action()
        self._release_all(sorted(old_names - set(self.users)))

    def _replace(self, data: bytes) -> None:
        tmp = self.path.with_name(f".{JOURNAL_NAME}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        inject("journal.rewrite")
        os.rename(tmp, self.path)
        dirfd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dirfd)  # the rename itself must be durable before anything relies on it
        finally:
            os.close(dirfd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd  # appends go on from the end of what was just written
        self.size = self.snapshot_size = len(data)

    def end(self) -> None:
        """The filesystem ended (unmounted): nothing is to survive a restart any more."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self.path.unlink(missing_ok=True)


class NoJournal:
    """A machine's changes go nowhere: a machine without a journal (tools, unit tests, and a
    daemon whose descriptors outlive it nowhere)."""

    def request(self) -> int | None:
        return None

    def answered(self, unique: int) -> int | None:
        return None

    def instance_changed(self, inst: Instance) -> None:
        pass

    def instance_removed(self, inst: Instance) -> None:
        pass

    def file_changed(self, inst: Instance, pf: PreservedFile) -> None:
        pass

    def file_removed(self, inst: Instance, pf: PreservedFile) -> None:
        pass

    def machine_changed(self, m: LiveUpdate) -> None:
        pass

    def park(self, pf: PreservedFile) -> None:
        pass  # the daemon keeps the descriptor itself: nothing else holds it

    def commit(self, unique: int | None = None, *, answers: bool = True, errno_: int = 0) -> None:
        pass

    def rewrite(self, m: LiveUpdate, answered: tuple[int | None, int] | None = None) -> None:
        pass

    def end(self) -> None:
        pass


def _same(twin: PreservedFile, fd: int) -> bool:
    with twin.descriptor() as mine:
        return same_open_file(mine, fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _journal_error(exc: BaseException) -> KexecfsError:
    code = exc.errno if isinstance(exc, (OSError, KexecfsError)) and exc.errno else errno.EIO
    return KexecfsError(code, f"the journal could not be made durable ({os.strerror(code)}); nothing was changed")
