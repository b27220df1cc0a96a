"""``kexecfs vm``: QEMU guests whose RAM lives in kexecfs, across a host kernel update.

    kexecfs vm start NAME --memory SIZE [--qemu PATH] -- QEMU-OPTIONS
    kexecfs vm update NAME [--prepare]      after prepare: stop, save the device state, quit QEMU
    kexecfs vm resume NAME [--qemu PATH]    after the kexec: a new QEMU on the preserved RAM; finish
    kexecfs vm stop NAME                    power off and drop the VM's RAM and instance
    kexecfs vm list
    (each takes --run-dir DIR: where QEMU's socket, pid file and log are)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..client import Kexecfs, NotKexecfs
from .lifecycle import default_run_base, resume, start, stop, update, vms
from .qemu import GuestConfig, RunDir, VmError, parse_size

EXAMPLE = """\
example (a simulated kexec; a real one is prepare, update, then systemctl kexec):
  kexecfs vm start web --memory 1G -- -accel kvm -display none -kernel bzImage \\
      -chardev file,id=con,path=/var/log/web.console,append=on -serial chardev:con
  echo prepare > /run/kexecfs/state        # copies the guest RAM while the guest runs
  kexecfs vm update web                    # the downtime starts: stop, save, quit
  echo kexec > /run/kexecfs/state          # freeze + kexec + recovery
  kexecfs vm resume web                    # the guest runs on
"""


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    vm = sub.add_parser("vm", help="QEMU guests whose RAM lives in kexecfs (start, update, resume, stop, list)",
                        description=__doc__, epilog=EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    vsub = vm.add_subparsers(dest="vm_command", required=True, metavar="SUBCOMMAND")
    name = "the VM's name, which is also its instance's"
    s = vsub.add_parser("start", help="create and preserve the guest RAM, start QEMU on it", usage=_START_USAGE,
                        epilog="QEMU-OPTIONS: anything QEMU takes but -m, -mem-path, -incoming, -daemonize, "
                               "-pidfile")
    _start_options(s)
    s.add_argument("name", help=name)
    s.add_argument("qemu_options", nargs=argparse.REMAINDER, metavar="-- QEMU-OPTIONS",
                   help="QEMU's options (after --)")
    u = vsub.add_parser("update", help="after prepare: stop the VM, save its device state, quit QEMU")
    u.add_argument("name", help=name)
    u.add_argument("--prepare", action="store_true", help="send prepare first if the machine is normal (root)")
    u.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="how long the save may take (60)")
    r = vsub.add_parser("resume", help="after the kexec: start QEMU on the preserved RAM and saved state")
    r.add_argument("name", help=name)
    r.add_argument("--qemu", metavar="PATH", help="another QEMU binary than the one the VM was started with "
                                                  "(an updated one)")
    r.add_argument("--timeout", type=float, default=60, metavar="SECONDS", help="how long the load may take (60)")
    st = vsub.add_parser("stop", help="power the VM off and drop its preserved RAM and device state")
    st.add_argument("name", help=name)
    ls = vsub.add_parser("list", help="VMs in kexecfs and what each is doing")
    for leaf in (u, r, st, ls):
        _run_dir_option(leaf)


def _run_dir_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", type=Path, metavar="DIR",
                        help=f"where QEMU's monitor socket, pid file and log go ({default_run_base()})")


_START_USAGE = "kexecfs vm start NAME --memory SIZE [--qemu PATH] -- QEMU-OPTIONS..."


_LONG_START_OPTIONS = {"--memory", "--qemu", "--run-dir"}


def _start_options(parser: argparse.ArgumentParser) -> None:
    # --memory is required, but argparse cannot say so: options written after NAME land in
    # the QEMU options' REMAINDER, and _start parses them from there (see _start_words).
    parser.add_argument("--memory", "-m", metavar="SIZE", help="guest RAM, as QEMU's -m: 512M, 4G (required)")
    parser.add_argument("--qemu", default="qemu-system-x86_64", metavar="PATH",
                        help="the QEMU binary (qemu-system-x86_64)")
    _run_dir_option(parser)


def _start_words(args: argparse.Namespace) -> list[str]:
    """The QEMU options of ``start``. argparse gives the REMAINDER everything after NAME:
    start options written there and "--" with them; but a "--" right after NAME it drops.
    So: before a "--" only start options; without one, QEMU's options alone."""
    words = list(args.qemu_options)
    if "--" not in words:
        if words and words[0].split("=")[0] in _LONG_START_OPTIONS:  # (-m is QEMU's too, and refused there)
            raise VmError(f"QEMU's options go after --: kexecfs vm start {args.name} {words[0]} ... -- QEMU-OPTIONS")
        before, after = [], words
    else:
        split = words.index("--")
        before, after = words[:split], words[split + 1:]
    own = argparse.ArgumentParser(prog="kexecfs vm start", usage=_START_USAGE, add_help=False)
    _start_options(own)
    own.set_defaults(memory=args.memory, qemu=args.qemu, run_dir=args.run_dir)
    parsed, unknown = own.parse_known_args(before)
    if unknown:
        raise VmError(f"unknown start options {' '.join(unknown)}: QEMU's options go after --")
    if parsed.memory is None:
        raise VmError("say how much guest RAM: --memory SIZE (512M, 4G), before the -- of QEMU's options")
    args.memory, args.qemu, args.run_dir = parsed.memory, parsed.qemu, parsed.run_dir
    return after


def run(args: argparse.Namespace) -> int:
    base = args.run_dir or default_run_base()
    try:
        kx = Kexecfs(args.mount)
        return _COMMANDS[args.vm_command](kx, args, base)
    except (VmError, NotKexecfs) as exc:
        print(f"kexecfs vm {args.vm_command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"kexecfs vm {args.vm_command}: {exc}", file=sys.stderr)
        return 1


def _start(kx: Kexecfs, args: argparse.Namespace, base: Path) -> int:
    options = _start_words(args)
    base = args.run_dir or base  # --run-dir may come after NAME (see _start_words)
    config = GuestConfig(args.name, parse_size(args.memory), args.qemu, options)
    pid = start(kx, config, RunDir(base / args.name))
    print(f"{args.name}: QEMU {pid} runs with {config.memory >> 20} MiB of guest RAM in {kx.path / args.name}; "
          f"monitor {RunDir(base / args.name).monitor}")
    return 0


def _update(kx: Kexecfs, args: argparse.Namespace, base: Path) -> int:
    t = update(kx, args.name, RunDir(base / args.name), args.timeout, args.prepare)
    print(f"{args.name}: saved ({t.stream_bytes} bytes of device state in {t.saved * 1000:.0f} ms), QEMU quit; "
          f"it resumes after the kexec")
    return 0


def _resume(kx: Kexecfs, args: argparse.Namespace, base: Path) -> int:
    t = resume(kx, args.name, RunDir(base / args.name), args.qemu, args.timeout)
    print(f"{args.name}: running (QEMU started in {t.started * 1000:.0f} ms, device state loaded at "
          f"{t.loaded * 1000:.0f} ms, running at {t.running * 1000:.0f} ms); instance finished")
    return 0


def _stop(kx: Kexecfs, args: argparse.Namespace, base: Path) -> int:
    done = stop(kx, args.name, RunDir(base / args.name))
    print("\n".join(f"{args.name}: {line}" for line in done) or f"{args.name}: nothing to stop")
    return 0


def _list(kx: Kexecfs, args: argparse.Namespace, base: Path) -> int:
    rows = [("VM", "STATUS", "MEMORY", "QEMU")] + [
        (v.name, v.status, f"{v.memory >> 20}M", str(v.pid or "-")) for v in vms(kx, base)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return 0


_COMMANDS = {"start": _start, "update": _update, "resume": _resume, "stop": _stop, "list": _list}
