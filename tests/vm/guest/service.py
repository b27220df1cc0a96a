#!/usr/bin/python3
"""The "service" of the kexec test guest: what a VMM or a database would do with kexecfs.

Runs inside the guest (Debian's python3, stdlib only except the optional kexecfs.client).

  preserve        stage 1: mkdir /run/kexecfs/svc, preserve three files, record their
                  digests on the data disk, then keep running (holding the fds) until the
                  shutdown stops it
  verify          stage 2: restore every file from /run/kexecfs/svc/fds/<token>, compare
                  it with the digests, finish; last line of output = the verdict
  freeze-cmd      print the command the project's freeze hook (systemd/*freeze*) runs
  standin-write / standin-verify
                  no kexecfs: a file written + fsync'd into the image directory in stage 1,
                  checked in stage 2 (proves the VM plumbing on its own)

The three preserved files (tokens are fixed so stage 2 knows them from the digests):
  101 memfd, 4 MiB of random data, position 12345, seals SHRINK|GROW   (via fd_preserve)
  102 sparse memfd, 16 MiB with three small data islands, position 777 (via control ioctl)
  103 regular file on the ext4 data disk, opened O_RDWR at offset 4099 (via fd_preserve)
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
    plan = [(m, "memfd", 101, "fd_preserve"), (s, "memfd", 102, "ioctl"),
            (r, "regular", 103, "fd_preserve")]
    digests = []
    for fd, kind, token, how in plan:
        d = digest(fd, kind, token, how)
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


def cmd_freeze_cmd(a):
    """The ExecStart= lines of the project's freeze unit, as one shell command."""
    units = sorted(f for f in (os.listdir(UNITS) if os.path.isdir(UNITS) else []) if "freeze" in f)
    cmds = []
    for u in units:
        with open(os.path.join(UNITS, u)) as f:
            for line in f:
                line = line.strip()
                if line.startswith("ExecStart="):
                    argv = shlex.split(line[len("ExecStart="):].lstrip("-@+!:"))
                    # the unit names its installed path; the guest has the wheel's
                    # console script wherever pip put it
                    if argv and os.path.isabs(argv[0]) and not os.path.exists(argv[0]):
                        argv[0] = shutil.which(os.path.basename(argv[0])) or argv[0]
                    cmds.append(shlex.join(argv))
        if cmds:
            break
    print(" && ".join(cmds) if cmds else f"echo freeze > {MNT}/state")


# ------------------------------------------------------------------ stage 2
def restore(token, accmode):
    """Open fds/<token>; through kexecfs.client when it is installed (it may hand back the
    restored memfd itself, position included), else a plain open() of the entry."""
    path = f"{INST}/fds/{token}"
    try:
        from kexecfs import client                       # noqa: PLC0415
    except ImportError:
        client = None
    fn = getattr(client, "restore", None) if client else None
    if fn is not None:
        try:
            return fn(path), "kexecfs.client.restore"
        except TypeError:
            return fn(INST, token), "kexecfs.client.restore"
    return os.open(path, accmode), "open"


def check_one(d):
    token = d["token"]
    fd, how = restore(token, d["accmode"])
    bad = []
    try:
        st = os.fstat(fd)
        if st.st_size != d["size"]:
            bad.append(f"size {st.st_size}!={d['size']}")
        sha, n = sha256_fd(fd, d["size"])
        if sha != d["sha256"]:
            bad.append(f"contents differ (sha256 of {n} bytes)")
        pos = os.lseek(fd, 0, os.SEEK_CUR)
        if pos != d["pos"]:
            bad.append(f"position {pos}!={d['pos']}")
        if d["kind"] == "memfd":
            seals = seals_of(fd)
            if seals != d["seals"]:
                bad.append(f"seals {seals}!={d['seals']}")
        acc = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
        if acc != d["accmode"]:
            bad.append(f"access mode {acc}!={d['accmode']}")
        if d["kind"] == "regular":
            orig = os.stat(REGULAR)
            if (st.st_dev, st.st_ino) != (orig.st_dev, orig.st_ino):
                bad.append("not the same file (dev/ino) as " + REGULAR)
        if "extents" in d and seals_of(fd) >= 0:             # holes: only on a real memfd
            ext = [list(e) for e in data_extents(fd, d["size"])]
            if st.st_blocks * 512 >= d["size"]:
                bad.append(f"holes lost ({st.st_blocks * 512} bytes allocated)")
            log(f"  token {token}: data extents {ext} (stage 1: {d['extents']})")
    finally:
        os.close(fd)
    log(f"token={token} kind={d['kind']} restored-by={how} size={d['size']} pos={d['pos']} "
        f"seals={d['seals']}: " + ("ok" if not bad else "MISMATCH " + "; ".join(bad)))
    return bad


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
    problems = []
    for d in files:
        try:
            problems += [f"token {d['token']}: {b}" for b in check_one(d)]
        except OSError as e:
            problems.append(f"token {d['token']}: restore failed: {e}")
            log(f"token={d['token']}: restore failed: {e}")
    # finish this instance: its update is over, the global machine goes back to normal
    try:
        with open(INST + "/state", "w") as f:
            f.write("finish\n")
    except OSError as e:
        problems.append(f"finish failed: {e}")
    inst_state, glob_state = read(INST + "/state"), read(MNT + "/state")
    if inst_state != "normal" or glob_state != "normal":
        problems.append(f"after finish: instance {inst_state}, global {glob_state}")
    if problems:
        print("FAIL: " + "; ".join(problems))
        return 1
    print(f"{len(files)} files restored and verified (contents, size, position, seals, access mode); finished")
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
