"""Load: 32 concurrent clients (processes, as the owners of four delegated instances)
preserve and unpreserve thousands of memfds, racing each other for tokens, while the
operator drives the state machine through prepare/cancel and prepare/freeze/cancel
cycles. No token is lost or held twice, every client sees EEXIST/EBUSY only where the
policy says so, and the image of the simulated kexec that follows holds exactly the
files the clients hold, byte for byte.

Both sides do a fixed amount of work (each client its operations, the operator its
cycles), and the checks are about what happened, not how much of it fitted in a time:
a slow or a loaded machine changes the interleaving, not the verdict.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import threading
import time
from pathlib import Path

import pytest

from harness import (IMAGE, OTHERS_PYTHON, Daemon, Racer, digest, listing, needs_fuse, public_copy,
                     sh_state_event, state, write_errno)
from kexecfs.core.image import HandoverImage

pytestmark = needs_fuse

OWNERS = [3000, 3001, 3002, 3003]


# What a client may see: its own successes, EEXIST for a token someone holds, EBUSY
# while the machine is prepared or frozen (load_worker.py exits on anything else).
CLIENT_OUTCOMES = {"preserve:ok", "preserve:EEXIST", "preserve:EBUSY", "unpreserve:ok", "unpreserve:EBUSY", "list"}


def operator_plan(cycles: int) -> list[list[str]]:
    """The operator's events: ``cycles`` times prepare, cancel or (about one in three)
    prepare, freeze, cancel."""
    rng = random.Random(4)
    return [["prepare", "freeze", "cancel"] if rng.random() < 0.3 else ["prepare", "cancel"] for _ in range(cycles)]


def drive_state_machine(mnt: Path, names: list[str], plan: list[list[str]], clients_done: threading.Event,
                        tally: collections.Counter) -> None:  # type: ignore[type-arg]
    """The operator: each cycle of ``plan``, every event of which must succeed. A cycle
    starts once the clients changed a listing since the last one (or all finished), so
    the cycles fall among the clients' operations whichever side is faster."""
    pauses = random.Random(5)
    seen: list[str] | None = None
    for events in plan:
        while True:
            now = [(mnt / name / "fd_preserve").read_text() for name in names]
            if now != seen or clients_done.is_set():
                break
            time.sleep(0.002)
        seen = now
        for event in events:
            err = write_errno(mnt / "state", event.encode())
            tally[f"{event}:{err}"] += 1
            assert err == 0, f"{event}: errno {err}"
            time.sleep(pauses.uniform(0, 0.01))  # a moment in each state for clients to run into


def run_load(tmp_path: Path, clients: int, ops: int, space: int, cycles: int) -> None:
    d = Daemon.at(tmp_path)
    d.start()
    mnt = d.mountpoint
    try:
        names = [f"load{i}" for i in range(len(OWNERS))]
        for name, uid in zip(names, OWNERS):
            os.mkdir(mnt / name)
            os.chown(mnt / name, uid, uid)
        clients_done = threading.Event()
        tally: collections.Counter[str] = collections.Counter()
        plan = operator_plan(cycles)
        driver = Racer(drive_state_machine, mnt, names, plan, clients_done, tally)
        started = time.monotonic()
        procs = []
        for c in range(clients):
            i = c % len(OWNERS)
            procs.append((names[i], subprocess.Popen(
                ["setpriv", f"--reuid={OWNERS[i]}", f"--regid={OWNERS[i]}", "--clear-groups", OTHERS_PYTHON,
                 str(public_copy("tests/hard/load_worker.py")), str(mnt / names[i]), str(c), str(ops), str(space)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        driver.start()
        results: dict[str, list[dict]] = collections.defaultdict(list)  # type: ignore[type-arg]
        try:
            for name, p in procs:
                out, err = p.communicate(timeout=600)
                assert p.returncode == 0, f"client of {name}: {err}"
                results[name].append(json.loads(out))
        finally:
            clients_done.set()
            driver.join(60)
        elapsed = time.monotonic() - started
        assert not driver.is_alive(), "the operator hung"
        assert tally == collections.Counter(f"{event}:0" for events in plan for event in events), \
            "the operator's events did not all happen, or not all succeeded"
        assert state(mnt) == "normal"
        # Each client did all its operations, and its ledger adds up: what it holds is
        # what it preserved less what it unpreserved.
        for name, ledgers in results.items():
            for ledger in ledgers:
                c = ledger["counts"]
                assert ledger["ops"] == ops == c.get("preserve:ok", 0) + c.get("unpreserve:ok", 0) + c.get("list", 0)
                assert set(c) <= CLIENT_OUTCOMES, f"{name}: outcomes outside the policy: {set(c) - CLIENT_OUTCOMES}"
                assert c.get("preserve:ok", 0) - c.get("unpreserve:ok", 0) == len(ledger["held"]), f"{name}: ledger"
        # No token lost, none held twice: the listing is the union of the clients' ledgers.
        expected: dict[tuple[str, int], str] = {}
        for name, ledgers in results.items():
            for ledger in ledgers:
                for token, sha256 in ledger["held"].items():
                    assert (name, int(token)) not in expected, f"{name}/{token} held by two clients"
                    expected[name, int(token)] = sha256
            assert listing(mnt, name) == sorted(t for n, t in expected if n == name), f"{name}: tokens differ"
        counts = collections.Counter()  # type: ignore[var-annotated]
        for ledgers in results.values():
            for ledger in ledgers:
                counts.update(ledger["counts"])
        total_ops = sum(ledger["ops"] for ledgers in results.values() for ledger in ledgers)
        # The simulated kexec: the image holds exactly those files, and each comes back whole.
        for event in ("prepare", "kexec"):
            sh_state_event(mnt, event)
        image = HandoverImage.open(d.image_dir / IMAGE)
        try:
            image.verify()
            in_image = {(f["instance"], f["token"]) for f in image.files}
        finally:
            image.close()
        assert in_image == set(expected), "the image does not hold exactly the registered files"
        for (name, token), sha256 in expected.items():
            fd = os.open(mnt / name / "fds" / str(token), os.O_RDONLY)
            try:
                assert digest(fd) == sha256, f"{name}/{token}: contents differ"
            finally:
                os.close(fd)
        sh_state_event(mnt, "finish")
        print(f"load: {clients} clients, {total_ops} operations in {elapsed:.1f} s, {len(expected)} files "
              f"preserved at the kexec; client outcomes {dict(counts)}; operator {dict(tally)}")
    finally:
        d.stop()
    d.check_log()


@pytest.mark.nondeterministic
def test_32_clients_thousands_of_files(tmp_path: Path) -> None:
    run_load(tmp_path, clients=32, ops=200, space=600, cycles=40)


def test_8_clients_fast(tmp_path: Path) -> None:
    run_load(tmp_path, clients=8, ops=40, space=50, cycles=6)


def test_more_files_than_a_default_soft_fd_limit(tmp_path: Path) -> None:
    """Regression: every preserved file is a descriptor the daemon holds, and systemd
    starts services with a soft RLIMIT_NOFILE of 1024: the thousand-and-somethingth
    preserve failed with EMFILE. The daemon now raises its soft limit to the hard one."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    d = Daemon.at(tmp_path)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, max(hard, 4096)))  # what the daemon inherits
    try:
        d.start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        os.mkdir(d.mountpoint / "many")
        m = os.memfd_create("many")
        os.write(m, b"x")
        for token in range(600):
            err = write_errno(d.mountpoint / "many/fd_preserve", f"{m} {token}".encode())
            assert err == 0, f"preserve number {token}: errno {err}"
        os.close(m)
        assert len(listing(d.mountpoint, "many")) == 600
    finally:
        d.stop()
    d.check_log()
