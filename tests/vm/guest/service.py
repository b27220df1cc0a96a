#!/usr/bin/python3
"""The "service" of the kexec test guest: what a VMM or a database would do with kexecfs.

Runs inside the guest (Debian's python3, stdlib only except the optional kexecfs.client).

  preserve        stage 1: mkdir /run/kexecfs/svc, preserve three files, record their
                  digests on the data disk, then keep running (holding the fds) until the
                  shutdown stops it
  verify          stage 2: restore every file from /run/kexecfs/svc/fds/<token>, compare
                  it with the digests, finish; last line of output = the verdict
  freeze-cmd      print (as shell assignments) what the project's freeze hook
                  (systemd/*freeze*.service) runs when it is started at boot and when
                  the shutdown of `systemctl kexec` stops it
  standin-write / standin-verify
                  no kexecfs: a file written + fsync'd into the image directory in stage 1,
                  checked in stage 2 (proves the VM plumbing on its own)

The three preserved files (tokens are fixed so stage 2 knows them from the digests):
  101 memfd, 4 MiB of random data, position 12345, seals SHRINK|GROW
      preserved by a write to fd_preserve, restored by open() of fds/101
  102 sparse memfd, 16 MiB with three small data islands, position 777
      preserved by the LIVEUPDATE_IOCTL_FD_PRESERVE ioctl on control,
      restored by kexecfs.client (Instance.restore, Instance.seals)
  103 regular file on the ext4 data disk, opened O_RDWR at offset 4099
      preserved by a write to fd_preserve, restored by open() of fds/103
"""
import argparse
import errno
import fcntl
import hashlib
import json
import os
import shlex
import shutil
import signal
import struct
import sys

MNT = "/run/kexecfs"
INST = MNT + "/svc"
REGULAR = "/data/kxvm/regular.bin"
UNITS = "/usr/local/lib/kxvm/systemd"

LIVEUPDATE_IOCTL_FD_PRESERVE = 0x4010BA00     # _IOW(0xBA, 0, struct liveupdate_fd)
SEAL_NAMES = {fcntl.F_SEAL_SEAL: "seal", fcntl.F_SEAL_SHRINK: "shrink",
              fcntl.F_SEAL_GROW: "grow", fcntl.F_SEAL_WRITE: "write"}
MiB = 1 << 20


def log(msg):
    print(msg, flush=True)


def sha256_fd(fd, size):
    """sha256 of the first size bytes of fd, read with pread (the position is untouched)."""
    h = hashlib.sha256()
    off = 0
    while off < size:
        chunk = os.pread(fd, min(MiB, size - off), off)
        if not chunk:
            break
        h.update(chunk)
        off += len(chunk)
    return h.hexdigest(), off


def seals_of(fd):
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError as e:
        return -e.errno                          # EINVAL: not a memfd


def data_extents(fd, size):
    """[(start, end)] of the data (non-hole) ranges, by SEEK_DATA/SEEK_HOLE."""
    pos0 = os.lseek(fd, 0, os.SEEK_CUR)
    out, off = [], 0
    try:
        while off < size:
            try:
                start = os.lseek(fd, off, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            off = end
    finally:
        os.lseek(fd, pos0, os.SEEK_SET)
    return out


def digest(fd, kind, token, how):
    st = os.fstat(fd)
    sha, _ = sha256_fd(fd, st.st_size)
    return {"token": token, "kind": kind, "how": how, "size": st.st_size, "sha256": sha,
            "pos": os.lseek(fd, 0, os.SEEK_CUR), "seals": seals_of(fd) if kind == "memfd" else None,
            "accmode": fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE,
            "blocks": st.st_blocks, "dev": st.st_dev, "ino": st.st_ino}


def write_durably(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    dfd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(dfd)
    os.close(dfd)


# ------------------------------------------------------------------ stage 1
def preserve_by_write(fd, token):
    """fd_preserve: one write(2) of "FD TOKEN" by the process that owns fd."""
    w = os.open(INST + "/fd_preserve", os.O_WRONLY)
    try:
        os.write(w, b"%d %d\n" % (fd, token))
    finally:
        os.close(w)


def preserve_by_ioctl(fd, token):
    """LIVEUPDATE_IOCTL_FD_PRESERVE on the instance's control file (LUO v1 ABI)."""
    arg = bytearray(struct.pack("=iIQ", fd, 0, token))    # struct liveupdate_fd, 16 bytes
    c = os.open(INST + "/control", os.O_RDWR)
    try:
        fcntl.ioctl(c, LIVEUPDATE_IOCTL_FD_PRESERVE, arg)
    finally:
        os.close(c)


def make_files():
    m = os.memfd_create("kxvm-random", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    data = os.urandom(4 * MiB)
    os.write(m, data)                                    # shmem: one write is enough
    os.lseek(m, 12345, os.SEEK_SET)
    fcntl.fcntl(m, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)

    s = os.memfd_create("kxvm-sparse", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(s, 16 * MiB)
    for off, n in ((1 * MiB, 64 << 10), (7 * MiB + 4096, 4096), (16 * MiB - 4096, 4096)):
        os.pwrite(s, os.urandom(n), off)
    os.lseek(s, 777, os.SEEK_SET)

    with open(REGULAR, "wb") as f:
        f.write(os.urandom(MiB + 17))
        f.flush()
        os.fsync(f.fileno())
    r = os.open(REGULAR, os.O_RDWR | os.O_CLOEXEC)
    os.lseek(r, 4099, os.SEEK_SET)
    return m, s, r


def cmd_preserve(a):
    os.mkdir(INST)
    m, s, r = make_files()
    # (fd, kind, token, how it is preserved, how stage 2 restores it)
    plan = [(m, "memfd", 101, "fd_preserve", "open"), (s, "memfd", 102, "ioctl", "client"),
            (r, "regular", 103, "fd_preserve", "open")]
    digests = []
    for fd, kind, token, how, restore_via in plan:
        d = digest(fd, kind, token, how)
        d["restore"] = restore_via
        if token == 102:
            d["extents"] = data_extents(fd, d["size"])
        (preserve_by_ioctl if how == "ioctl" else preserve_by_write)(fd, token)
        # the daemon must have taken the descriptor as it was: position untouched
        if os.lseek(fd, 0, os.SEEK_CUR) != d["pos"]:
            sys.exit(f"preserving token {token} moved the file position")
        log(f"preserved token={token} kind={kind} via={how} size={d['size']} pos={d['pos']} seals={d['seals']}")
        digests.append(d)
    write_durably(a.digests, json.dumps({"files": digests}, indent=1))
    open(a.ready, "w").close()
    # A real service keeps running until the shutdown stops it.
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    while True:
        signal.pause()


def unit_commands(path):
    """{"ExecStart": [argv...], "ExecStop": [...]} of a systemd unit file."""
    out = {}
    with open(path) as f:
        for line in f:
            key, sep, value = line.strip().partition("=")
            if sep and key in ("ExecStart", "ExecStop"):
                argv = shlex.split(value.lstrip("-@+!:"))
                # the unit names the installed path; the guest has the wheel's console
                # script in /usr/local/bin (the same path today, but be tolerant)
                if argv and os.path.isabs(argv[0]) and not os.path.exists(argv[0]):
                    argv[0] = shutil.which(os.path.basename(argv[0])) or argv[0]
                out.setdefault(key, []).append(shlex.join(argv))
    return out


def cmd_freeze_cmd(a):
    """The project's freeze hook (systemd/*freeze*.service) as shell assignments
    HOOK_START= (run at boot) and HOOK_STOP= (run by the shutdown of `systemctl kexec`):
    a unit with ExecStop= runs ExecStart when started at boot and does its work in
    ExecStop when the shutdown stops it; a unit without does its work in ExecStart,
    started by the shutdown. (One python3 start: they cost seconds under TCG.)"""
    units = sorted(f for f in (os.listdir(UNITS) if os.path.isdir(UNITS) else [])
                   if "freeze" in f and f.endswith(".service"))
    if not units:
        start, stop = [], [f"echo freeze > {MNT}/state"]
    else:
        cmds = unit_commands(os.path.join(UNITS, units[0]))
        start = cmds.get("ExecStart", []) if "ExecStop" in cmds else []
        stop = cmds.get("ExecStop") or cmds.get("ExecStart", [])
    print(f"HOOK_UNIT={shlex.quote(units[0] if units else 'none')}")
    print(f"HOOK_START={shlex.quote(' && '.join(start) or ':')}")
    print(f"HOOK_STOP={shlex.quote(' && '.join(stop) or ':')}")


# ------------------------------------------------------------------ stage 2
def restore(token, accmode, via):
    """Restore token: via "open", a plain open() of fds/<token> (what a shell script
    does); via "client", kexecfs.client's Instance.restore (which also reinstates the
    file position). Returns (fd, seals or None when the fd cannot tell)."""
    if via == "client":
        from kexecfs.client import Kexecfs                  # noqa: PLC0415
        inst = Kexecfs(MNT).instance(os.path.basename(INST))
        fd = inst.restore(token, accmode)
        return fd, (inst.seals(token) if os.fstat(fd).st_dev == os.stat(MNT).st_dev else None)
    return os.open(f"{INST}/fds/{token}", accmode), None


def xattr_int(token, name):
    """What a proxied restore cannot carry in the descriptor (a FUSE file has no seals,
    and a new open() starts at offset 0) kexecfs publishes as user.kexecfs.* xattrs."""
    try:
        return int(os.getxattr(f"{INST}/fds/{token}", "user.kexecfs." + name))
    except OSError as e:
        return f"unreadable ({e.strerror})"


def check_one(d):
    """Restore one file and compare it with its stage-1 digest: (fd, [problems])."""
    token = d["token"]
    fd, client_seals = restore(token, d["accmode"], d["restore"])
    how = d["restore"]
    bad = []
    st = os.fstat(fd)
    # On a 6.1 kernel (no FUSE passthrough) fds/<token> is served by the daemon: a
    # proxy on kexecfs' own st_dev, with no seals, and a plain open() starts at 0.
    # kexecfs publishes what the descriptor cannot carry as user.kexecfs.* xattrs,
    # and kexecfs.client puts the position back itself.
    proxied = st.st_dev == os.stat(MNT).st_dev
    how += " (proxy)" if proxied else ""
    if st.st_size != d["size"]:
        bad.append(f"size {st.st_size}!={d['size']}")
    sha, n = sha256_fd(fd, d["size"])
    if sha != d["sha256"]:
        bad.append(f"contents differ (sha256 of {n} bytes)")
    pos = os.lseek(fd, 0, os.SEEK_CUR)
    if proxied and d["restore"] == "open":
        if pos != 0:
            bad.append(f"a plain open() of the proxy starts at {pos}, not 0")
        pos = xattr_int(token, "pos")
        how += ", position from xattr"
    if pos != d["pos"]:
        bad.append(f"position {pos}!={d['pos']}")
    if d["kind"] == "memfd":
        if not proxied:
            seals = seals_of(fd)
        elif client_seals is not None:
            seals, how = client_seals, how + ", seals from client"
        else:
            seals, how = xattr_int(token, "seals"), how + ", seals from xattr"
        if seals != d["seals"]:
            bad.append(f"seals {seals}!={d['seals']}")
        if not proxied and "extents" in d and st.st_blocks * 512 >= d["size"]:
            bad.append(f"holes lost ({st.st_blocks * 512} bytes allocated)")
    acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    if acc != d["accmode"]:
        bad.append(f"access mode {acc}!={d['accmode']}")
    if d["kind"] == "regular":
        # The same file, not a copy: a write through the restored descriptor must land
        # in the file on the data disk (and, unproxied, dev/ino must match).
        marker = os.urandom(16)
        os.pwrite(fd, marker, 100)
        with open(REGULAR, "rb") as f:
            f.seek(100)
            if f.read(16) != marker:
                bad.append("a write through the restored fd did not reach " + REGULAR)
        orig = os.stat(REGULAR)
        if not proxied and (st.st_dev, st.st_ino) != (orig.st_dev, orig.st_ino):
            bad.append("not the same file (dev/ino) as " + REGULAR)
    log(f"token={token} kind={d['kind']} preserved-via={d['how']} restored-via={how} size={d['size']} "
        f"pos={d['pos']} seals={d['seals']}: " + ("ok" if not bad else "MISMATCH " + "; ".join(bad)))
    return fd, bad


def read(path):
    with open(path) as f:
        return f.read().strip()


def cmd_verify(a):
    with open(a.digests) as f:
        files = json.load(f)["files"]
    state = read(MNT + "/state")
    if state != "updated":
        print(f"FAIL: global state is '{state}', expected 'updated' (no handover image recovered)")
        return 1
    if not os.path.isdir(INST):
        print(f"FAIL: instance {INST} missing after the kexec")
        return 1
    log(f"fds/: {sorted(os.listdir(INST + '/fds'))}; fd_preserve: {read(INST + '/fd_preserve')!r}")
    problems, fds = [], []
    for d in files:
        try:
            fd, bad = check_one(d)
            fds.append(fd)
            problems += [f"token {d['token']}: {b}" for b in bad]
        except OSError as e:
            problems.append(f"token {d['token']}: restore failed: {e}")
            log(f"token={d['token']}: restore failed: {e}")
    # finish this instance: its update is over, the global machine goes back to normal
    try:
        with open(INST + "/state", "w") as f:
            f.write("finish\n")
    except OSError as e:
        problems.append(f"finish failed: {e}")
    # files restored before finish stay valid after it
    for fd in fds:
        try:
            os.pread(fd, 1, 0)
        except OSError as e:
            problems.append(f"a restored file is unusable after finish: {e}")
        os.close(fd)
    inst_state, glob_state = read(INST + "/state"), read(MNT + "/state")
    if inst_state != "normal" or glob_state != "normal":
        problems.append(f"after finish: instance {inst_state}, global {glob_state}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print(f"{len(files)} files restored and verified (contents, size, position, seals, access mode, identity); finished")
    return 0


# ------------------------------------------------------------------ stand-in
def cmd_standin_write(a):
    data = os.urandom(4 * MiB)
    write_durably(os.path.join(a.image_dir, "standin.img"), data.hex())
    write_durably(a.digests, json.dumps({"standin_sha256": hashlib.sha256(data.hex().encode()).hexdigest()}))
    log("stand-in image written and fsync'd")


def cmd_standin_verify(a):
    with open(a.digests) as f:
        want = json.load(f)["standin_sha256"]
    path = os.path.join(a.image_dir, "standin.img")
    if not os.path.exists(path):
        print(f"FAIL: stand-in image {path} missing after the kexec (no image)")
        return 1
    with open(path, "rb") as f:
        got = hashlib.sha256(f.read()).hexdigest()
    if got != want:
        print("FAIL: stand-in image contents differ")
        return 1
    print("stand-in image survived the kexec intact")
    return 0


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    x = sub.add_parser("preserve")
    x.add_argument("--ready", required=True)
    x.add_argument("--digests", required=True)
    x = sub.add_parser("verify")
    x.add_argument("--digests", required=True)
    sub.add_parser("freeze-cmd")
    for n in ("standin-write", "standin-verify"):
        x = sub.add_parser(n)
        x.add_argument("--image-dir", required=True)
        x.add_argument("--digests", required=True)
    a = p.parse_args()
    fn = {"preserve": cmd_preserve, "verify": cmd_verify, "freeze-cmd": cmd_freeze_cmd,
          "standin-write": cmd_standin_write, "standin-verify": cmd_standin_verify}[a.cmd]
    sys.exit(fn(a) or 0)


if __name__ == "__main__":
    main()
