"""The machine a restarted daemon resumes: the journal's instances and files, each file
paired with the descriptor the store kept for it (see :mod:`.journal`).

A restart is not a kexec: the kernel, the services and their descriptors are the same,
so the machine comes back exactly as it was, in whatever state it was (``prepared``
included: its pre-serialised image is made again, since the daemon that wrote it is
gone). A slow event the crash interrupted (its ``intent`` is still in the journal) ends
up before or after itself, never in between, by what the image directory shows:

=========  ============================================  ===========================
intent     after (the event is done) when                else before
=========  ============================================  ===========================
prepare    never (the image in the making is discarded)  the journaled state
freeze     the image is committed, written by this       prepared (prepared again)
           machine
kexec      the image is committed by this machine, or    prepared (prepared again)
           the kexec was a plain one (from normal):
           the next boot's machine, from the image
finish     the image was retired                         updated
cancel     the image is gone, or it was only prepared    frozen
=========  ============================================  ===========================
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .descriptors import DescriptorCache
from .errors import KexecfsError
from .image import IMAGE_NAME, HandoverImage, ImageError
from .instance import Instance, PreservedFile
from .journal import JournalState
from .kinds import KINDS
from .machine import INO_STRIDE, LiveUpdate, Policy, State, remove_unfinished_images

log = logging.getLogger("kexecfs.resume")


class Resumed:
    """A machine rebuilt from a journal, and what the journal needs to carry on with it."""

    def __init__(self, machine: LiveUpdate, names: dict[tuple[int, int], str], next_name: int,
                 requests: dict[int, int], lost: list[str], stale: list[str]) -> None:
        self.machine = machine
        self.names = names  # (instance ino, token) -> the store name of its descriptor
        self.next_name = next_name
        self.requests = requests  # unique -> errno of requests done (a resent one is not done again)
        self.lost = lost  # files whose descriptor the store did not have (a bug if ever non-empty)
        self.stale = stale  # store names of files the resumed machine no longer has


def resume(image_dir: Path, state: JournalState, held: dict[str, int], policy: Policy,
           on_progress: Callable[[str], None] | None = None, cache: DescriptorCache | None = None,
           park: Callable[[PreservedFile], None] | None = None) -> Resumed:
    """The journal's machine; takes the descriptors it uses out of ``held``: a descriptor,
    or -1 for one that stays in the store, fetched through ``cache`` when needed (so a
    restart fetches none of them). ``on_progress`` hears how a prepare made again, or the
    recovery of an interrupted kexec, goes; ``park`` stores the files that recovery makes."""
    remove_unfinished_images(image_dir)
    m, fields = LiveUpdate(image_dir, state.machine["boot_id"], state.machine["kexec_count"], policy), state.machine
    m.on_progress = on_progress
    m.state = State[fields["state"].upper()]
    m.last_image = Path(fields["last_image"]) if fields.get("last_image") else None
    m.last_error = fields.get("last_error") or ""
    m.next_ino, m.next_file_ino = fields["next_ino"], fields["next_file_ino"]
    for rec in state.instances.values():
        inst = Instance(rec["name"], rec["ino"], rec["uid"], rec["gid"], rec["mode"], max_files=rec["max_files"],
                        max_bytes=rec["max_bytes"], finished=rec["finished"], incoming=rec["incoming"],
                        session=rec["session"])
        m.instances[inst.name] = m.by_ino[inst.ino] = inst
    names, missing = _files(m, state, held, cache)
    # Instances and files made since the last machine record (preserves and mkdirs journal
    # no machine record) must not have their inode numbers given out again.
    m.next_ino = max([m.next_ino] + [i.ino + INO_STRIDE for i in m.instances.values()])
    m.next_file_ino = max([m.next_file_ino] + [pf.ino + 1 for i in m.instances.values() for pf in i.files.values()])
    requests = dict(state.requests)
    stale: list[str] = []
    intent = fields.get("intent")
    if intent:
        after = _settle(m, intent)
        if after and fields.get("intent_request") is not None:
            requests[fields["intent_request"]] = 0  # done: the resent request is answered as done
        log.info("the previous daemon died during %s: resumed %s it (state %s)", intent,
                 "after" if after else "before", m.state.word)
        if after and intent == "kexec":
            # The old kernel's descriptors are not needed (and may be released already, see
            # Journal.rewrite): its files only lend their inode numbers to the next boot's.
            m, stale, names, missing = _next_boot(m, park), sorted(set(names.values())), {}, []
        elif after and intent == "finish":
            stale = sorted(set(names.values()) - {names[i.ino, t] for i in m.instances.values() for t in i.files
                                                  if (i.ino, t) in names})
            names = {k: v for k, v in names.items() if v not in stale}
    lost = _drop_missing(missing)
    if m.state is State.PREPARED:
        _prepare_again(m)
    return Resumed(m, names, state.next_name, requests, lost, stale)


Missing = list[tuple[Instance, int, str]]  # files whose descriptor the store does not hold: instance, token, name


def _drop_missing(missing: Missing) -> list[str]:
    """Files journaled but not in the store are lost: dropped, each with a log line."""
    for inst, token, name in missing:
        log.error("instance %r token %d: the store has no descriptor %r; the file is lost", inst.name, token, name)
        del inst.files[token]
    return [f"{inst.name}/{token}" for inst, token, _name in missing]


def _files(m: LiveUpdate, state: JournalState, held: dict[str, int],
           cache: DescriptorCache | None) -> tuple[dict[tuple[int, int], str], Missing]:
    names: dict[tuple[int, int], str] = {}
    taken: set[str] = set()
    missing: Missing = []
    for (instance, token), rec in state.files.items():
        inst, kind = m.instances.get(instance), KINDS.get(rec["kind"])
        if inst is None or kind is None:
            continue
        name = rec.get("fd")
        fd, stored = -1, None
        if name is not None:
            if name not in held:
                missing.append((inst, token, name))  # kept listed until resume knows if it matters
            else:
                if held[name] >= 0:
                    # One open file preserved twice is stored once: each file holds its own descriptor.
                    fd = os.dup(held[name]) if name in taken else held[name]
                else:
                    stored = name  # the store keeps it; fetched through the cache when needed
                taken.add(name)
                names[inst.ino, token] = name
        pf = PreservedFile(token, kind, fd, rec["record"], recovered=rec["recovered"], opened=rec["opened"])
        if stored is not None:
            pf.stored, pf.cache = stored, cache
        if rec.get("inode"):
            pf.inode = (rec["inode"][0], rec["inode"][1])
        pf.ino = rec["ino"]
        if rec.get("error"):
            pf.error = KexecfsError(rec["error"][0], rec["error"][1])
        inst.files[token] = pf
    for name in taken:
        del held[name]
    return names, missing


def _ours(m: LiveUpdate) -> bool:
    """Whether the current image is complete and written by this machine (a freeze of it)."""
    path = m.image_dir / IMAGE_NAME
    try:
        image = HandoverImage.open(path)
    except ImageError:
        return False
    try:
        return image.writer.get("boot_id") == m.boot_id and image.writer.get("kexec_count") == m.kexec_count
    finally:
        image.close()


def _settle(m: LiveUpdate, intent: str) -> bool:
    """Put ``m`` before or after the interrupted ``intent``; True if after."""
    image = (m.image_dir / IMAGE_NAME).exists()
    if intent == "freeze" and _ours(m):
        m.state, m.last_image = State.FROZEN, m.image_dir / IMAGE_NAME
        return True
    if intent == "kexec" and (m.state is State.NORMAL or _ours(m)):
        return True
    if intent == "finish" and not image:
        m.finish_resumed()
        return True
    if intent == "cancel" and (m.state is State.PREPARED or not image):
        m.state = State.NORMAL
        return True
    return False


def _next_boot(m: LiveUpdate, park: Callable[[PreservedFile], None] | None) -> LiveUpdate:
    """Complete an interrupted simulated kexec: the next boot's machine, from the image.
    The old machine's descriptors die with its kernel, as in the kexec itself, but its
    files stay listed: the next boot's files take their inode numbers from them."""
    for inst in m.instances.values():
        for pf in inst.files.values():
            pf.close()
    nxt = LiveUpdate.boot(m.image_dir, boot_id=str(uuid.uuid4()), kexec_count=m.kexec_count + 1, policy=m.policy,
                          on_progress=m.on_progress, park=park)
    nxt.carry_file_inos(m)
    return nxt


def _prepare_again(m: LiveUpdate) -> None:
    """A machine that was prepared is prepared again: the image its prepare wrote died with
    the daemon (the temporary file is removed at boot). If that fails now, it is normal."""
    try:
        m.prepare_again()
    except KexecfsError as exc:
        m.state = State.NORMAL
        m.last_error = f"prepare again after a restart: {exc.message}"
        log.error("%s; the machine is normal", m.last_error)


def describe(state: JournalState) -> dict[str, Any]:
    return {"state": state.machine.get("state"), "instances": len(state.instances), "files": len(state.files)}
