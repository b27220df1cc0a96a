"""The ``kexecfs`` command.

    kexecfs mount MOUNTPOINT [--image-dir DIR] [--foreground] [--debug] [--admin-group G] [-o OPTS]
    kexecfs status [--json]              the status file as a table (or JSON)
    kexecfs event EVENT                  prepare | freeze | cancel | kexec | finish
    kexecfs kexec                        a simulated kexec (same as "event kexec")
    kexecfs image show FILE | image verify FILE

``mount -t fuse.kexecfs kexecfs /run/kexecfs -o image_dir=/var/lib/kexecfs`` works too:
mount.fuse3 runs ``kexecfs kexecfs /run/kexecfs -o OPTS``, which this command accepts.
"""

from __future__ import annotations

import argparse
import grp
import json
import sys
from pathlib import Path

from .daemon import DEFAULT_IMAGE_DIR, DEFAULT_MOUNTPOINT

# -o options that are kexecfs's own; mount(8)'s generic ones are dropped, the rest go to FUSE.
_OWN_OPTIONS = {"image_dir", "admin_group", "debug", "foreground"}
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
    m.add_argument("-o", dest="options", action="append", default=[], help="mount options (image_dir=, ...)")

    s = sub.add_parser("status", help="show the status file")
    s.add_argument("--json", action="store_true")

    e = sub.add_parser("event", help="send a global event")
    e.add_argument("event", choices=["prepare", "freeze", "cancel", "kexec", "finish"])
    sub.add_parser("kexec", help="simulated kexec: freeze if prepared, drop everything, recover from the image")

    i = sub.add_parser("image", help="inspect a handover image")
    isub = i.add_subparsers(dest="image_command", required=True)
    for name, text in (("show", "print the image as JSON"), ("verify", "check every checksum")):
        isub.add_parser(name, help=text).add_argument("file", type=Path)
    return p


def _mount(args: argparse.Namespace) -> int:
    from .daemon import MountOptions, mount, setup_logging

    own, fuse = _split_mount_options(args.options)
    debug = args.debug or "debug" in own
    setup_logging(debug)
    group = args.admin_group or own.get("admin_group")
    opts = MountOptions(
        mountpoint=args.mountpoint.absolute(),
        image_dir=Path(args.image_dir or own.get("image_dir") or DEFAULT_IMAGE_DIR).absolute(),
        admin_gid=(int(group) if group.isdigit() else grp.getgrnam(group).gr_gid) if group else None,
        debug=debug, fuse_options=tuple(fuse))
    return mount(opts, foreground=args.foreground or "foreground" in own)


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


def _image(args: argparse.Namespace) -> int:
    from .image import HandoverImage, ImageError

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
    return _image(args)


if __name__ == "__main__":
    sys.exit(main())
