#!/usr/bin/python3
"""One client of the load test: preserves and unpreserves memfds in one instance, racing
the other clients of that instance for tokens, and keeps a ledger of what it holds.
Standard library only, with the harness's payload module and kexecfs.abi (runs under the
system python as the instance's owner).

    load_worker.py INSTANCE_DIR SEED OPS TOKEN_SPACE

Prints JSON: {"held": {token: sha256}, "ops": n, "counts": {outcome: n}}. Exits non-zero
on an answer the policy does not allow (anything but EEXIST for a taken token and EBUSY
while the machine is prepared or frozen).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent)]  # tests/ (payload) and the checkout (kexecfs.abi)
from kexecfs.abi import FD_PRESERVE, FD_UNPRESERVE, LIVEUPDATE_FD, TOKEN  # noqa: E402
from payload import digest  # noqa: E402


def main() -> None:
    inst, seed, n_ops, space = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    rng = random.Random(seed)
    held: dict[int, str] = {}
    counts: Counter[str] = Counter()
    control = os.open(f"{inst}/control", os.O_RDONLY | os.O_CLOEXEC)
    done = 0
    deadline = time.monotonic() + 600
    while done < n_ops:
        if time.monotonic() > deadline:
            sys.exit(f"{inst}: gave up after 600 s with {done} of {n_ops} operations done")
        if held and rng.random() < 0.35:
            token = rng.choice(sorted(held))
            try:
                if rng.random() < 0.5:
                    fd = os.open(f"{inst}/fd_unpreserve", os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, f"{token}\n".encode())
                    finally:
                        os.close(fd)
                else:
                    fcntl.ioctl(control, FD_UNPRESERVE, bytearray(TOKEN.pack(token)))
            except OSError as exc:
                counts[f"unpreserve:{errno.errorcode.get(exc.errno or 0)}"] += 1
                if exc.errno != errno.EBUSY:
                    sys.exit(f"{inst}: unpreserve of my token {token}: {exc}")
                time.sleep(rng.uniform(0.001, 0.01))
                continue
            del held[token]
            counts["unpreserve:ok"] += 1
        elif rng.random() < 0.1:
            with open(f"{inst}/fd_preserve") as f:
                lines = f.read().splitlines()
            tokens = [int(line.split()[0]) for line in lines]
            if len(tokens) != len(set(tokens)) or not set(held) <= set(tokens):
                sys.exit(f"{inst}: listing has duplicates or lost my tokens")
            counts["list"] += 1
        else:
            token = rng.randrange(space)
            data = rng.randbytes(rng.choice([1, 100, 4096, 5000, 65536, rng.randrange(1, 200_000)]))
            m = os.memfd_create(f"load-{seed}-{token}", os.MFD_CLOEXEC)
            os.write(m, data)
            sha256 = digest(m)
            try:
                if rng.random() < 0.5:
                    fd = os.open(f"{inst}/fd_preserve", os.O_WRONLY | os.O_CLOEXEC)
                    try:
                        os.write(fd, f"{m} {token}\n".encode())
                    finally:
                        os.close(fd)
                else:
                    fcntl.ioctl(control, FD_PRESERVE, bytearray(LIVEUPDATE_FD.pack(m, 0, token)))
            except OSError as exc:
                counts[f"preserve:{errno.errorcode.get(exc.errno or 0)}"] += 1
                if exc.errno not in (errno.EBUSY, errno.EEXIST):
                    sys.exit(f"{inst}: preserve of token {token}: {exc}")
                if exc.errno == errno.EBUSY:  # (EEXIST: I, or another client, hold that token)
                    time.sleep(rng.uniform(0.001, 0.01))
                continue
            finally:
                os.close(m)  # the daemon holds its own reference now
            if token in held:
                sys.exit(f"{inst}: preserved token {token} twice")
            held[token] = sha256
            counts["preserve:ok"] += 1
        done += 1
    os.close(control)
    print(json.dumps({"held": held, "ops": done, "counts": counts}))


if __name__ == "__main__":
    main()
