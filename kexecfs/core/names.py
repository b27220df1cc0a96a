"""Instance names, and how a LUO session's name appears in the tree.

An instance directory is named by the tree's rule (SPEC 1): 1-63 characters of
``[A-Za-z0-9._-]``, not starting with ``.``, not a top-level file's name. A session
(SPEC 6b) may be named by any 1-63 bytes without NUL: spaces, ``/`` and all. Such a name
is percent-escaped into a directory name: every byte outside ``[A-Za-z0-9._-]`` becomes
``%XX`` (upper-case hex), and so does a leading ``.`` and the first letter of a
top-level file's name (``state`` becomes ``%73tate``). ``%`` is not an instance-name
character, so escaped names never collide with plain ones, and each session name has
exactly one directory name.
"""

from __future__ import annotations

import errno
import re

from .errors import fail

TOP_LEVEL_NAMES = frozenset({"state", "control", "status"})
_NAME = re.compile(r"[A-Za-z0-9._-]{1,63}")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")
SESSION_NAME_MAX = 63  # bytes, without the NUL


def is_plain_name(name: str) -> bool:
    return bool(_NAME.fullmatch(name)) and not name.startswith(".") and name not in TOP_LEVEL_NAMES


def check_name(name: str) -> None:
    """EINVAL unless ``name`` may name an instance: a plain name, or an escaped session name."""
    if is_plain_name(name):
        return
    session = session_name(name)
    if session is None:
        raise fail(errno.EINVAL, f"{name[:80]!r} is not a valid instance name: 1-63 characters of "
                                 f"[A-Za-z0-9._-], not starting with '.', not state/control/status")


def directory_name(session: bytes) -> str:
    """The directory of the session called ``session`` (EINVAL for a name LUO refuses)."""
    if not 1 <= len(session) <= SESSION_NAME_MAX or b"\0" in session:
        raise fail(errno.EINVAL, f"session name {session[:80]!r}: 1-63 bytes without NUL")
    text = session.decode("latin-1")
    if is_plain_name(text):
        return text
    out = [c if ord(c) in _SAFE else f"%{ord(c):02X}" for c in text]
    if text.startswith(".") or text in TOP_LEVEL_NAMES:
        out[0] = f"%{ord(text[0]):02X}"
    return "".join(out)


def session_name(directory: str) -> bytes | None:
    """The session name a directory stands for; None if it is no canonical escape of one."""
    if is_plain_name(directory):
        return directory.encode()
    raw = bytearray()
    i = 0
    while i < len(directory):
        c = directory[i]
        if c == "%":
            digits = directory[i + 1:i + 3]
            if len(digits) != 2 or not all(d in "0123456789ABCDEF" for d in digits):
                return None
            raw.append(int(digits, 16))
            i += 3
        elif ord(c) in _SAFE:
            raw.append(ord(c))
            i += 1
        else:
            return None
    try:
        canonical = directory_name(bytes(raw))
    except Exception:
        return None
    return bytes(raw) if canonical == directory else None
