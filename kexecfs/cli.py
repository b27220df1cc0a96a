"""The ``kexecfs`` command.

    kexecfs mount MOUNTPOINT [--image-dir DIR] [--foreground] [--debug] [--admin-group G] [-o OPTS]
    kexecfs status [--json]              the status file as a table (or JSON)
    kexecfs event EVENT                  prepare | freeze | cancel | kexec | finish
    kexecfs kexec                        a simulated kexec (same as "event kexec")
    kexecfs image show FILE | image verify FILE
    kexecfs instances                    instances with their state, owner and preserved files
    kexecfs preserve --instance NAME --fd N [--token T]   preserve this command's fd N (for scripts:
                                         "kexecfs preserve --instance db --fd 5 5<>/var/lib/db/journal")
    kexecfs shutdown-hook [--force]      freeze if a kexec is under way (systemd's kexecfs-freeze.service)
    kexecfs [--mount M] run -- PROGRAM   an unmodified LUO program (Linux 6.19 sessions) on kexecfs
    kexecfs vm start|update|resume|stop|list   QEMU guests whose RAM lives in kexecfs (kexecfs/vm/)

``mount -t fuse.kexecfs kexecfs /run/kexecfs -o image_dir=/var/lib/kexecfs`` works too:
mount.fuse3 runs ``kexecfs kexecfs /run/kexecfs -o OPTS``, which this command accepts.
"""

from __future__ import annotations

import argparse
import grp
import json
import sys
from pathlib import Path

from . import abi
from .defaults import DEFAULT_IMAGE_DIR, DEFAULT_MOUNTPOINT

# -o options that are kexecfs's own; mount(8)'s generic ones are dropped, the rest go to FUSE.
_OWN_OPTIONS = {"image_dir", "admin_group", "debug", "foreground", "log_file", "max_files", "max_bytes",
                "no_passthrough"}
_MOUNT_ONLY_OPTIONS = {"rw", "ro", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto",
                       "user", "nouser", "users", "defaults", "_netdev", "nofail", "relatime", "noatime",
                       "atime", "async", "sync"}


def _split_mount_options(values: list[str]) -> tuple[dict[str, str], list[str]]:
    own: dict[str, str] = {}
    fuse: list[str] = []
    for value in values:
        for opt in filter(None, value.split(",")):
            key, _, val = opt.partition("=")
            if key in _OWN_OPTIONS:
                own[key] = val
            elif key not in _MOUNT_ONLY_OPTIONS and not key.startswith("x-"):
                fuse.append(opt)
    return own, fuse


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kexecfs", description="live-update filesystem (LUO kexecfs interface)")
    p.add_argument("--mount", default=DEFAULT_MOUNTPOINT, help="where kexecfs is mounted (for the client commands)")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mount", help="mount kexecfs")
    m.add_argument("mountpoint", type=Path)
    m.add_argument("--image-dir", type=Path, help=f"where handover images live (default {DEFAULT_IMAGE_DIR})")
    m.add_argument("--foreground", "-f", action="store_true", help="serve in the foreground (systemd)")
    m.add_argument("--debug", "-d", action="store_true", help="log FUSE requests too")
    m.add_argument("--admin-group", help="a group whose members may drive global events too")
    m.add_argument("--log-file", type=Path, help="log here (default: stderr; syslog when in the background)")
    m.add_argument("--max-files", type=int, help="preserved files a new instance may hold (default: no limit; "
                                                 "root changes it per instance in INSTANCE/files.max)")
    m.add_argument("--max-bytes", type=int, help="bytes of memfd contents a new instance may hold (default: no "
                                                 "limit; per instance in INSTANCE/bytes.max)")
    m.add_argument("--no-passthrough", action="store_true",
                   help="serve restored files through the daemon even where FUSE passthrough works")
    m.add_argument("-o", dest="options", action="append", default=[], help="mount options (image_dir=, ...)")

    s = sub.add_parser("status", help="show the status file")
    s.add_argument("--json", action="store_true")

    e = sub.add_parser("event", help="send a global event")
    e.add_argument("event", choices=abi.EVENTS)
    sub.add_parser("kexec", help="simulated kexec: freeze if prepared, drop everything, recover from the image")

    sub.add_parser("instances", help="list instances")
    pr = sub.add_parser("preserve", help="preserve one of this command's inherited descriptors")
    pr.add_argument("--instance", required=True)
    pr.add_argument("--fd", type=int, required=True)
    pr.add_argument("--token", type=int)
    sh = sub.add_parser("shutdown-hook", help="freeze the prepared image if the system is kexecing")
    sh.add_argument("--force", action="store_true", help="freeze even if no kexec job is queued")

    r = sub.add_parser("run", help="run an unmodified LUO program (6.19 API) on kexecfs: kexecfs run -- PROGRAM")
    r.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments (after --)")

    from .vm.cli import add_parser as add_vm_parser  # standard library only, like this module

    add_vm_parser(sub)

    i = sub.add_parser("image", help="inspect a handover image")
    isub = i.add_subparsers(dest="image_command", required=True)
    for name, text in (("show", "print the image as JSON"), ("verify", "check every checksum")):
        isub.add_parser(name, help=text).add_argument("file", type=Path)
    return p


def _mount(args: argparse.Namespace) -> int:
    from .fs.daemon import MountOptions, mount, setup_logging
    from .core.machine import Policy

    own, fuse = _split_mount_options(args.options)
    debug = args.debug or "debug" in own
    foreground = args.foreground or "foreground" in own
    log_file = args.log_file or (Path(own["log_file"]) if own.get("log_file") else None)
    setup_logging(debug, log_file, background=not foreground)
    group = args.admin_group or own.get("admin_group")
    max_files = args.max_files if args.max_files is not None else own.get("max_files")
    max_bytes = args.max_bytes if args.max_bytes is not None else own.get("max_bytes")
    policy = Policy(admin_gid=(int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else None,
                    max_files=None if max_files is None else int(max_files),
                    max_bytes=None if max_bytes is None else int(max_bytes))
    opts = MountOptions(
        mountpoint=args.mountpoint.absolute(),
        image_dir=Path(args.image_dir or own.get("image_dir") or DEFAULT_IMAGE_DIR).absolute(),
        policy=policy, debug=debug, passthrough=not (args.no_passthrough or "no_passthrough" in own),
        fuse_options=tuple(fuse))
    return mount(opts, foreground=foreground)


def _status(args: argparse.Namespace) -> int:
    lines = (Path(args.mount) / "status").read_text().splitlines()
    status = dict(line.split(": ", 1) if ": " in line else (line.rstrip(":"), "") for line in lines)
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        width = max(map(len, status))
        for key, value in status.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _event(mount: str, event: str) -> int:
    try:
        with open(Path(mount) / "state", "w") as f:
            f.write(event + "\n")
    except OSError as exc:
        print(f"kexecfs: {event}: {exc.strerror}", file=sys.stderr)
        return 1
    print((Path(mount) / "state").read_text().strip())
    return 0


def _instances(args: argparse.Namespace) -> int:
    from .client import Kexecfs

    kx = Kexecfs(args.mount)
    rows = [("INSTANCE", "STATE", "OWNER", "FILES", "BYTES")]
    for name in kx.instances():
        inst = kx.instance(name)
        st = inst.path.stat()
        files = inst.preserved()
        rows.append((name, (inst.path / "state").read_text().strip(), f"{st.st_uid}:{st.st_gid}",
                     str(len(files)), str(sum(f.size for f in files))))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _preserve(args: argparse.Namespace) -> int:
    from .client import Kexecfs

    try:
        token = Kexecfs(args.mount).instance(args.instance).preserve(args.fd, args.token)
    except OSError as exc:
        print(f"kexecfs: preserve fd {args.fd} in {args.instance}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(token)
    return 0


def _run(args: argparse.Namespace) -> int:
    from .launcher import Launcher

    program = args.program[1:] if args.program[:1] == ["--"] else args.program
    if not program:
        print("kexecfs run: no program given (kexecfs run -- PROGRAM [ARGS])", file=sys.stderr)
        return 2
    return Launcher(Path(args.mount)).run(program)


def _vm(args: argparse.Namespace) -> int:
    from .vm.cli import run

    return run(args)


def _kexec_queued() -> bool:
    """Is systemd carrying out "systemctl kexec"? (An ordinary reboot must not freeze.)"""
    import subprocess

    jobs = subprocess.run(["systemctl", "list-jobs", "--no-legend", "kexec.target"],
                          capture_output=True, text=True).stdout
    return "kexec.target" in jobs


def _shutdown_hook(args: argparse.Namespace) -> int:
    state = (Path(args.mount) / "state").read_text().strip()
    if not args.force and not _kexec_queued():
        print(f"kexecfs: not a kexec (no kexec.target job): leaving the state {state}")
        return 0
    if state != "prepared":
        print(f"kexecfs: kexec with state {state}: nothing prepared, nothing to freeze")
        return 0
    return _event(args.mount, "freeze")


def _image(args: argparse.Namespace) -> int:
    from .core.image import HandoverImage, ImageError

    try:
        image = HandoverImage.open(args.file)
        try:
            if args.image_command == "verify":
                image.verify()
                print(f"{args.file}: OK: format {image.version[0]}.{image.version[1]}, {len(image.instances)} "
                      f"instance(s), {len(image.files)} file(s)")
            else:
                print(json.dumps(image.describe(), indent=2))
        finally:
            image.close()
    except ImageError as exc:
        print(f"kexecfs: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # mount.fuse3 calls "kexecfs SOURCE MOUNTPOINT -o OPTS": treat it as "mount".
    if len(argv) >= 2 and argv[0] not in _parser()._subparsers._group_actions[0].choices \
            and not argv[0].startswith("-"):  # type: ignore[union-attr]
        argv = ["mount", *argv[1:]]
    args = _parser().parse_args(argv)
    if args.command == "mount":
        return _mount(args)
    if args.command == "status":
        return _status(args)
    if args.command in ("event", "kexec"):
        return _event(args.mount, getattr(args, "event", "kexec"))
    if args.command == "vm":
        return _vm(args)
    handlers = {"run": _run, "instances": _instances, "preserve": _preserve, "shutdown-hook": _shutdown_hook, "image": _image}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
