"""The machine-wide live-update state machine (LUO PATCH v1 semantics).

::

    normal --prepare--> prepared --freeze--> frozen --kexec--> (next boot) updated --finish--> normal
       ^                   |                   |
       +------cancel-------+-------cancel------+

``prepare`` validates every preserved file and pre-serializes its contents into a new
handover image while services still run (the slow part). ``freeze`` is the blackout:
it rewrites only what changed since prepare and makes the image durable. After a
kexec, :meth:`LiveUpdate.boot` recovers everything from the image alone.

This module knows nothing of FUSE. Slow events (prepare, freeze, kexec) are split in
two: :meth:`LiveUpdate.begin` checks and reserves the machine at once (so that wrong
states answer immediately), and the returned work may run in a thread while the
filesystem keeps answering reads; every change is refused with EBUSY meanwhile.
"""

from __future__ import annotations

import enum
import errno
import gc
import logging
import math
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import abi
from .errors import KexecfsError, fail, refusal
from .capture import take_descriptor
from .descriptors import warmed
from .syscalls import same_open_file
from .faults import inject
from .image import IMAGE_NAME, HandoverImage, ImageError, ImageWriter, writer_info
from .journal import NoJournal
from .instance import Caller, Instance, PreservedFile
from .names import check_name, directory_name
from .kinds import KINDS, detect

log = logging.getLogger("kexecfs.machine")

# Instance directories get inode numbers from here on, INO_STRIDE apart, so the
# filesystem layer can number an instance's own files right after it. They are
# recorded in the image: a bind mount of an instance survives a simulated kexec.
FIRST_INSTANCE_INO = 1 << 16
INO_STRIDE = 16
# fds/<token> entries are numbered from here, far above any instance's range, once each
# for the life of the mount (a restarted daemon gets them from the journal).
FIRST_FILE_INO = 1 << 48
RETIRED_KEPT = 4
SHOWN_TOKENS = 20  # tokens named in a log line; the rest are counted


class State(enum.Enum):
    """Global states, with the numbers LIVEUPDATE_IOCTL_GET_STATE reports."""

    NORMAL = "normal", abi.STATE_NUMBERS["normal"]
    PREPARED = "prepared", abi.STATE_NUMBERS["prepared"]
    FROZEN = "frozen", abi.STATE_NUMBERS["frozen"]
    UPDATED = "updated", abi.STATE_NUMBERS["updated"]

    def __init__(self, word: str, number: int) -> None:
        self.word = word
        self.number = number


EVENTS = abi.EVENTS
#: Events whose work copies or recovers contents: run in a thread while reads go on.
SLOW_EVENTS = frozenset({"prepare", "freeze", "kexec"})


@contextmanager
def collector_paused() -> Iterator[None]:
    """The cyclic garbage collector paused for the block: prepare, freeze and a recovery
    (the blackout is the last two). A machine of 100,000 files is millions of objects,
    and every full collection that their allocations set off scanned them all: at the
    bench's scale point 16 % of prepare and freeze, 28 % of a simulated kexec. Reference
    counting still frees what they drop; the collector runs again after, and looks at
    what they made once instead of at every collection they set off. (A block in another
    thread meanwhile is paused until the first one to start ends.)"""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@dataclass(frozen=True)
class Policy:
    """What root decides for the whole mount: who besides root drives global events, and
    the limits every new instance starts with (root changes them per instance later)."""

    admin_gid: int | None = None
    max_files: int | None = None  # preserved files per instance; None: no limit
    max_bytes: int | None = None  # bytes of contents per instance that the image holds


def kernel_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


class LiveUpdate:
    """One machine: its state, its instances, and the image it builds or came from."""

    def __init__(self, image_dir: Path, boot_id: str | None = None, kexec_count: int = 0,
                 policy: Policy = Policy()) -> None:
        self.image_dir = image_dir
        self.boot_id = boot_id or kernel_boot_id()
        self.kexec_count = kexec_count
        self.policy = policy
        self.state = State.NORMAL
        self.instances: dict[str, Instance] = {}
        self.by_ino: dict[int, Instance] = {}  # the filesystem finds instances by inode on every request
        self.busy: str | None = None  # the slow event in progress, if any
        self.last_image: Path | None = None
        self.last_error = ""
        self.on_progress: Callable[[str], None] | None = None  # hears every change of ``progress``
        self.progress = ""
        # What operators and metrics read (None: never happened here).
        self.last_freeze_seconds: float | None = None  # the last freeze (carried over a simulated kexec)
        self.last_recovery_seconds: float | None = None  # this boot's recovery of an image
        self.last_blackout_seconds: float | None = None  # from the start of that image's freeze to recovered
        self.recovery_failures = 0  # images this daemon refused to recover (damaged)
        self.listeners: list[Callable[[], None]] = []
        self.next_ino = FIRST_INSTANCE_INO
        self.next_file_ino = FIRST_FILE_INO
        # Where changes are made durable for a restart of the daemon (kexecfs.core.journal),
        # one frame per operation; and the slow event under way, as the journal knows it.
        self.record: Any = NoJournal()
        self.intent: str | None = None
        self.intent_request: int | None = None
        self._writer: ImageWriter | None = None  # the image being built, between prepare and freeze
        self._prepared: dict[tuple[str, int], dict[str, Any]] = {}

    # ------------------------------------------------------------------ queries

    @property
    def progress(self) -> str:
        """What the slow event or the recovery under way has done ("freeze: 512 MiB of 1024 MiB")."""
        return self._progress_text

    @progress.setter
    def progress(self, text: str) -> None:
        self._progress_text = text
        if self.on_progress:
            self.on_progress(text)

    def instance_state(self, instance: Instance) -> State:
        return State.NORMAL if instance.finished and self.state is State.UPDATED else self.state

    def status(self) -> dict[str, Any]:
        files = [pf for inst in self.instances.values() for pf in inst.files.values()]
        return {
            "state": self.state.word, "boot_id": self.boot_id, "kexec_count": self.kexec_count,
            "instances": len(self.instances), "preserved_files": len(files),
            "preserved_bytes": sum(pf.size for pf in warmed(files)), "image_dir": str(self.image_dir),
            "last_image": str(self.last_image or ""), "last_error": self.last_error,
            "progress": self.progress,
            "last_freeze_seconds": self.last_freeze_seconds, "last_recovery_seconds": self.last_recovery_seconds,
            "last_blackout_seconds": self.last_blackout_seconds, "recovery_failures": self.recovery_failures,
            "unrestorable_files": sum(1 for _inst, pf in self._files() if pf.error is not None),
        }

    def problem(self, pf: PreservedFile) -> str:
        """Why ``pf`` would make the next prepare fail (the very check prepare makes), or why
        it could not be restored after the kexec; "" if nothing is wrong."""
        if pf.error is not None:
            return pf.error.message
        if not pf.held:
            return ""
        try:
            with pf.descriptor() as fd:
                pf.kind.validate(fd)
        except Exception as exc:
            answer = refusal(exc)
            if answer is None:
                raise
            return answer.message
        return ""

    def lookup(self, name: str) -> Instance:
        try:
            return self.instances[name]
        except KeyError:
            raise fail(errno.ENOENT, f"no instance {name!r}") from None

    # ------------------------------------------------------------------ instances

    def _check_idle(self, action: str) -> None:
        if self.busy:
            raise fail(errno.EBUSY, f"{action}: {self.busy} is in progress")

    def check_instances_open(self, action: str) -> None:
        """EBUSY while instances may not change (mkdir, chown, chmod): during a slow event,
        and once frozen, when the image is written and a change would not survive the kexec."""
        self._check_idle(action)
        if self.state is State.FROZEN:
            raise fail(errno.EBUSY, f"{action}: not allowed while frozen (the handover image is written)")

    def create_instance(self, name: str, caller: Caller, mode: int = 0o755) -> Instance:
        check_name(name)
        if name in self.instances:
            raise fail(errno.EEXIST, f"instance {name!r} already exists")
        self.check_instances_open(f"mkdir {name}")
        inst = Instance(name, self.next_ino, caller.uid, caller.gid, mode & 0o7777,
                        max_files=self.policy.max_files, max_bytes=self.policy.max_bytes)
        self.next_ino += INO_STRIDE
        self.instances[name] = self.by_ino[inst.ino] = inst
        try:
            self.instance_changed(inst)
        except KexecfsError:
            del self.instances[name], self.by_ino[inst.ino]
            raise
        log.info("instance %r created by %s", name, caller, extra={"INSTANCE": name})
        return inst

    def remove_instance(self, name: str, caller: Caller) -> None:
        inst = self.lookup(name)
        self._check_idle(f"rmdir {name}")
        if inst.files:
            raise fail(errno.EBUSY, f"rmdir {name}: instance still holds {len(inst.files)} preserved file(s)")
        if self.instance_state(inst) is not State.NORMAL:
            raise fail(errno.EBUSY, f"rmdir {name}: instance is {self.instance_state(inst).word}, not normal")
        self.record.instance_removed(inst)
        self.record.commit()
        inst.removed = True
        del self.instances[name], self.by_ino[inst.ino]
        log.info("instance %r removed by %s", name, caller, extra={"INSTANCE": name})

    def set_limit(self, inst: Instance, caller: Caller, which: str, value: int | None) -> None:
        """Root sets an instance's limit (``files`` or ``bytes``); None lifts it. A limit below
        what the instance holds is kept: only new preserves (and prepare, for bytes) meet it."""
        if caller.uid != 0:
            raise fail(errno.EPERM, f"{which}.max of {inst.name!r}: limits are set by root; refused {caller}")
        self.check_instances_open(f"{which}.max of {inst.name!r}")
        old = getattr(inst, f"max_{which}")
        setattr(inst, f"max_{which}", value)
        try:
            self.instance_changed(inst)
        except KexecfsError:
            setattr(inst, f"max_{which}", old)
            raise
        log.info("instance %r: %s.max set to %s by %s", inst.name, which, "max" if value is None else value, caller)

    # ------------------------------------------------------------------ LUO sessions (6.19)

    def create_session(self, name: bytes, caller: Caller) -> Instance:
        """CREATE_SESSION: a new (outgoing) session, an instance whose lifetime is its fd's.

        An empty instance that root made and delegated, and that no session fd holds, is
        adopted by its owner's session of the same name: that is how an unprivileged
        service gets a session (only root creates instances, as mkdir at the top).
        """
        directory = directory_name(name)
        self._check_registrations_open(f"CREATE_SESSION {directory}")
        inst = self.instances.get(directory)
        if inst is None:
            if caller.uid != 0:
                raise fail(errno.EPERM, f"CREATE_SESSION {directory} by {caller}: only root creates sessions; "
                                        f"root can make and delegate the instance first (mkdir, chown -R)")
            inst = self.create_instance(directory, caller, 0o755)
        elif inst.session or inst.files or inst.incoming or caller.uid not in (0, inst.uid):
            raise fail(errno.EEXIST, f"CREATE_SESSION by {caller}: session {directory} already exists")
        self._set_session(inst, "created")
        log.info("session %r created by %s", directory, caller)
        return inst

    def check_retrievable(self, name: bytes, caller: Caller) -> Instance:
        """The incoming session RETRIEVE_SESSION would return: ENOENT if there is none of that
        name (before a kexec, or once finished), EINVAL if it was retrieved already."""
        directory = directory_name(name)
        inst = self.instances.get(directory)
        if inst is None or not inst.incoming or self.instance_state(inst) is not State.UPDATED:
            raise fail(errno.ENOENT, f"RETRIEVE_SESSION by {caller}: no incoming session {directory}")
        inst.check_owner(caller, "RETRIEVE_SESSION")
        if inst.session == "retrieved":
            raise fail(errno.EINVAL, f"RETRIEVE_SESSION by {caller}: session {directory} was retrieved already")
        return inst

    def retrieve_session(self, name: bytes, caller: Caller) -> Instance:
        """RETRIEVE_SESSION: the incoming session of that name, once (then EINVAL)."""
        inst = self.check_retrievable(name, caller)
        self._set_session(inst, "retrieved")
        log.info("session %r retrieved by %s", inst.name, caller)
        return inst

    def close_session(self, inst: Instance, caller: Caller) -> None:
        """The last descriptor of a session was closed, and the session ends, as the kernel's:
        a retrieved one is finished first; then its files are unpreserved (a process that
        retrieved them keeps its own descriptors) and the instance is gone."""
        how = inst.session
        if inst.removed or self.instances.get(inst.name) is not inst:
            inst.session = None
            return
        self._set_session(inst, None)
        if how == "retrieved" and self.instance_state(inst) is State.UPDATED:
            self.finish_instance(inst, caller)
        if self.busy or self.state not in (State.NORMAL, State.UPDATED) or \
                (inst.incoming and self.instance_state(inst) is State.UPDATED):
            log.info("session %r closed while %s: it is carried as it is", inst.name, self.busy or self.state.word)
            return
        for pf in inst.files.values():
            self.record.file_removed(inst, pf)
        self.record.instance_removed(inst)
        self.record.commit()
        for pf in inst.files.values():
            pf.close()
        inst.files.clear()
        inst.removed = True
        del self.instances[inst.name], self.by_ino[inst.ino]
        log.info("session %r closed by %s: its files are unpreserved and the session is gone", inst.name, caller)

    def already_preserved(self, fd: int) -> tuple[Instance, int] | None:
        """The instance and token under which the open file of ``fd`` is preserved, if any
        (LUO refuses to preserve one open file twice: EBUSY). Only files of the same inode
        can be the same open file: kcmp compares those alone, so that stored descriptors
        are not all fetched for each preserve."""
        st = os.fstat(fd)
        inode = (st.st_dev, st.st_ino)
        for inst in self.instances.values():
            for pf in inst.files.values():
                if pf.held and not pf.recovered and pf.inode_key() == inode:
                    with pf.descriptor() as mine:
                        if same_open_file(mine, fd):
                            return inst, pf.token
        return None

    def default_instance(self, caller: Caller) -> Instance:
        """The instance the top-level control file's FD ioctls act on (created on demand)."""
        if "default" not in self.instances:
            if caller.uid != 0:  # as mkdir at the top: only root creates instances
                raise fail(errno.EACCES, f"{caller}: there is no instance 'default', and only root creates "
                                         f"instances")
            return self.create_instance("default", caller)
        return self.instances["default"]

    # ------------------------------------------------------------------ preserving

    def _check_registrations_open(self, action: str) -> None:
        self._check_idle(action)
        if self.state not in (State.NORMAL, State.UPDATED):
            raise fail(errno.EBUSY, f"{action}: not allowed while {self.state.word}")

    def preserve(self, inst: Instance, caller: Caller, fd_number: int, token: int | None,
                 once: bool = False) -> PreservedFile:
        """Preserve the caller's descriptor ``fd_number`` under ``token`` (None: the lowest free).

        Synchronous: the caller must still be blocked in its write(2) or ioctl(2) when its
        descriptor is taken (see :mod:`.capture`). Every check that needs no descriptor
        comes first, so a refused preserve never touches the caller's process. ``once``
        (the session door, as LUO): EBUSY if the same open file is preserved already.
        """
        if inst.removed:
            raise fail(errno.ENODEV, f"instance {inst.name!r} was removed")
        inst.check_owner(caller, "fd_preserve")
        self._check_registrations_open(f"fd_preserve in {inst.name!r}")
        if token is not None and token in inst.files:
            raise fail(errno.EEXIST, f"fd_preserve: token {token} is already used in instance {inst.name!r}")
        fd = take_descriptor(caller.pid, fd_number)
        try:
            if once and (where := self.already_preserved(fd)):
                raise fail(errno.EBUSY, f"fd_preserve by {caller}: that open file is preserved already, in "
                                        f"instance {where[0].name!r} token {where[1]}")
            try:
                kind = detect(fd)
            except KexecfsError as exc:
                raise fail(exc.errno, f"fd_preserve: the file from {caller} {exc.message}") from None
            record = kind.capture(fd)
            inst.check_room(kind, record, caller)
            pf = inst.add(token, kind, fd, record)
            pf.ino = self._file_ino()
            pf.inode_key()
            try:
                self._file_changed(inst, pf)
            except BaseException:
                del inst.files[pf.token]
                raise
        except BaseException:
            os.close(fd)
            raise
        log.info("instance %r: preserved token %d (%s) from %s", inst.name, pf.token, pf.line(), caller,
                 extra={"INSTANCE": inst.name, "TOKEN": pf.token})
        return pf

    def unpreserve(self, inst: Instance, caller: Caller, token: int) -> None:
        inst.check_owner(caller, "fd_unpreserve")
        self._check_registrations_open(f"fd_unpreserve in {inst.name!r}")
        pf = inst.get(token)
        self.record.file_removed(inst, pf)
        self.record.commit()
        pf.close()
        del inst.files[token]
        log.info("instance %r: unpreserved token %d by %s", inst.name, token, caller,
                 extra={"INSTANCE": inst.name, "TOKEN": token})

    def restore(self, inst: Instance, caller: Caller, token: int, flags: int | None = None) -> PreservedFile:
        """The restored file behind ``fds/<token>`` (after a kexec only), for an open with
        ``flags``: EACCES if they ask for more than the preserved descriptor had."""
        inst.check_owner(caller, "restore")
        pf = inst.get(token)
        if self.state is not State.UPDATED or not pf.recovered:
            raise fail(errno.EBUSY, f"restore of token {token} in {inst.name!r}: only after a kexec "
                                    f"(the machine is {self.instance_state(inst).word})")
        if pf.error:
            raise pf.error
        if flags is not None:
            pf.check_access(flags, f"restore of {inst.name}/fds/{token} by {caller}")
        if not pf.opened:
            pf.opened = True
            try:
                self._file_changed(inst, pf)
            except KexecfsError:
                pf.opened = False
                raise
        # Debug only: a restore of 10,000 files would log 10,000 lines, a quarter of its
        # time. Finish says what was restored and names what was not (_keep_restored).
        log.debug("instance %r: token %d restored by %s", inst.name, token, caller,
                  extra={"INSTANCE": inst.name, "TOKEN": token})
        return pf

    # ------------------------------------------------------------------ events

    def is_admin(self, caller: Caller) -> bool:
        gid = self.policy.admin_gid
        return caller.uid == 0 or (gid is not None and gid in _groups_of(caller))

    def check_admin(self, caller: Caller, event: str) -> None:
        gid = self.policy.admin_gid
        if self.is_admin(caller):
            return
        raise fail(errno.EPERM, f"{event}: global events are for root"
                                + (f" and group {gid}" if gid is not None else "")
                                + f"; refused {caller}")

    def begin(self, event: str, caller: Caller) -> Callable[[], None]:
        """Check that ``event`` may happen now and reserve the machine for it.

        Wrong states fail here, at once, with LUO's errno. The returned work performs
        the event (raising KexecfsError on failure) and always releases the machine.
        """
        if event not in EVENTS:
            raise fail(errno.EINVAL, f"unknown event {event[:80]!r}; events are {', '.join(EVENTS)}")
        self.check_admin(caller, event)
        self._check_idle(event)
        allowed = {"prepare": (State.NORMAL,), "freeze": (State.PREPARED,), "finish": (State.UPDATED,),
                   "cancel": (State.PREPARED, State.FROZEN), "kexec": tuple(State)}[event]
        if self.state not in allowed:
            # LUO answers a cancel with nothing to cancel with ENOENT, other misplaced events with EINVAL.
            raise fail(errno.ENOENT if event == "cancel" else errno.EINVAL,
                       f"{event} by {caller}: not allowed while {self.state.word}")
        self.busy = event
        try:
            self._begin_intent(event)
        except KexecfsError:
            self.busy = None
            raise
        body = getattr(self, f"_{event}")

        def perform() -> None:
            before = self.state
            started = time.monotonic()
            outcome = errno.EIO
            try:
                if event in SLOW_EVENTS:  # heard at once, even if no byte needs copying (an unchanged freeze)
                    self.progress = f"{event}: under way"
                body()
                outcome = 0
            except Exception as exc:
                answer = refusal(exc)
                if answer is None:  # a bug: the FUSE layer logs the traceback; status says it too
                    self.last_error = f"{event}: unexpected {type(exc).__name__}: {exc}"
                    raise
                outcome = answer.errno
                self.last_error = f"{event}: {answer.message}"
                # The file that failed it, if one did (see _about): journalctl INSTANCE=db finds it.
                log.error("%s by %s failed: %s", event, caller, answer,
                          extra={"EVENT": event, **getattr(answer, "fields", {})})
                if isinstance(exc, KexecfsError):
                    raise
                raise KexecfsError(answer.errno, self.last_error) from exc
            finally:
                # A kexec that went through ends in the next boot's machine (reboot()): until
                # then this machine is the old kernel's, and nothing may change it (a cancel
                # slipping in would retire the image the next boot is to recover).
                if event != "kexec" or outcome:
                    self.busy = None
                    self._end_intent(outcome)
                self.progress = ""
                self._notify()
            log.info("%s by %s: %s -> %s in %.3f s", event, caller, before.word, self.state.word,
                     time.monotonic() - started, extra={"EVENT": event})

        def work() -> None:
            # The journal's snapshot at the end (_end_intent) included: it is the event's too.
            with collector_paused() if event in SLOW_EVENTS else nullcontext():
                perform()
        return work

    def request(self, event: str, caller: Caller, inst: Instance | None = None) -> Callable[[], None]:
        """The one door for events, written to a ``state`` file or sent as an ioctl alike.

        Through an instance's files (``db/state``, ``db/control``) "finish" ends that
        instance's update only, for root as for the owner, as LUO's SESSION_FINISH ends one
        session; any other event there is root's (or the admin group's) to send to the
        whole machine, and EINVAL for an owner (SPEC section 3). Through the top-level
        files every event is global. Checks happen now; the returned work does the event
        (:data:`SLOW_EVENTS` should run in a thread).
        """
        if inst is not None and event == "finish":
            self.finish_instance(inst, caller)
            return lambda: None
        if inst is not None and not self.is_admin(caller):
            inst.check_owner(caller, event[:80])
            raise fail(errno.EINVAL, f"{caller}: an instance's owner may only send 'finish', not {event[:80]!r}")
        return self.begin(event, caller)

    def finish_instance(self, inst: Instance, caller: Caller) -> None:
        """The owner's "finish": end this instance's update; the last one ends the machine's."""
        inst.check_owner(caller, "finish")
        self._check_idle(f"finish {inst.name}")
        if self.instance_state(inst) is not State.UPDATED:
            raise fail(errno.EINVAL, f"finish in {inst.name!r}: the instance is {self.instance_state(inst).word}, "
                                     f"not updated")
        fields = {"INSTANCE": inst.name, "EVENT": "finish"}
        if not all(i.finished or i is inst for i in self.instances.values()):
            _keep_restored(inst, self.record)
            inst.finished = True
            self.instance_changed(inst)
            log.info("instance %r finished by %s", inst.name, caller, extra=fields)
        else:  # the last one ends the machine's update, as a global finish does
            self._begin_intent("finish")
            outcome = errno.EIO
            try:
                _keep_restored(inst, self.record)
                inst.finished = True
                log.info("instance %r finished by %s", inst.name, caller, extra=fields)
                self._finish()
                outcome = 0
            finally:
                self._end_intent(outcome)
        self._notify()

    # ------------------------------------------------------------------ the journal

    def instance_changed(self, inst: Instance) -> None:
        """Make a change of ``inst`` durable for a restart (KexecfsError if it cannot be)."""
        self.record.instance_changed(inst)
        self.record.commit()

    def _file_changed(self, inst: Instance, pf: PreservedFile) -> None:
        self.record.file_changed(inst, pf)
        self.record.commit()

    def _set_session(self, inst: Instance, how: str | None) -> None:
        old, inst.session = inst.session, how
        try:
            self.instance_changed(inst)
        except KexecfsError:
            inst.session = old
            raise

    def _file_ino(self) -> int:
        ino, self.next_file_ino = self.next_file_ino, self.next_file_ino + 1
        return ino

    def _begin_intent(self, event: str) -> None:
        """A slow or multi-step event begins: a restart in its middle finds it in the journal
        and settles it before or after (see :mod:`.resume`)."""
        self.intent, self.intent_request = event, self.record.request()
        self.record.machine_changed(self)
        try:
            self.record.commit(answers=False)
        except KexecfsError:
            self.intent = self.intent_request = None
            raise

    def _end_intent(self, outcome: int) -> None:
        """The event is over (``outcome``: its errno, 0 if done): the journal becomes one
        snapshot of the machine, which also answers the event's request."""
        self.intent = None
        try:
            self.record.rewrite(self, (self.intent_request, outcome))
        except KexecfsError as exc:
            self.last_error = f"journal: {exc.message}"
            log.error("after %s: %s; a restart now would settle it from the image directory",
                      self.busy or "the event", exc.message)
        self.intent_request = None

    def carry_file_inos(self, old: LiveUpdate) -> None:
        """After a simulated kexec: the files the old machine had keep their inode numbers
        (a service may hold an ``fds/<token>`` dentry across it); the others get new ones."""
        before = {(i.name, t): pf.ino for i in old.instances.values() for t, pf in i.files.items()}
        self.next_file_ino = max(self.next_file_ino, old.next_file_ino)
        for inst, pf in self._files():
            pf.ino = before.get((inst.name, pf.token)) or self._file_ino()

    def prepare_again(self) -> None:
        """Prepare a machine resumed in ``prepared`` (the image its prepare wrote died with
        the daemon that wrote it)."""
        self._prepare()

    def finish_resumed(self) -> None:
        """Complete a finish that a restart interrupted after the image was retired."""
        self._finish()

    def _prepare(self) -> None:
        writer = ImageWriter(self.image_dir, progress=self._progress("prepare"))
        prepared: dict[tuple[str, int], dict[str, Any]] = {}
        try:
            for inst in self.instances.values():
                inst.check_bytes("prepare")  # memfds can have grown since they were preserved
            for inst, pf in warmed(self._files(), _file):
                inject("prepare.file")
                with _about(inst, pf, "prepare"), pf.descriptor() as fd:
                    pf.kind.validate(fd)
                    prepared[inst.name, pf.token] = pf.kind.serialize(fd, writer, None)
            # Durable now, while the services still run: freeze's fsync then flushes only
            # the chunks that changed since, and the blackout is what changed.
            writer.sync()
        except BaseException:
            writer.abort()
            raise
        self._writer, self._prepared = writer, prepared
        self.state = State.PREPARED

    def _freeze(self) -> None:
        writer = self._writer
        assert writer is not None
        started, started_at = time.monotonic(), time.time()
        writer.progress = self._progress("freeze")
        written_by_prepare = writer.bytes_written
        try:
            records = [inst.record() for inst in self.instances.values()]
            for inst, pf in warmed(self._files(), _file):
                inject("freeze.file")
                with _about(inst, pf, "freeze"), pf.descriptor() as fd:
                    pf.kind.validate(fd)
                    fields = pf.kind.serialize(fd, writer, self._prepared[inst.name, pf.token])
                # The access a later restore grants is the preserved descriptor's, never that
                # of the descriptor the daemon holds (a restored memfd is its own, read-write).
                fields["flags"] = pf.preserved_flags
                records.append({"type": "file", "instance": inst.name, "token": pf.token,
                                "kind": pf.kind.name, **fields})
            # The next boot reckons the blackout from when the freeze began (wall clock: it goes on across a kexec).
            # Instance inodes already given out, removed ones too: the kernel may still hold
            # open files of a removed instance, which must answer ENODEV, not reach a new one.
            self.last_image = writer.commit({"writer": {**writer_info(self.boot_id, self.kexec_count),
                                                        "freeze_started": started_at,
                                                        "next_instance_ino": self.next_ino},
                                             "state": State.FROZEN.word, "records": records})
            log.info("freeze: re-checked %d bytes of contents, rewrote %d", writer.bytes_checked,
                     writer.bytes_written - written_by_prepare)
        except BaseException:
            writer.abort()
            if writer.committed:
                # Failed after the rename (fsync of the directory, say): the caller hears
                # that freeze failed, so a restart must not recover this image as if it had not.
                self._retire_image("failed")
            self._discard_prepared()
            self.state = State.NORMAL
            raise
        self._writer, self._prepared = None, {}
        self.state = State.FROZEN
        self.last_freeze_seconds = time.monotonic() - started

    def _cancel(self) -> None:
        if self.state is State.FROZEN:
            self._retire_image("cancelled")
        self._discard_prepared()
        self.state = State.NORMAL

    def _finish(self) -> None:
        for inst in self.instances.values():
            _keep_restored(inst, self.record)
            inst.finished = False
        self._retire_image("finished")
        self.state = State.NORMAL

    def _kexec(self) -> None:
        if self.state is State.PREPARED:
            self._freeze()
        if self.state is not State.FROZEN:
            # A plain kexec: nothing is handed over, and an older image must not be
            # recovered by the next boot as if it were this one's.
            self._retire_image("superseded")
        # Everything held dies with the old kernel. The instances stay readable until
        # the caller swaps in the machine of the next boot (:meth:`reboot`), so a
        # simulated kexec shows no half-empty tree in between.
        self._discard_prepared()
        for inst in self.instances.values():
            for pf in inst.files.values():
                pf.close()


    # ------------------------------------------------------------------ boot and recovery

    @collector_paused()
    def reboot(self) -> LiveUpdate:
        """The machine the next boot of a simulated kexec finds: a new boot id, and
        whatever the image directory alone holds (call after the kexec event). It takes
        over the journal, which then holds it alone: the kexec is complete."""
        new = LiveUpdate.boot(self.image_dir, boot_id=str(uuid.uuid4()), kexec_count=self.kexec_count + 1,
                              policy=self.policy, on_progress=self.on_progress, park=self.record.park)
        # The same daemon lives on: what it measured and counted before the kexec stays true.
        new.last_freeze_seconds = self.last_freeze_seconds
        new.recovery_failures += self.recovery_failures
        new.carry_file_inos(self)
        new.record = self.record
        try:
            new.record.rewrite(new, (self.intent_request, 0))
        except KexecfsError as exc:
            new.last_error = f"journal: {exc.message}"
            log.error("after kexec: %s; a restart now would recover from the image", exc.message)
        self.intent = self.intent_request = None
        return new

    @classmethod
    def boot(cls, image_dir: Path, boot_id: str | None = None, kexec_count: int = 0,
             policy: Policy = Policy(), on_progress: Callable[[str], None] | None = None,
             park: Callable[[PreservedFile], None] | None = None) -> LiveUpdate:
        """A machine for a (re)started daemon: ``updated`` from an image if there is one.

        A damaged image is never half-loaded: it is renamed aside, the reason goes to
        ``last_error``, and the machine starts ``normal``. ``on_progress`` hears how the
        recovery goes, and later how slow events go. ``park`` takes each restored file's
        descriptor into the descriptor store as soon as it is made (the journal's
        :meth:`~.journal.Journal.park`): a recovery of more files than the daemon may hold
        descriptors must not hold them all.
        """
        image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(image_dir, 0o700)
        remove_unfinished_images(image_dir)
        path = image_dir / IMAGE_NAME
        machine = cls(image_dir, boot_id, kexec_count, policy)
        machine.on_progress = on_progress
        if not path.exists():
            return machine
        try:
            with collector_paused():
                machine._recover(path, park)
        except Exception as exc:
            # Damaged, or a bug met while recovering: either way the daemon comes up (a crash
            # here would repeat at every restart), and the image is kept for a fixed kexecfs.
            if not isinstance(exc, ImageError):
                log.exception("recovery of %s: unexpected error", path)
                exc = ImageError(f"unexpected {type(exc).__name__} while recovering {path}: {exc}")
            for inst in machine.instances.values():
                inst.drop_files()
            # Unique: a second damaged image in the same second must not replace the first.
            aside = path.with_name(f"{IMAGE_NAME}.damaged-{int(time.time())}-{uuid.uuid4().hex[:8]}")
            os.rename(path, aside)
            machine.last_error = f"recovery: {exc}; kept aside as {aside.name}"
            machine.recovery_failures += 1
            machine.progress = ""
            machine.instances.clear()
            machine.by_ino.clear()
            machine.state = State.NORMAL
            log.error("%s", machine.last_error)
        return machine

    def _recover(self, path: Path, park: Callable[[PreservedFile], None] | None = None) -> None:
        started = time.monotonic()
        image = HandoverImage.open(path)
        try:
            self.kexec_count = int(image.writer.get("kexec_count", 0)) + 1
            for rec in image.instances:  # (names were checked by the image reader)
                if rec["ino"] < FIRST_INSTANCE_INO or rec["ino"] % INO_STRIDE:
                    # Inode numbers of instances are the filesystem's: a stray one would alias other files.
                    raise ImageError(f"{path}: instance {rec['name']!r} has inode number {rec['ino']}, not one "
                                     f"kexecfs gives instances")
                inst = Instance(rec["name"], rec["ino"], rec["uid"], rec["gid"], rec["mode"],
                                max_files=rec.get("max_files"), max_bytes=rec.get("max_bytes"),
                                incoming=True)
                self.instances[inst.name] = self.by_ino[inst.ino] = inst
                self.next_ino = max(self.next_ino, inst.ino + INO_STRIDE)
            self.next_ino = max(self.next_ino, image.writer.get("next_instance_ino", 0))  # checked by the reader
            total = sum(e[1] for f in image.files for e in f.get("extents", []))
            done = 0
            report = self._progress("recovery")
            report(0, total)  # at once: a service manager hears that a long start has begun
            for rec in image.files:
                inst = self.instances.get(rec["instance"])
                kind = KINDS.get(rec["kind"])
                if inst is None or kind is None:
                    msg = f"{path}: skipped file token {rec['token']}: " + (
                        f"unknown instance {rec['instance']!r}" if inst is None else f"unknown kind {rec['kind']!r}")
                    image.warnings.append(msg)
                    log.warning("%s", msg)
                    continue
                inject("recover.file")
                pf = PreservedFile(rec["token"], kind, -1, rec, recovered=True)
                pf.ino = self._file_ino()
                inst.files[pf.token] = pf
                try:
                    pf.fd = kind.restore(rec, image)
                    if park is not None:
                        park(pf)
                except (KexecfsError, OSError) as exc:
                    # The file itself is gone (a regular file deleted on disk), or this boot
                    # lacks room for it: this one answers its errno at open; the rest is fine.
                    pf.error = exc if isinstance(exc, KexecfsError) else KexecfsError(
                        exc.errno or errno.EIO, f"restore of token {pf.token}: {exc.strerror or exc}")
                    log.warning("instance %r token %d cannot be restored: %s", inst.name, pf.token, pf.error.message)
                done += sum(e[1] for e in rec.get("extents", []))
                report(done, total)
        finally:
            image.close()
        self.state = State.UPDATED
        self.last_image = path
        self.last_recovery_seconds = time.monotonic() - started
        # Only a date the wall clock has passed (a clock set back, or a damaged value: unknown).
        freeze_started, now = image.writer.get("freeze_started"), time.time()
        if isinstance(freeze_started, float) and math.isfinite(freeze_started) and now >= freeze_started:
            self.last_blackout_seconds = now - freeze_started
        self.progress = ""
        log.info("recovered %s: %d instance(s), %d file(s), %d bytes of contents in %.3f s; state updated",
                 path, len(self.instances), sum(len(i.files) for i in self.instances.values()), total,
                 time.monotonic() - started)

    # ------------------------------------------------------------------ helpers

    def _files(self) -> list[tuple[Instance, PreservedFile]]:
        return [(inst, inst.files[t]) for inst in self.instances.values() for t in sorted(inst.files)]

    def _discard_prepared(self) -> None:
        if self._writer:
            self._writer.abort()
        self._writer, self._prepared = None, {}

    def _retire_image(self, why: str) -> None:
        """Keep the current image aside (never silently deleted), and only the last few."""
        path = self.image_dir / IMAGE_NAME
        if not path.exists():
            return
        retired = self.image_dir / "retired"
        retired.mkdir(mode=0o700, exist_ok=True)
        inject("retire.before_rename")
        target = retired / f"handover-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}-{why}.kximg"
        os.rename(path, target)
        for old in sorted(retired.glob("handover-*.kximg"), key=lambda p: p.stat().st_mtime)[:-RETIRED_KEPT]:
            old.unlink()
        log.info("image %s retired (%s) as %s", path.name, why, target)

    def _progress(self, phase: str) -> Callable[[int, int], None]:
        last = [0]

        def report(done: int, total: int) -> None:
            self.progress = f"{phase}: {done >> 20} MiB" + (f" of {total >> 20} MiB" if total else "")
            if done - last[0] >= 256 << 20:
                last[0] = done
                log.info("%s", self.progress)
        return report

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()


def remove_unfinished_images(image_dir: Path) -> None:
    """Images a dead daemon was writing (its prepare or freeze interrupted)."""
    for leftover in image_dir.glob(f".{IMAGE_NAME}.*.tmp"):
        log.warning("removing %s: an image that was never completed (prepare or freeze interrupted)", leftover)
        leftover.unlink()


class _about:
    """Prefix errors about one preserved file with where it is, keeping their errno."""

    def __init__(self, inst: Instance, pf: PreservedFile, phase: str) -> None:
        self.where = f"{phase}: instance {inst.name!r} token {pf.token}"
        self.fields = {"INSTANCE": inst.name, "TOKEN": pf.token}  # for the log line of the failed event
        # The whole update waits for this one file: say how the operator lets it go on.
        self.remedy = f"; to drop just this file: echo {pf.token} > {inst.name}/fd_unpreserve"

    def __enter__(self) -> None:
        return None

    def __exit__(self, typ: type | None, exc: BaseException | None, tb: object) -> bool:
        answer = refusal(exc) if exc is not None else None
        if answer is not None:
            text = answer.message if isinstance(exc, KexecfsError) else (exc.strerror or str(exc))  # type: ignore[union-attr]
            error = KexecfsError(answer.errno, f"{self.where}: {text}{self.remedy}")
            error.fields = self.fields  # type: ignore[attr-defined]
            raise error from None
        return False


def _file(pair: tuple[Instance, PreservedFile]) -> PreservedFile:
    return pair[1]


def _keep_restored(inst: Instance, record: Any) -> None:
    """At finish: drop the files nobody restored; restored ones become ordinary preserved
    files. One log line per instance that had recovered files says which were dropped."""
    kept, dropped = 0, []
    for token, pf in list(inst.files.items()):
        if pf.recovered and not pf.opened:
            record.file_removed(inst, pf)
            pf.close()
            del inst.files[token]
            dropped.append(token)
        elif pf.recovered:
            pf.recovered = False
            record.file_changed(inst, pf)
            kept += 1
    if kept or dropped:
        shown = ", ".join(map(str, dropped[:SHOWN_TOKENS])) + (", ..." if len(dropped) > SHOWN_TOKENS else "")
        log.log(logging.WARNING if dropped else logging.INFO,
                "instance %r: %d restored file(s) kept, %d never restored and dropped%s", inst.name, kept,
                len(dropped), f" (tokens {shown})" if dropped else "", extra={"INSTANCE": inst.name})


def _groups_of(caller: Caller) -> set[int]:
    """The caller's primary and supplementary groups (FUSE only reports the primary one)."""
    groups = {caller.gid}
    try:
        with open(f"/proc/{caller.pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    groups.update(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return groups
