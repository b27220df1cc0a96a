"""kexecfs._fusehook against a real mount: a tiny pyfuse3 file system (DAEMON below) runs
in a child process, and the tests make real ioctl() and write() calls on it.

The daemon's files: ``f`` records the caller of every write, ``state`` reads back what
the daemon saw (JSON), ``ctl`` takes commands (``unset``/``set`` the ioctl handler).
Its ioctl handler implements the commands CMD_* below.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from harness import TIMEOUT, MiniMount, in_fresh_interpreter, mini_daemon


def _ioc(direction: int, nr: int, size: int) -> int:
    return direction << 30 | size << 16 | ord("k") << 8 | nr


_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
ECHO_SIZE = 512
CMD_ECHO = _ioc(_IOC_READ | _IOC_WRITE, 1, ECHO_SIZE)  # replies what it saw: JSON, NUL
CMD_ERRNO = _ioc(_IOC_WRITE, 2, 4)  # replies the errno given as in-data
CMD_DEFER = _ioc(_IOC_READ, 3, 16)  # a trio task replies b"deferred" after in-data ms
CMD_DEFER_MS = _ioc(_IOC_READ | _IOC_WRITE, 3, 16)
CMD_RAISE = _ioc(_IOC_NONE, 4, 0)  # the handler raises
CMD_TOO_BIG = _ioc(_IOC_READ, 5, 4)  # replies 8 bytes into a 4-byte buffer
CMD_DOUBLE = _ioc(_IOC_READ, 6, 4)  # replies b"once", then tries bad replies
CMD_REPLY_RAISE = _ioc(_IOC_READ, 7, 4)  # replies b"sent", then raises
CMD_RETURNS = _ioc(_IOC_NONE, 8, 0)  # the handler returns 42 instead of None
CMD_ARG = _ioc(_IOC_NONE, 9, 0)  # records its raw arg in state
CMD_UNKNOWN = _ioc(_IOC_READ, 99, 4)
TCGETS = 0x5401
FUSE_IOCTL_DIR = 1 << 4  # include/fuse_common.h

DAEMON = textwrap.dedent(
    r"""
    import errno, json, struct, sys

    from minifs import MiniOps, serve  # loads the C extension before pyfuse3
    import kexecfs.fs.fusehook as fusehook
    import pyfuse3
    import trio

    CMD = json.loads(sys.argv[2])
    state = {"writes": [], "bad_replies": [], "arg": None}
    nursery = None


    def ioctl(req, ino, cmd, fh, flags, in_data, out_size, arg, pid, uid, gid):
        if cmd == CMD["ECHO"]:
            seen = dict(ino=ino, cmd=cmd, fh=fh, flags=flags, in_hex=in_data.hex(),
                        out_size=out_size, pid=pid, uid=uid, gid=gid)
            # the caller's 512 bytes are too small for in_hex: send its prefix
            seen["in_hex"] = seen["in_hex"][:64]
            seen["in_len"] = len(in_data)
            fusehook.reply_ioctl(req, json.dumps(seen).encode() + b"\0")
        elif cmd == CMD["ERRNO"]:
            fusehook.reply_err(req, struct.unpack("<i", in_data)[0])
        elif cmd in (CMD["DEFER"], CMD["DEFER_MS"]):
            ms = struct.unpack("<Q", in_data[:8])[0] if in_data else 50
            nursery.start_soon(deferred_reply, req, ms)
        elif cmd == CMD["RAISE"]:
            raise RuntimeError("boom from the ioctl handler")
        elif cmd == CMD["TOO_BIG"]:
            fusehook.reply_ioctl(req, b"12345678")
        elif cmd == CMD["DOUBLE"]:
            fusehook.reply_ioctl(req, b"once")
            for bad in (lambda: fusehook.reply_err(req, errno.EIO),
                        lambda: fusehook.reply_ioctl(req, b""),
                        lambda: fusehook.reply_err(req + 8, errno.EIO)):
                try:
                    bad()
                except ValueError as exc:
                    state["bad_replies"].append(str(exc))
        elif cmd == CMD["REPLY_RAISE"]:
            fusehook.reply_ioctl(req, b"sent")
            raise RuntimeError("raised after replying")
        elif cmd == CMD["RETURNS"]:
            return 42
        elif cmd == CMD["ARG"]:
            state["arg"] = arg
            fusehook.reply_ioctl(req, b"")
        else:
            fusehook.reply_err(req, errno.ENOTTY)


    async def deferred_reply(req, ms):
        await trio.sleep(ms / 1000)
        fusehook.reply_ioctl(req, b"deferred")


    class Ops(MiniOps):
        async def read(self, fh, off, size):
            data = json.dumps(state).encode() if fh == 3 else b""
            return data[off:off + size]

        async def write(self, fh, off, buf):
            pid, uid, gid = fusehook.last_request_ctx()  # before any await
            await trio.sleep(0)
            if fh == 4:
                fusehook.set_ioctl_handler(ioctl if buf == b"set" else None)
            else:
                state["writes"].append([pid, uid, gid, buf.decode()])
            return len(buf)


    async def main():
        global nursery
        async with trio.open_nursery() as nursery:
            await pyfuse3.main()
            nursery.cancel_scope.cancel()


    fusehook.set_ioctl_handler(ioctl)
    serve(Ops({b"f": 2, b"state": 3, b"ctl": 4}), sys.argv[1], "fusehooktest", main,
          ready=lambda: state.update(hook_active=fusehook.hook_active()))
    """
)

# The daemon's command numbers (it knows no CMD_UNKNOWN).
CMDS = {
    "ECHO": CMD_ECHO,
    "ERRNO": CMD_ERRNO,
    "DEFER": CMD_DEFER,
    "DEFER_MS": CMD_DEFER_MS,
    "RAISE": CMD_RAISE,
    "TOO_BIG": CMD_TOO_BIG,
    "DOUBLE": CMD_DOUBLE,
    "REPLY_RAISE": CMD_REPLY_RAISE,
    "RETURNS": CMD_RETURNS,
    "ARG": CMD_ARG,
}
class Mount(MiniMount):
    def state(self) -> dict[str, Any]:
        return json.loads((self.path / "state").read_bytes())

    def ctl(self, command: bytes) -> None:
        fd = os.open(self.path / "ctl", os.O_WRONLY)
        try:
            os.write(fd, command)
        finally:
            os.close(fd)


@pytest.fixture(scope="module")
def mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    base = tmp_path_factory.mktemp("fusehook")
    mnt = base / "mnt"
    mnt.mkdir()
    with mini_daemon(DAEMON, base, mnt, json.dumps(CMDS)) as m:
        yield Mount(m.path, m.proc, m.stderr_path)


def bounded(fn: Callable[[], Any], timeout: float = TIMEOUT) -> tuple[Any, int]:
    """Run fn in a thread, so that a request the daemon never answers fails the test
    instead of hanging it; return its result and the thread's id (the caller FUSE
    reports)."""
    result: dict[str, Any] = {}

    def run() -> None:
        result["tid"] = threading.get_native_id()
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 (re-raised in the test's thread)
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        pytest.fail(f"no answer from the FUSE daemon within {timeout} s")
    if "error" in result:
        raise result["error"]
    return result["value"], result["tid"]


def ioctl(path: Path, cmd: int, arg: bytes | bytearray | int = 0, directory: bool = False) -> int:
    """ioctl() on a fresh fd of path (a bytearray arg receives the output); returns the
    id of the thread that made the call."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        if isinstance(arg, bytearray):
            _, tid = bounded(lambda: fcntl.ioctl(fd, cmd, arg, True))
        else:
            _, tid = bounded(lambda: fcntl.ioctl(fd, cmd, arg))
        return tid
    finally:
        os.close(fd)


def ioctl_errno(
    path: Path, cmd: int, arg: bytes | bytearray | int = 0, directory: bool = False
) -> int:
    with pytest.raises(OSError) as info:
        ioctl(path, cmd, arg, directory)
    return info.value.errno


def echo(path: Path, payload: bytes, directory: bool = False) -> dict[str, Any]:
    """CMD_ECHO: what the handler saw, plus "caller_tid"."""
    buf = bytearray(payload.ljust(ECHO_SIZE, b"\0"))
    tid = ioctl(path, CMD_ECHO, buf, directory)
    return {**json.loads(bytes(buf).split(b"\0")[0]), "caller_tid": tid}


def test_hook_is_active(mount: Mount) -> None:
    assert mount.state()["hook_active"] is True


def test_ioctl_reaches_handler_with_its_arguments(mount: Mount) -> None:
    payload = bytes(range(256)) * 2
    seen = echo(mount.path / "f", payload)
    assert seen["cmd"] == CMD_ECHO  # has bit 31 set: passed unsigned
    assert seen["in_len"] == ECHO_SIZE
    assert seen["in_hex"] == payload[:32].hex()
    assert seen["out_size"] == ECHO_SIZE
    assert seen["ino"] == 2 and seen["fh"] == 2
    assert not seen["flags"] & FUSE_IOCTL_DIR
    assert (seen["pid"], seen["uid"], seen["gid"]) == (seen["caller_tid"], os.getuid(), os.getgid())


def test_ioctl_raw_argument(mount: Mount) -> None:
    ioctl(mount.path / "f", CMD_ARG, 0x1234ABCD)
    assert mount.state()["arg"] == 0x1234ABCD


def test_ioctl_on_directory_reaches_handler(mount: Mount) -> None:
    seen = echo(mount.path, b"dir", directory=True)
    assert seen["ino"] == 1
    assert seen["flags"] & FUSE_IOCTL_DIR
    assert ioctl_errno(mount.path, CMD_UNKNOWN, bytearray(4), directory=True) == errno.ENOTTY


def test_reply_with_errno(mount: Mount) -> None:
    for err in (errno.EPERM, errno.EBUSY, errno.ENOSPC):
        assert ioctl_errno(mount.path / "f", CMD_ERRNO, err.to_bytes(4, "little")) == err


def test_unknown_command_is_enotty(mount: Mount) -> None:
    assert ioctl_errno(mount.path / "f", CMD_UNKNOWN, bytearray(4)) == errno.ENOTTY
    assert ioctl_errno(mount.path / "f", TCGETS, bytearray(64)) == errno.ENOTTY


def test_no_handler_is_enotty(mount: Mount) -> None:
    mount.ctl(b"unset")
    try:
        assert ioctl_errno(mount.path / "f", CMD_ECHO, bytearray(ECHO_SIZE)) == errno.ENOTTY
    finally:
        mount.ctl(b"set")
    assert echo(mount.path / "f", b"back")["in_len"] == ECHO_SIZE


def test_deferred_reply_from_trio_task(mount: Mount) -> None:
    start = time.monotonic()
    buf = bytearray(16)
    ioctl(mount.path / "f", CMD_DEFER, buf)
    assert bytes(buf) == b"deferred".ljust(16, b"\0")
    assert time.monotonic() - start >= 0.05


def test_daemon_serves_while_a_reply_is_deferred(mount: Mount) -> None:
    slow = bytearray((500).to_bytes(8, "little").ljust(16, b"\0"))
    waiter = threading.Thread(target=ioctl, args=(mount.path / "f", CMD_DEFER_MS, slow))
    start = time.monotonic()
    waiter.start()
    time.sleep(0.1)  # let the slow request reach the daemon first
    echo(mount.path / "f", b"meanwhile")
    assert time.monotonic() - start < 0.5, "the deferred request blocked the daemon"
    waiter.join(TIMEOUT)
    assert not waiter.is_alive()
    assert bytes(slow) == b"deferred".ljust(16, b"\0")


def test_raising_handler_gives_eio_and_daemon_keeps_serving(mount: Mount) -> None:
    assert ioctl_errno(mount.path / "f", CMD_RAISE) == errno.EIO
    assert echo(mount.path / "f", b"still here")["in_len"] == ECHO_SIZE
    err = mount.stderr()
    assert f"raised (cmd {CMD_RAISE:#x}): replying EIO" in err
    assert "Traceback" in err and "RuntimeError: boom from the ioctl handler" in err
    assert mount.proc.poll() is None


def test_handler_raising_after_reply_keeps_the_reply(mount: Mount) -> None:
    buf = bytearray(4)
    ioctl(mount.path / "f", CMD_REPLY_RAISE, buf)
    assert bytes(buf) == b"sent"
    assert "raised after replying" in mount.stderr()


def test_handler_returning_a_value_gives_eio(mount: Mount) -> None:
    assert ioctl_errno(mount.path / "f", CMD_RETURNS) == errno.EIO
    assert "returned 42 instead of None" in mount.stderr()


def test_reply_larger_than_out_size_gives_eio(mount: Mount) -> None:
    assert ioctl_errno(mount.path / "f", CMD_TOO_BIG, bytearray(4)) == errno.EIO
    assert "does not fit the caller's 4-byte buffer" in mount.stderr()


def test_double_and_unknown_replies_raise_value_error(mount: Mount) -> None:
    buf = bytearray(4)
    ioctl(mount.path / "f", CMD_DOUBLE, buf)
    assert bytes(buf) == b"once"
    bad = mount.state()["bad_replies"]
    assert len(bad) == 3
    assert all("not an outstanding ioctl request" in msg for msg in bad)


def _write(path: Path, data: bytes) -> None:
    # Not bounded(): the calling thread is what these tests are about, and write()
    # cannot hang on the hook (pyfuse3 answers it).
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _writes(mount: Mount, tag: str) -> list[list[Any]]:
    return [w for w in mount.state()["writes"] if w[3] == tag]


def test_write_knows_its_caller(mount: Mount) -> None:
    _write(mount.path / "f", b"main")
    assert _writes(mount, "main") == [[os.getpid(), os.getuid(), os.getgid(), "main"]]


def test_write_from_a_thread_reports_the_thread_id(mount: Mount) -> None:
    tid: list[int] = []

    def writer() -> None:
        tid.append(threading.get_native_id())
        _write(mount.path / "f", b"thread")

    thread = threading.Thread(target=writer)
    thread.start()
    thread.join(TIMEOUT)
    assert tid and tid[0] != os.getpid()
    assert _writes(mount, "thread") == [[tid[0], os.getuid(), os.getgid(), "thread"]]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch the writer to uid 65534")
def test_write_through_inherited_fd_reports_the_child(mount: Mount) -> None:
    fd = os.open(mount.path / "f", os.O_WRONLY)
    try:
        pid = os.fork()
        if pid == 0:  # child: drop to nobody, write through the parent's fd
            try:
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.write(fd, b"child")
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    assert _writes(mount, "child") == [[pid, 65534, 65534, "child"]]


def test_loading_after_pyfuse3_fails_loudly() -> None:
    result = in_fresh_interpreter(
        """
        import pyfuse3
        import kexecfs.fs.fusehook
        """
    )
    assert result.returncode != 0
    assert "ImportError: kexecfs.fs.fusehook must be imported before pyfuse3" in result.stderr


def test_api_outside_a_session() -> None:
    result = in_fresh_interpreter(
        """
        import kexecfs.fs.fusehook as fusehook
        import pytest

        assert fusehook.hook_active() is False
        with pytest.raises(RuntimeError, match="did not intercept"):
            fusehook.ensure_live()
        with pytest.raises(RuntimeError, match="no FUSE request"):
            fusehook.last_request_ctx()
        with pytest.raises(ValueError, match="not an outstanding"):
            fusehook.reply_ioctl(1234, b"")
        with pytest.raises(ValueError, match="1..999"):
            fusehook.reply_err(1234, 0)
        with pytest.raises(TypeError):
            fusehook.reply_err("1234", 5)

        async def coroutine_handler(*args): ...
        with pytest.raises(TypeError, match="plain function"):
            fusehook.set_ioctl_handler(coroutine_handler)
        with pytest.raises(TypeError, match="callable"):
            fusehook.set_ioctl_handler(42)
        fusehook.set_ioctl_handler(None)
        print("OK")
        """
    )
    assert result.stdout == "OK\n", result.stderr
