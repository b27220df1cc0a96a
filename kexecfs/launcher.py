"""``kexecfs run -- PROGRAM``: an unmodified LUO program on kexecfs (SPEC 9).

The program sees kexecfs's top-level ``control`` as ``/dev/liveupdate`` (a bind mount in
a mount namespace of its own; with a user namespace when run unprivileged). The calls
that return a descriptor (CREATE_SESSION, RETRIEVE_SESSION, SESSION_RETRIEVE_FD, v1
FD_RESTORE) cannot be completed by a FUSE server, so a seccomp filter sends exactly those
ioctl numbers to this launcher (user notification; no other syscall is notified). The
launcher forwards each one to the daemon with kexecfs's own number for it, opens what
the daemon granted (the session's ``control``, or ``fds/<token>``), installs it in the
caller with SECCOMP_IOCTL_NOTIF_ADDFD (O_CLOEXEC), writes the number into the caller's
struct and answers 0, as LUO does. An ioctl with one of those numbers on any other file
continues to the kernel untouched.

Nothing dying leaves a caller hung: if this launcher dies, the kernel fails its pending
and later notified calls (ENOSYS); if the daemon dies, the forwarded call fails
(ENOTCONN) and so does the caller's; if the caller dies, its notification goes stale and
is dropped (checked with SECCOMP_IOCTL_NOTIF_ID_VALID before anything is installed).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import socket
import struct
import sys
from pathlib import Path

from . import abi
from .client import _open_flags
from .core.capture import open_pidfd
from .core.names import directory_name
from .core.syscalls import FUSE_SUPER_MAGIC, fstatfs_type, pidfd_getfd, read_memory, write_memory

log = logging.getLogger("kexecfs.run")
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]

# <linux/seccomp.h>, <linux/filter.h>, <linux/audit.h> (x86-64)
_SYS_SECCOMP, _SYS_IOCTL = 317, 16
_SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER = 1, 1 << 3
_SECCOMP_RET_ALLOW, _SECCOMP_RET_USER_NOTIF = 0x7FFF0000, 0x7FC00000
_AUDIT_ARCH_X86_64 = 0xC000003E
_BPF_LD_W_ABS, _BPF_JEQ_K, _BPF_RET_K = 0x20, 0x15, 0x06
_NOTIF = struct.Struct("=QII64s")  # struct seccomp_notif: id, pid, flags, struct seccomp_data
_NOTIF_RESP = struct.Struct("=QqiI")  # struct seccomp_notif_resp: id, val, error, flags
_ADDFD = struct.Struct("=QIIII")  # struct seccomp_notif_addfd: id, flags, srcfd, newfd, newfd_flags
_IOCTL_NOTIF_RECV, _IOCTL_NOTIF_SEND = 0xC0502100, 0xC0182101
_IOCTL_NOTIF_ID_VALID, _IOCTL_NOTIF_ADDFD = 0x40082102, 0x40182103
_USER_NOTIF_FLAG_CONTINUE = 1
_PR_SET_NO_NEW_PRIVS = 38
_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_MS_BIND, _MS_REC, _MS_PRIVATE = 0x1000, 0x4000, 1 << 18
_STRUCT_CAP = 1 << 20  # the largest caller struct forwarded (the kernel's are 72 bytes)


def _filter() -> bytes:
    """BPF: notify ioctl(fd, cmd, ...) for the intercepted ``cmd`` numbers; allow the rest."""
    cmds = list(abi.INTERCEPTED)
    prog = [(_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
            (_BPF_JEQ_K, 1, 0, _AUDIT_ARCH_X86_64),
            (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
            (_BPF_LD_W_ABS, 0, 0, 0),  # .nr
            (_BPF_JEQ_K, 1, 0, _SYS_IOCTL),
            (_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW),
            (_BPF_LD_W_ABS, 0, 0, 24)]  # low word of .args[1], the command
    for n, cmd in enumerate(cmds):
        prog.append((_BPF_JEQ_K, len(cmds) - n, 0, cmd))  # to the USER_NOTIF return below
    prog += [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), (_BPF_RET_K, 0, 0, _SECCOMP_RET_USER_NOTIF)]
    return b"".join(struct.pack("=HBBI", *insn) for insn in prog)


def _install_filter() -> int:
    code = _filter()
    buf = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("=HxxxxxxQ", len(code) // 8, ctypes.addressof(buf))
    pbuf = ctypes.create_string_buffer(prog, len(prog))
    if os.geteuid() != 0 and _libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
    fd = _libc.syscall(_SYS_SECCOMP, _SECCOMP_SET_MODE_FILTER, _SECCOMP_FILTER_FLAG_NEW_LISTENER, pbuf)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "seccomp(SECCOMP_SET_MODE_FILTER, NEW_LISTENER)")
    return fd


def _mount(source: str, target: str, fstype: str | None, flags: int) -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode() if fstype else None, flags, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {source} on {target}: {os.strerror(err)}")


def _enter_namespaces() -> None:
    """A mount namespace of the program's own (in a user namespace when unprivileged)."""
    uid, gid = os.getuid(), os.getgid()
    flags = _CLONE_NEWNS | (_CLONE_NEWUSER if uid != 0 else 0)
    if _libc.unshare(flags) != 0:
        raise OSError(ctypes.get_errno(), "unshare")
    if uid != 0:  # the same ids inside, so FUSE and the daemon see the caller as it is
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
        Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    _mount("none", "/", None, _MS_REC | _MS_PRIVATE)


def _show_as_dev_liveupdate(control: str) -> None:
    """Bind the control file on /dev/liveupdate. Where the kernel has no such node, /dev
    becomes a tmpfs holding a bind of every entry of the real one, plus the new file."""
    if not os.path.exists("/dev/liveupdate"):
        # The descriptor keeps the real /dev reachable once the tmpfs covers it.
        stash = f"/proc/self/fd/{os.open('/dev', os.O_PATH | os.O_DIRECTORY)}"
        entries = os.listdir("/dev")
        _mount("tmpfs", "/dev", "tmpfs", 0)
        for name in entries:
            source, target = f"{stash}/{name}", f"/dev/{name}"
            if os.path.islink(source):
                os.symlink(os.readlink(source), target)
                continue
            if os.path.isdir(source):
                os.mkdir(target)
            else:
                open(target, "w").close()
            _mount(source, target, None, _MS_BIND | _MS_REC)
        open("/dev/liveupdate", "w").close()
    _mount(control, "/dev/liveupdate", None, _MS_BIND)


class Launcher:
    """Runs one program under the seccomp helper and serves its notifications until it exits."""

    def __init__(self, mount: Path) -> None:
        self.mount = mount
        st = os.stat(mount)
        self.device = st.st_dev

    def run(self, argv: list[str]) -> int:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        pid = os.fork()
        if pid == 0:
            parent.close()
            self._child(child, argv)
        child.close()
        msg, fds, _flags, _addr = socket.recv_fds(parent, 256, 1)
        parent.close()
        if not fds:
            os.waitpid(pid, 0)
            print(f"kexecfs run: {msg.decode(errors='replace')}", file=sys.stderr)
            return 1
        return self._serve(fds[0], pid)

    def _child(self, sock: socket.socket, argv: list[str]) -> None:
        try:
            _enter_namespaces()
            _show_as_dev_liveupdate(str(self.mount / "control"))
            listener = _install_filter()
            socket.send_fds(sock, [b"ok"], [listener])
            os.close(listener)
            sock.close()
            os.execvp(argv[0], argv)
        except OSError as exc:
            try:
                sock.sendall(f"cannot start {argv[0]}: {exc}".encode())
            finally:
                os._exit(127)
        os._exit(127)

    def _serve(self, listener: int, pid: int) -> int:
        pidfd = os.pidfd_open(pid)
        poll = select.poll()
        poll.register(listener, select.POLLIN)
        poll.register(pidfd, select.POLLIN)
        while True:
            ready = dict(poll.poll())
            if listener in ready and ready[listener] & select.POLLIN:
                self._one(listener)
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                os.close(listener)
                code = os.waitstatus_to_exitcode(status)
                return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as shells say

    def _one(self, listener: int) -> None:
        buf = ctypes.create_string_buffer(_NOTIF.size)
        if _libc.ioctl(listener, _IOCTL_NOTIF_RECV, buf) != 0:
            return  # the caller died before we read it (ENOENT), or an interrupted read
        notif_id, tid, _flags, data = _NOTIF.unpack(buf.raw)
        args = struct.unpack_from("=6Q", data, 16)
        try:
            answer = self._forward(listener, notif_id, tid, args[0], args[1] & 0xFFFFFFFF, args[2])
        except OSError as exc:
            answer = -(exc.errno or errno.EIO)
        except Exception:
            log.exception("kexecfs run: unexpected error; answering EIO")
            answer = -errno.EIO
        self._reply(listener, notif_id, answer)

    def _reply(self, listener: int, notif_id: int, answer: int | None) -> None:
        if answer is None:
            resp = _NOTIF_RESP.pack(notif_id, 0, 0, _USER_NOTIF_FLAG_CONTINUE)
        else:
            resp = _NOTIF_RESP.pack(notif_id, 0, answer if answer < 0 else 0, 0)
        rbuf = ctypes.create_string_buffer(resp, len(resp))
        _libc.ioctl(listener, _IOCTL_NOTIF_SEND, rbuf)  # ENOENT: the caller is gone meanwhile

    def _forward(self, listener: int, notif_id: int, tid: int, fd: int, cmd: int, ptr: int) -> int | None:
        """The caller's call, done for it; None lets a call on another file go on to the kernel."""
        pidfd = open_pidfd(tid)
        try:
            theirs = pidfd_getfd(pidfd, fd)
        finally:
            os.close(pidfd)
        try:
            st = os.fstat(theirs)
            if fstatfs_type(theirs) != FUSE_SUPER_MAGIC or st.st_dev != self.device:
                return None
            if cmd == abi.FD_RESTORE:
                return self._v1_restore(listener, notif_id, tid, theirs, st.st_ino, ptr)
            return self._session_call(listener, notif_id, tid, theirs, st.st_ino, cmd, ptr)
        finally:
            os.close(theirs)

    def _session_call(self, listener: int, notif_id: int, tid: int, theirs: int, ino: int, cmd: int,
                      ptr: int) -> int:
        (usize,) = struct.unpack("=I", read_memory(tid, ptr, 4))
        raw = read_memory(tid, ptr, min(max(usize, 4), _STRUCT_CAP))
        if cmd == abi.SESSION_RETRIEVE_FD:
            token = struct.unpack_from("=Q", raw, 8)[0] if len(raw) >= abi.SESSION_FD.size else 0
            return self._retrieve_fd(listener, notif_id, tid, theirs, self._instance_dir(ino), token, raw, ptr + 4)
        buf = ctypes.create_string_buffer(raw, len(raw))
        if _libc.ioctl(theirs, abi.INTERCEPTED[cmd], buf) != 0:
            return -ctypes.get_errno()
        name = abi.SESSION.unpack(buf.raw[:abi.SESSION.size])[2].split(b"\0", 1)[0]
        session = os.open(self.mount / directory_name(name) / "control", os.O_RDWR | os.O_CLOEXEC)
        return self._install(listener, notif_id, tid, session, ptr + 4)

    def _v1_restore(self, listener: int, notif_id: int, tid: int, theirs: int, ino: int, ptr: int) -> int:
        _fd, _flags, token = abi.LIVEUPDATE_FD.unpack(read_memory(tid, ptr, abi.LIVEUPDATE_FD.size))
        directory = self.mount / "default" if ino == _TOP_CONTROL_INO else self._instance_dir(ino)
        raw = abi.SESSION_FD.pack(abi.SESSION_FD.size, -1, token)
        return self._retrieve_fd(listener, notif_id, tid, theirs, directory, token, raw, ptr)

    def _retrieve_fd(self, listener: int, notif_id: int, tid: int, theirs: int, directory: Path, token: int,
                     raw: bytes, fd_field: int) -> int:
        """The restored file: sent by the daemon over a socket pair (the file itself), or,
        for a file preserved O_APPEND, ``fds/<token>`` opened with the preserved access."""
        mine, daemons = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with mine, daemons:
            buf = ctypes.create_string_buffer(raw, len(raw))
            if len(raw) >= abi.SESSION_FD.size:  # (a shorter one is the daemon's to refuse: EINVAL)
                struct.pack_into("=i", buf, 4, daemons.fileno())
            if _libc.ioctl(theirs, abi.RUN_RETRIEVE_FD, buf) != 0:
                return -ctypes.get_errno()
            if struct.unpack_from("=i", buf.raw, 4)[0] == 0:
                _msg, fds, _flags, _addr = socket.recv_fds(mine, 16, 1, socket.MSG_CMSG_CLOEXEC)
                restored = fds[0]
            else:
                access = _open_flags(_listed_access(directory, token))
                restored = os.open(directory / "fds" / str(token), access | os.O_CLOEXEC)
        return self._install(listener, notif_id, tid, restored, fd_field)

    def _install(self, listener: int, notif_id: int, tid: int, ours: int, fd_field: int) -> int:
        """Give ``ours`` (closed here) to the caller; its number goes to the caller's ``fd_field``."""
        try:
            write_memory(tid, fd_field, read_memory(tid, fd_field, 4))  # writable, before anything is installed
            if _libc.ioctl(listener, _IOCTL_NOTIF_ID_VALID, ctypes.byref(ctypes.c_uint64(notif_id))) != 0:
                return -errno.ESRCH  # the caller is gone: nothing to install into
            addfd = ctypes.create_string_buffer(_ADDFD.pack(notif_id, 0, ours, 0, os.O_CLOEXEC), _ADDFD.size)
            number = _libc.ioctl(listener, _IOCTL_NOTIF_ADDFD, addfd)
            if number < 0:
                return -ctypes.get_errno()
        finally:
            os.close(ours)
        write_memory(tid, fd_field, struct.pack("=i", number))
        return 0

    def _instance_dir(self, control_ino: int) -> Path:
        """The directory of the instance whose ``control`` has inode ``control_ino``."""
        for entry in os.scandir(self.mount):
            if entry.inode() == control_ino - _CONTROL_OFFSET:
                return Path(entry.path)
        raise OSError(errno.ENODEV, "the session's instance is gone")


# kexecfs.fs.nodes (not imported: it loads the FUSE side): the top-level control's inode,
# and how far an instance's control follows its directory's inode.
_TOP_CONTROL_INO, _CONTROL_OFFSET = 3, 4


def _listed_access(directory: Path, token: int) -> str:
    for line in (directory / "fd_preserve").read_text().splitlines():
        fields = line.split()
        if fields and int(fields[0]) == token:
            return fields[3]
    return "rw"

