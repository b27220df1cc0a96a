#!/usr/bin/env python3
"""A service whose memory survives a kexec: the kexecfs-example.service program.

usage: keep_memfd.py INSTANCE_DIR   (its kexecfs instance, e.g. bind-mounted at /run/liveupdate)

On start it restores its memfd (token 1) if the instance says ``updated``, reports
what it found and ends its update with ``finish``; otherwise it starts a new memfd.
Either way it preserves the memfd and counts its own starts in it, so the count goes
on across kexecs. Then it waits for the next transition and logs it.
"""

import os
import sys
from pathlib import Path

from kexecfs.client import InstanceDir

TOKEN = 1
SIZE = 4096


def main(instance_dir: str) -> None:
    svc = InstanceDir(Path(instance_dir))
    if svc.state() == "updated" and any(p.token == TOKEN for p in svc.preserved()):
        memfd = svc.restore(TOKEN)
        starts = int.from_bytes(os.pread(memfd, 8, 0), "little")
        svc.finish()  # the restored file stays preserved for the next update
        print(f"restored memfd after a kexec: started {starts} time(s) before", flush=True)
    else:
        if any(p.token == TOKEN for p in svc.preserved()):
            svc.unpreserve(TOKEN)  # restarted without a kexec: that memfd is not ours any more
        memfd = os.memfd_create("kexecfs-example", os.MFD_ALLOW_SEALING)
        os.ftruncate(memfd, SIZE)
        starts = 0
        svc.preserve(memfd, TOKEN)
        print("new memfd preserved as token 1", flush=True)
    os.pwrite(memfd, (starts + 1).to_bytes(8, "little"), 0)
    while True:
        print(f"instance state: {svc.wait_for_state()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/run/liveupdate")
