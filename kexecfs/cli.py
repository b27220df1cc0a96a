"""The ``kexecfs`` command. Its manual page (man/man1/kexecfs.1) and bash completion
(completion/kexecfs) are generated from the parser below by tools/cli-docs.py: after a
change here, run ``make man``.

    kexecfs mount MOUNTPOINT [--image-dir DIR] [--foreground] [--log-target T] [-o OPTS] ...
    kexecfs status [--json]              the status file as a table (or typed JSON)
    kexecfs instances [--json]           instances with their state, owner and preserved files
    kexecfs check [--json]               preflight: is the machine ready for a live update? (exit 0/1)
    kexecfs metrics [--textfile PATH]    the Prometheus text format (node_exporter's textfile collector)
    kexecfs event EVENT                  prepare | freeze | cancel | kexec | finish
    kexecfs kexec                        a simulated kexec (same as "event kexec")
    kexecfs image show FILE | image verify FILE
    kexecfs preserve --instance NAME --fd N [--token T]   preserve this command's fd N (for scripts:
                                         "kexecfs preserve --instance db --fd 5 5<>/var/lib/db/journal")
    kexecfs shutdown-hook [--force]      freeze if a kexec is under way (systemd's kexecfs-freeze.service)
    kexecfs [--mount M] run -- PROGRAM   an unmodified LUO program (Linux 6.19 sessions) on kexecfs
    kexecfs vm start|update|resume|stop|list   QEMU guests whose RAM lives in kexecfs (kexecfs/vm/)

``mount -t fuse.kexecfs kexecfs /run/kexecfs -o image_dir=/var/lib/kexecfs`` works too:
mount.fuse3 runs ``kexecfs kexecfs /run/kexecfs -o OPTS``, which this command accepts.
The JSON of status, instances and check is a stable interface: docs/json.md.
"""

from __future__ import annotations

import argparse
import grp
import json
import sys
from pathlib import Path

from . import abi
from .defaults import DEFAULT_IMAGE_DIR, DEFAULT_MOUNTPOINT, LOG_TARGETS

# -o options that are kexecfs's own; mount(8)'s generic ones are dropped, the rest go to FUSE.
_OWN_OPTIONS = {"image_dir", "admin_group", "debug", "foreground", "log_file", "log_target", "max_files",
                "max_bytes", "no_passthrough"}
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
    p.add_argument("--mount", default=DEFAULT_MOUNTPOINT, metavar="MOUNTPOINT",
                   help=f"where kexecfs is mounted, for the commands other than mount (default {DEFAULT_MOUNTPOINT})")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _mount_parser(sub.add_parser("mount", help="mount kexecfs (in the background unless --foreground)"))

    s = sub.add_parser("status", help="show the status file: state, counts, image, last durations")
    s.add_argument("--json", action="store_true", help="typed JSON (docs/json.md)")
    i = sub.add_parser("instances", help="list instances: state, owner, preserved files and bytes")
    i.add_argument("--json", action="store_true", help="typed JSON with every preserved file (docs/json.md)")
    c = sub.add_parser("check", help="preflight: report whether the machine is ready for a live update "
                                     "(exit 0 ready, 1 not)")
    c.add_argument("--json", action="store_true", help="the findings as JSON")
    c.add_argument("--quiet", "-q", action="store_true", help="print only failures")
    mt = sub.add_parser("metrics", help="print metrics in the Prometheus text format")
    mt.add_argument("--textfile", type=Path, metavar="PATH",
                    help="write them to PATH atomically (node_exporter's textfile collector) instead")

    e = sub.add_parser("event", help="send a global event to the state machine")
    e.add_argument("event", choices=abi.EVENTS, help="the event: " + ", ".join(abi.EVENTS))
    sub.add_parser("kexec", help="simulated kexec: freeze if prepared, drop everything, recover from the image")
    pr = sub.add_parser("preserve", help="preserve one of this command's inherited descriptors")
    pr.add_argument("--instance", required=True, help="the instance to preserve it in")
    pr.add_argument("--fd", type=int, required=True, help="the descriptor number, inherited from the caller")
    pr.add_argument("--token", type=int, help="the token to preserve it under (default: the lowest free one)")
    sh = sub.add_parser("shutdown-hook", help="freeze the prepared image if the system is kexecing")
    sh.add_argument("--force", action="store_true", help="freeze even if no kexec job is queued")

    r = sub.add_parser("run", help="run an unmodified LUO program (6.19 API) on kexecfs: kexecfs run -- PROGRAM")
    r.add_argument("program", nargs=argparse.REMAINDER, help="the program and its arguments (after --)")

    from .vm.cli import add_parser as add_vm_parser  # standard library only, like this module

    add_vm_parser(sub)

    im = sub.add_parser("image", help="inspect a handover image")
    isub = im.add_subparsers(dest="image_command", required=True, metavar="SUBCOMMAND")
    for name, text in (("show", "print the image as JSON"), ("verify", "check every checksum")):
        isub.add_parser(name, help=text).add_argument("file", type=Path, help="the image file")
    return p


def _mount_parser(m: argparse.ArgumentParser) -> None:
    m.add_argument("mountpoint", type=Path, help="the directory to mount on")
    m.add_argument("--image-dir", type=Path, metavar="DIR",
                   help=f"where handover images live (default {DEFAULT_IMAGE_DIR}); on storage that survives "
                        "the kexec: a disk or a DAX filesystem, not tmpfs")
    m.add_argument("--foreground", "-f", action="store_true",
                   help="serve in the foreground (systemd); READY=1 and progress go to $NOTIFY_SOCKET")
    m.add_argument("--debug", "-d", action="store_true", help="log FUSE requests too")
    m.add_argument("--admin-group", metavar="GROUP", help="a group whose members may drive global events too")
    m.add_argument("--log-file", type=Path, metavar="FILE", help="log to FILE")
    m.add_argument("--log-target", choices=LOG_TARGETS, default="auto",
                   help="where to log without --log-file: auto (the journal under systemd or when it runs, "
                        "else syslog in the background and stderr in the foreground), stderr, journal "
                        "(native protocol, with INSTANCE=, TOKEN=, EVENT= fields), syslog")
    m.add_argument("--max-files", type=int, metavar="N", help="preserved files a new instance may hold (default: "
                                                               "no limit; root changes it in INSTANCE/files.max)")
    m.add_argument("--max-bytes", type=int, metavar="N", help="bytes of memfd contents a new instance may hold "
                                                               "(default: no limit; INSTANCE/bytes.max)")
    m.add_argument("--no-passthrough", action="store_true",
                   help="serve restored files through the daemon even where FUSE passthrough works")
    m.add_argument("-o", dest="options", action="append", default=[], metavar="OPTS",
                   help="mount options, comma separated: image_dir=, admin_group=, log_file=, log_target=, "
                        "max_files=, max_bytes=, debug, foreground, no_passthrough; others go to FUSE")


def _mount(args: argparse.Namespace) -> int:
    from .fs.daemon import MountOptions, mount, setup_logging
    from .core.machine import Policy

    own, fuse = _split_mount_options(args.options)
    debug = args.debug or "debug" in own
    foreground = args.foreground or "foreground" in own
    log_file = args.log_file or (Path(own["log_file"]) if own.get("log_file") else None)
    target = own.get("log_target") or args.log_target
    if target not in LOG_TARGETS:
        print(f"kexecfs: log_target={target}: expected one of {', '.join(LOG_TARGETS)}", file=sys.stderr)
        return 2
    setup_logging(debug, log_file, background=not foreground, target=target)
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
    from . import report

    status = report.read_status(Path(args.mount))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    del status["version"], status["mount"]
    width = max(map(len, status))
    for key, value in status.items():
        print(f"{key:<{width}}  {'' if value is None else value}")
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
    from . import report
    from .client import Kexecfs

    Kexecfs(args.mount)  # a clear error unless kexecfs serves there
    listing = report.read_instances(Path(args.mount))
    if args.json:
        print(json.dumps(listing, indent=2))
        return 0
    rows = [("INSTANCE", "STATE", "OWNER", "FILES", "BYTES")]
    for inst in listing["instances"]:
        rows.append((inst["name"], inst["state"], f"{inst['owner']['uid']}:{inst['owner']['gid']}",
                     str(inst["files"]), str(inst["bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for row in rows:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())
    return 0


def _check(args: argparse.Namespace) -> int:
    from . import preflight

    findings = preflight.run_checks(Path(args.mount))
    ready = preflight.ready(findings)
    if args.json:
        print(json.dumps(preflight.as_json(findings), indent=2))
    else:
        for finding in findings:
            if not args.quiet or finding.level == "fail":
                print(finding.line())
        if not args.quiet:
            print("Ready for a live update." if ready else "Not ready for a live update.")
    return 0 if ready else 1


def _metrics(args: argparse.Namespace) -> int:
    from . import metrics

    text = metrics.exposition(Path(args.mount))
    if args.textfile:
        metrics.write_textfile(args.textfile, text)
    else:
        sys.stdout.write(text)
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
    # The kexec.target job first, the mount second: this hook also runs when
    # kexecfs.service restarts (its Requires= stops this unit), and then no daemon answers
    # the mount until the next one starts, which systemd starts only after this stop.
    if not args.force and not _kexec_queued():
        print("kexecfs: not a kexec (no kexec.target job): nothing to freeze")
        return 0
    state = (Path(args.mount) / "state").read_text().strip()
    if state != "prepared":
        print(f"kexecfs: kexec with state {state}: nothing prepared, nothing to freeze")
        return 0
    return _freeze_telling_systemd(args.mount)


def _freeze_telling_systemd(mount: str, beat: float = 1.0) -> int:
    """Freeze, and while the daemon works tell systemd how far it got: STATUS= and
    EXTEND_TIMEOUT_USEC= each time its progress moves, so that the freeze unit's stop
    timeout never kills a freeze that is still copying (the unit has NotifyAccess=exec)."""
    import threading

    from .report import read_status
    from .systemd import sd_notify

    extend = f"EXTEND_TIMEOUT_USEC={int(30e6)}"
    sd_notify(f"STATUS=freezing the handover image\n{extend}")
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(_event(mount, "freeze")), daemon=True)
    worker.start()
    seen: object = None
    while True:
        worker.join(beat)
        if not worker.is_alive():
            return result[0] if result else 1
        try:
            progress = read_status(Path(mount)).get("progress")
        except OSError:
            continue
        if progress != seen:
            seen = progress
            sd_notify(f"STATUS={progress or 'freezing the handover image'}\n{extend}")


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
    handlers = {"run": _run, "instances": _instances, "check": _check, "metrics": _metrics, "preserve": _preserve,
                "shutdown-hook": _shutdown_hook, "image": _image}
    return handlers[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
