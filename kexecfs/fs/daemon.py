"""The kexecfs daemon: boot the machine (recovering an image if there is one), mount,
serve until unmounted or told to stop, and tell systemd when it is ready.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import logging.handlers
import os
import resource
import signal
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
from ..systemd import (JOURNAL_SOCKET, JournalHandler, ServiceProgress, journal_stream_is_stderr,  # noqa: E402
                       sd_notify)

log = logging.getLogger("kexecfs.daemon")


@dataclass
class MountOptions:
    mountpoint: Path
    image_dir: Path = Path(DEFAULT_IMAGE_DIR)
    policy: Policy = Policy()
    debug: bool = False
    passthrough: bool = True
    fuse_options: tuple[str, ...] = ()


def _log_handler(target: str, log_file: Path | None, background: bool) -> logging.Handler | None:
    """Where the daemon logs. ``auto``: the --log-file if given; the journal (its native
    protocol, so that entries carry INSTANCE=, TOKEN=, EVENT=) when systemd connected
    stderr to it or, in the background, whenever journald runs; otherwise syslog in the
    background and stderr in the foreground. None: nowhere to log once in the background."""
    if log_file:
        return logging.FileHandler(log_file)
    if target == "auto":
        journal = os.path.exists(JOURNAL_SOCKET)
        if journal and (background or journal_stream_is_stderr()):
            target = "journal"
        elif background:
            target = "syslog" if os.path.exists("/dev/log") else "none"
        else:
            target = "stderr"
    if target == "journal":
        if not os.path.exists(JOURNAL_SOCKET):
            raise SystemExit(f"kexecfs: --log-target journal: no journal listens on {JOURNAL_SOCKET}")
        return JournalHandler()
    if target == "syslog":
        if not os.path.exists("/dev/log"):
            raise SystemExit("kexecfs: --log-target syslog: no syslog listens on /dev/log")
        return logging.handlers.SysLogHandler("/dev/log")
    return logging.StreamHandler(sys.stderr) if target == "stderr" else None


def setup_logging(debug: bool, log_file: Path | None = None, background: bool = False,
                  target: str = "auto") -> None:
    """One line per event, to the target :func:`_log_handler` picks. In the background
    the daemon lets go of the caller's stderr once it serves (see :func:`mount`), so a
    stderr target only carries what happens until then."""
    fmt = "%(levelname)s %(name)s: %(message)s"
    handler = _log_handler(target, log_file, background)
    if handler is None:
        print("kexecfs: no --log-file, journal or syslog: the daemon's log is discarded once it serves "
              "in the background", file=sys.stderr)
        handler = logging.NullHandler()
    if isinstance(handler, logging.handlers.SysLogHandler):
        fmt = "kexecfs[%(process)d]: " + fmt
    elif type(handler) is logging.FileHandler or (type(handler) is logging.StreamHandler
                                                   and not journal_stream_is_stderr()):
        fmt = "%(asctime)s " + fmt  # a file or a terminal; the journal and syslog stamp entries themselves
    handler.setFormatter(logging.Formatter(fmt))
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, handlers=[handler], force=True)
    if not debug:
        logging.getLogger("pyfuse3").setLevel(logging.WARNING)




def raise_descriptor_limit() -> None:
    """Take the whole hard limit: the daemon holds copies of a few stored descriptors
    (restart.CACHE_SIZE, a quarter of the soft limit at most), open restored files and its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(opts: MountOptions, ready: Callable[[], None] = lambda: None,
          progress: ServiceProgress | None = None) -> None:
    """Serve until unmounted or SIGTERM/SIGINT; ``ready`` runs once requests are served.

    The connection is the one a previous daemon left in the descriptor store if it is
    alive (see :mod:`.restart`), else a new mount. A signal stops this process only: the
    connection stays in the store for the next daemon. An unmount ends it all.
    ``progress`` hears how recovery (before the mount exists) and prepare and freeze go.
    """
    progress = progress or ServiceProgress()
    raise_descriptor_limit()
    opts.image_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = fdstore.open_store(opts.image_dir)
    held = store.retrieve()
    conn = restart.connect(opts.mountpoint, store, held)
    with progress.keepalive():
        machine = restart.machine_for(opts.image_dir, opts.policy, store, held, conn, on_progress=progress.report)
    fs = KexecfsOperations(machine, passthrough=opts.passthrough, handle_numbers=restart.HandleNumbers(conn.record_fd))
    progress.idle_status = lambda: f"serving {opts.mountpoint}: state {fs.machine.state.word}"
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
        nursery.start_soon(restart.replace_a_dead_keeper, conn)
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
        progress = ServiceProgress()
        try:
            serve(opts, ready=lambda: sd_notify(f"READY=1\nSTATUS={progress.idle_status()}"), progress=progress)
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
    os.chdir("/")  # nor the caller's working directory, which would keep its filesystem busy
    close_inherited(keep=write_end)
    # Until the mount serves, what goes wrong also reaches the caller's stderr.
    startup = logging.StreamHandler(sys.stderr)
    startup.setLevel(logging.WARNING)
    startup.setFormatter(logging.Formatter("kexecfs: %(message)s"))
    if not any(type(h) is logging.StreamHandler for h in logging.getLogger().handlers):
        logging.getLogger().addHandler(startup)
    code = 1
    try:
        serve(opts, ready=lambda: _detach(write_end, startup))
        code = 0
    except fdstore.StoreError as exc:
        log.error("%s", exc)
    except BaseException:
        log.exception("kexecfs daemon failed")
    finally:
        os._exit(code)


def close_inherited(keep: int) -> None:
    """Close the descriptors beyond 0-2 that the caller let us inherit (a pipe of a script,
    a shell's ``3>file``): a daemon holding one keeps its reader from ever seeing EOF.
    Python opens its own descriptors close-on-exec, so exactly the inherited ones lack it."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2 or fd == keep:
            continue
        try:
            if not fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:
            pass  # the directory listing's own descriptor, closed meanwhile


def _detach(write_end: int, startup: logging.Handler) -> None:
    """The mount serves: let go of the caller's terminal and pipes, then release the caller.

    In that order: once the parent exits, a caller reading our output to EOF (``out=$(mount
    ...)``, ``subprocess.run(capture_output=True)``) must not wait for this daemon."""
    logging.getLogger().removeHandler(startup)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)
    os.write(write_end, b"1")
    os.close(write_end)
