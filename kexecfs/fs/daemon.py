"""The kexecfs daemon: boot the machine (recovering an image if there is one), mount,
serve until unmounted or told to stop, and tell systemd when it is ready.
"""

from __future__ import annotations

import functools
import logging
import logging.handlers
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import fusehook  # must precede pyfuse3 (see kexecfs.fusehook)
import pyfuse3  # noqa: E402
import trio  # noqa: E402

from . import control, fdstore, restart, sessions  # noqa: E402
from .operations import KexecfsOperations  # noqa: E402
from ..core.machine import Policy  # noqa: E402
from ..defaults import DEFAULT_IMAGE_DIR  # noqa: E402

log = logging.getLogger("kexecfs.daemon")



@dataclass
class MountOptions:
    mountpoint: Path
    image_dir: Path = Path(DEFAULT_IMAGE_DIR)
    policy: Policy = Policy()
    debug: bool = False
    passthrough: bool = True
    fuse_options: tuple[str, ...] = ()


def setup_logging(debug: bool, log_file: Path | None = None, background: bool = False) -> None:
    """One line per event: on stderr (journald adds timestamps), a file, or syslog when
    the daemon goes to the background (its stderr is then /dev/null)."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
    elif background and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        fmt = "kexecfs[%(process)d]: " + fmt
    else:
        handler = logging.StreamHandler(sys.stderr)
    if not os.environ.get("JOURNAL_STREAM") and not isinstance(handler, logging.handlers.SysLogHandler):
        fmt = "%(asctime)s " + fmt
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)


def sd_notify(message: str) -> None:
    """Send a message to systemd's notify socket (Type=notify), without libsystemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())


def raise_descriptor_limit() -> None:
    """The daemon holds one descriptor per preserved file: take the whole hard limit
    (systemd's default soft limit of 1024 would fail preserves with EMFILE)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(opts: MountOptions, ready: Callable[[], None] = lambda: None) -> None:
    """Serve until unmounted or SIGTERM/SIGINT; ``ready`` runs once requests are served.

    The connection is the one a previous daemon left in the descriptor store if it is
    alive (see :mod:`.restart`), else a new mount. A signal stops this process only: the
    connection stays in the store for the next daemon. An unmount ends it all."""
    raise_descriptor_limit()
    opts.image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = fdstore.open_store(opts.image_dir)
    held = store.retrieve()
    conn = restart.connect(opts.mountpoint, store, held)
    machine = restart.machine_for(opts.image_dir, opts.policy, store, held, conn)
    fs = KexecfsOperations(machine, passthrough=opts.passthrough, handle_numbers=restart.HandleNumbers(conn.record_fd))
    fuse_options = set(pyfuse3.default_options)  # default_permissions: the kernel checks mode bits
    fuse_options |= {"fsname=kexecfs", "subtype=kexecfs", "allow_other", *opts.fuse_options}
    if opts.debug:
        fuse_options.add("debug")
    pyfuse3.init(fs, conn.target, fuse_options)
    fusehook.ensure_live()
    conn.kept(store)
    fs.device_lock.device = sessions.mount_device(str(opts.mountpoint))
    fs.device_lock.restarted = conn.adopted
    fusehook.set_ioctl_handler(functools.partial(control.dispatch, fs))
    log.info("kexecfs mounted on %s (image dir %s, state %s, boot id %s)", opts.mountpoint, opts.image_dir,
             machine.state.word, machine.boot_id)
    ended = False
    try:
        ended = trio.run(_main_loop, fs, ready, conn)
    finally:
        fusehook.set_ioctl_handler(None)
        pyfuse3.close(unmount=False)
        if ended:
            fs.machine.record.end()
            store.end()
        log.info("kexecfs on %s stopped%s", opts.mountpoint, ": unmounted" if ended else "; the mount stays "
                 "for the next daemon")


async def _main_loop(fs: KexecfsOperations, ready: Callable[[], None], conn: restart.Connection) -> bool:
    """Serve; True once the connection ended (unmounted), False if stopped by a signal."""
    signalled: list[int] = []
    async with trio.open_nursery() as nursery:
        fs.nursery = nursery
        nursery.start_soon(_stop_on_signal, signalled)
        nursery.start_soon(restart.replace_a_dead_keeper, conn, lambda: fs.machine)
        ready()
        await pyfuse3.main()
        nursery.cancel_scope.cancel()
    return not signalled


async def _stop_on_signal(signalled: list[int]) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("%s received: stopping; the connection stays in the descriptor store",
                     signal.Signals(signum).name)
            signalled.append(signum)
            pyfuse3.terminate()
            return


def mount(opts: MountOptions, foreground: bool) -> int:
    """Mount kexecfs; in the background unless ``foreground``, returning once it serves."""
    if foreground:
        try:
            serve(opts, ready=lambda: sd_notify("READY=1\nSTATUS=serving"))
        except fdstore.StoreError as exc:
            log.error("%s", exc)
            return 1
        return 0
    # Fork before trio or pyfuse3 start: the child serves, the parent waits on a pipe
    # and exits only when the mount answers (so mount(8) and scripts can rely on it).
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            ok = pipe.read(1) == b"1"
        if not ok:
            print(f"kexecfs: mounting {opts.mountpoint} failed (see the log above)", file=sys.stderr)
        return 0 if ok else 1
    os.close(read_end)
    os.setsid()
    # A daemon keeps no terminal and no caller's pipes open (a caller reading our
    # stderr to EOF would wait forever); logs went to a file or syslog above.
    logs_to_stderr = any(type(h) is logging.StreamHandler for h in logging.getLogger().handlers)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1) if logs_to_stderr else (0, 1, 2):
        os.dup2(devnull, fd)
    code = 1
    try:
        serve(opts, ready=lambda: os.write(write_end, b"1"))
        code = 0
    except fdstore.StoreError as exc:
        log.error("%s", exc)
    except BaseException:
        log.exception("kexecfs daemon failed")
    finally:
        os._exit(code)
