"""A daemon restart nobody notices: the FUSE connection is kept in the descriptor store,
and a restarted daemon serves that very connection instead of mounting a new one.

The connection is two descriptors in the store (:mod:`.fdstore`):

- ``fuse``: the ``/dev/fuse`` descriptor. The kernel keeps a connection for as long as
  one descriptor of it is open, so every mount and bind mount of it keeps working
  while no daemon runs; requests made meanwhile wait, as they would for a slow daemon.
- ``fuse-init``: a memfd in which the extension records the FUSE_INIT exchange once the
  first daemon has answered it. The kernel sends INIT once per connection; a restarted
  daemon replays the recording to libfuse (see ``fusehook-c/connection.c``).

The first daemon of a mount mounts as before and then stores both. A later daemon finds
them, checks that the connection is alive (``poll`` reports POLLERR on a connection the
kernel has aborted: after an unmount, or if the last descriptor was closed) and adopts
it: ``pyfuse3.init()`` mounts ``/dev/fd/N``, which libfuse takes as an open connection.
The extension then asks the kernel to send again what the dead daemon had read and not
answered. Its callers never see ENOTCONN.

Stopping the daemon (SIGTERM: ``systemctl restart``, an upgrade) leaves the connection
in the store; an unmount ends the filesystem, and the store is emptied.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import select
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ..core.descriptors import DescriptorCache
from ..core.journal import JOURNAL_NAME, Journal, JournalDamaged, JournalState, NoJournal, load
from ..core.machine import LiveUpdate, Policy, collector_paused, kernel_boot_id
from ..core.resume import resume
from . import fusehook
from .fdstore import DescriptorStore, KeeperStore
from .sessions import mount_device

log = logging.getLogger("kexecfs.restart")

CONNECTION = "fuse"
INIT_RECORD = "fuse-init"
RECORD_SIZE = 4096  # more than the extension's struct init_record
CACHE_SIZE = 1024  # stored descriptors the daemon keeps copies of, at most (see core.descriptors)


@dataclass
class Connection:
    """The connection a daemon serves: mounted by it, or adopted from the store."""

    mountpoint: Path
    target: str  # what pyfuse3.init() mounts: the mount point, or /dev/fd/N of the adopted one
    adopted: bool
    record_fd: int

    def kept(self, store: DescriptorStore) -> None:
        """After ``pyfuse3.init()``: a new connection goes into the store, the record first
        (a connection kept without its record could not be adopted)."""
        if self.adopted:
            status = fusehook.connection_status()
            self.store = store
            # Keepers started from now on (a new shard, a dead keeper's replacement) get it too.
            store.connection_known(INIT_RECORD, self.record_fd)
            store.connection_known(CONNECTION, fusehook.session_fd())
            log.info("adopted the FUSE connection of %s from the %s store (requests resent: %s)",
                     self.mountpoint, store.kind, status["resend"])
            if mount_device(str(self.mountpoint)) is None:
                log.warning("%s is no longer mounted; serving its bind mounts", self.mountpoint)
            return
        self.store_in(store)

    def store_in(self, store: DescriptorStore) -> None:
        self.store = store
        store.keep(INIT_RECORD, self.record_fd)
        store.keep(CONNECTION, fusehook.session_fd(), watch=True)


class HandleNumbers:
    """File handle numbers for the opens of a connection, never one that an open file of a
    previous daemon of the same connection may still hold: the kernel keeps sending a
    file's handle until the file is closed, so a number given twice would send one
    file's requests (its release, say) to another's handle.

    The high-water mark lives in the connection's INIT record memfd, past the extension's
    record, in blocks: one write per HANDLE_BLOCK opens. A restarted daemon starts at the
    end of the last block reserved."""

    AT = 2048
    BLOCK = 1 << 16

    def __init__(self, record_fd: int) -> None:
        self.fd = record_fd
        data = os.pread(record_fd, 8, self.AT)
        self.next = max(struct.unpack("<Q", data)[0] if len(data) == 8 else 0, 1)
        self.reserved = self.next
        self._reserve()

    def __iter__(self) -> HandleNumbers:
        return self

    def __next__(self) -> int:
        if self.next >= self.reserved:
            self._reserve()
        number, self.next = self.next, self.next + 1
        return number

    def _reserve(self) -> None:
        self.reserved = self.next + self.BLOCK
        os.pwrite(self.fd, struct.pack("<Q", self.reserved), self.AT)


async def replace_a_dead_keeper(conn: Connection) -> None:
    """While this daemon serves, its keepers must live: a keeper that died (killed by
    someone) took its descriptors with it, and one more death would lose them. The other
    keeper of its shard holds them all: a new keeper gets them from it."""
    store = getattr(conn, "store", None)
    keepers = store if isinstance(store, KeeperStore) else getattr(store, "keepers", None)
    while isinstance(keepers, KeeperStore):
        # The watch connections never carry a word: one turns readable when its keeper dies.
        # Looked at again every second, for the keepers of shards started meanwhile.
        with trio.move_on_after(1):
            async with trio.open_nursery() as nursery:
                for member in keepers.members():
                    nursery.start_soon(_ended, member.watch, nursery.cancel_scope)
        dead = keepers.dead_members()
        if dead and not alive(fusehook.session_fd()):
            return  # the filesystem ended (unmounted), and the keepers with it, as they should
        for shard, n, member in dead:
            log.error("the keeper (pid %d) died; starting another and giving it what it held", member.pid)
            new = keepers.replace(shard, n)
            log.info("the new keeper (pid %d) holds the connection and every preserved descriptor", new.pid)


async def _ended(sock: object, scope: trio.CancelScope) -> None:
    await trio.lowlevel.wait_readable(sock)
    scope.cancel()


def alive(fd: int) -> bool:
    """Whether the kernel still has the connection of ``fd`` (POLLERR once it is aborted)."""
    poller = select.poll()
    poller.register(fd, 0)
    return not any(events & (select.POLLERR | select.POLLHUP | select.POLLNVAL) for _, events in poller.poll(0))


def connect(mountpoint: Path, store: DescriptorStore, held: dict[str, int]) -> Connection:
    """The connection to serve: the stored one if it is alive, else a new mount.

    Consumes ``fuse`` and ``fuse-init`` from ``held`` (the store's descriptors)."""
    fuse, record = held.pop(CONNECTION, None), held.pop(INIT_RECORD, None)
    if fuse is not None and record is not None and alive(fuse):
        fusehook.adopt_connection(os.pread(record, RECORD_SIZE, 0))
        fusehook.record_init_exchange(record)  # where the backing table goes on
        return Connection(mountpoint, f"/dev/fd/{fuse}", True, record)
    for name, fd in ((CONNECTION, fuse), (INIT_RECORD, record)):
        if fd is not None:
            log.info("the stored FUSE connection of %s is gone; mounting anew", mountpoint)
            os.close(fd)
            store.release(name)
    clear_dead_mount(mountpoint)
    record = os.memfd_create("kexecfs-fuse-init", os.MFD_CLOEXEC)
    fusehook.record_init_exchange(record)
    return Connection(mountpoint, str(mountpoint), False, record)


def clear_dead_mount(mountpoint: Path) -> None:
    """A connection that died (its daemon killed with no store holding it) leaves its mount
    answering ENOTCONN; a new mount replaces it. So does a live one that no store handed
    over (a request to it would wait for ever): its bind mounts stay with it."""
    answer: list[BaseException | None] = []

    def probe() -> None:
        try:
            # statfs always reaches the daemon; stat may be answered from the attribute
            # cache for a second after the daemon died.
            os.statvfs(mountpoint)
            answer.append(None)
        except OSError as exc:
            answer.append(exc)
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    prober.join(5)
    exc = answer[0] if answer else TimeoutError()
    if isinstance(exc, TimeoutError) or (isinstance(exc, OSError) and exc.errno == errno.ENOTCONN):
        log.warning("%s is the mount of a daemon that %s; detaching it", mountpoint,
                    "died" if answer else "is gone while its connection lives on, handed to no one")
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
    elif exc is not None and not isinstance(exc, FileNotFoundError):
        raise exc
    mountpoint.mkdir(parents=True, exist_ok=True)


def machine_for(image_dir: Path, policy: Policy, store: DescriptorStore, held: dict[str, int],
                conn: Connection, on_progress: Callable[[str], None] | None = None) -> LiveUpdate:
    """The machine to serve: the journal's, on the adopted connection of the same kernel
    boot, with the descriptors ``held`` gave back; else one booted from the image
    directory (``updated`` if there is an image) as after a kexec. Either way it is then
    journaled as one snapshot, and stored descriptors it does not use are released.
    ``on_progress`` hears how a recovery or a prepare made again goes."""
    kernel = kernel_boot_id()
    machine = None
    fetching = getattr(store, "fetch", None) is not None
    # What the daemon holds of stored files at once: a few, well under its own limit.
    cache = DescriptorCache(store, min(CACHE_SIZE, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4)) \
        if fetching else None  # type: ignore[arg-type]
    if store.kind == "none":
        machine = LiveUpdate.boot(image_dir, policy=policy, on_progress=on_progress)
        _release(store, held)
        return machine
    journal = Journal(image_dir, store, kernel, cache)
    # Names new files get are past every name the store holds (recovery parks files before
    # any journal frame: a name the journal does not give yet must not be one in use).
    journal.next_name = 1 + max((int(n[1:]) for n in held if n[:1] == "f" and n[1:].isdigit()), default=-1)
    state = _journal(image_dir, kernel)
    if state is not None and conn.adopted and state.machine.get("kernel_boot_id") == kernel:
        journal.next_name = max(journal.next_name, state.next_name)
        resumed = resume(image_dir, state, held, policy, on_progress, cache, journal.park)
        machine = resumed.machine
        journal.adopt(machine, resumed.names, max(resumed.next_name, journal.next_name), resumed.requests)
        for name in resumed.stale:
            store.release(name)
        log.info("resumed from the journal: state %s, %d instance(s), %d file(s)%s", machine.state.word,
                 len(machine.instances), sum(len(i.files) for i in machine.instances.values()),
                 f"; LOST {len(resumed.lost)}: {', '.join(resumed.lost)}" if resumed.lost else "")
    elif state is not None:
        why = "another kernel boot wrote it" if state.machine.get("kernel_boot_id") != kernel else \
            "its connection (and the descriptors with it) ended"
        log.warning("the journal of %d instance(s) and %d file(s) is not used: %s; booting from the image directory",
                    len(state.instances), len(state.files), why)
    if machine is None:
        _release(store, held)
        machine = LiveUpdate.boot(image_dir, policy=policy, on_progress=on_progress, park=journal.park)
    _release(store, held)
    machine.record = journal
    try:
        with collector_paused():  # after a real kexec, part of the blackout (see collector_paused)
            journal.rewrite(machine)
    except Exception as exc:  # a full disk must not keep the daemon from serving
        machine.record = NoJournal()
        machine.last_error = f"journal: {exc}; a restart of this daemon will lose what it holds"
        log.error("%s", machine.last_error)
    return machine


def _journal(image_dir: Path, kernel: str) -> JournalState | None:
    path = image_dir / JOURNAL_NAME
    try:
        return load(path, kernel)
    except JournalDamaged as exc:
        aside = path.with_name(f"{JOURNAL_NAME}.damaged")
        os.replace(path, aside)
        log.error("the journal is damaged (%s); kept aside as %s, booting from the image directory", exc, aside.name)
        return None


def _release(store: DescriptorStore, held: dict[str, int]) -> None:
    """Descriptors in the store that nothing needs: a crash between storing one and the
    journal frame naming it, or what a journal not used any more held."""
    for name, fd in held.items():
        if fd >= 0:
            os.close(fd)
        store.release(name)
    held.clear()
