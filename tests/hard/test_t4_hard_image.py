"""Damaged handover images: thousands of random corruptions of a real image — bit flips,
overwrites, truncations, insertions, deletions, msgpack type confusion and bad values in
the index (with the digest recomputed, so that the schema check is what must catch
them), oversized lengths — each refused cleanly: ``HandoverImage.open``/``verify`` raise
ImageError and nothing else, in bounded time and memory; when a corruption is harmless
(a flipped padding byte), what is read back is exactly what was written. A recovery
(``LiveUpdate.boot``) never raises; a sample goes through a real daemon start.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import random
import resource
import shutil
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import IMAGE, Daemon, MiB, needs_fuse, state, status
from kexecfs.core.image import DATA_START, PREAMBLE, TRAILER, TRAILER_MAGIC, HandoverImage, ImageError
from kexecfs.core.instance import Caller, Instance
from kexecfs.core.machine import LiveUpdate, State

ROOT = Caller(pid=os.getpid(), uid=0, gid=0, via="test")
Source = tuple[bytes, dict[tuple[str, int], bytes], Path]
CASE_SECONDS = 2.0  # no single corruption may take longer to refuse (the image is ~3 MiB)


# ---------------------------------------------------------------------------- a real image

def build_image(directory: Path, disk: Path) -> tuple[bytes, dict[tuple[str, int], bytes]]:
    """A real image written by the core: two instances, a dense memfd over two chunks, a
    sparse sealed one, an empty one, a regular file. Returns its bytes and the contents."""
    machine = LiveUpdate.boot(directory, boot_id="corruption-source")
    vm = machine.create_instance("vm", ROOT)
    db = machine.create_instance("db", Caller(pid=os.getpid(), uid=65534, gid=65534))
    db.uid = db.gid = 65534
    rng = random.Random(1)
    contents: dict[tuple[str, int], bytes] = {}

    def memfd(inst: Instance, token: int, data: bytes, holes: bool = False, seals: int = 0) -> None:
        fd = os.memfd_create(f"src-{token}", os.MFD_ALLOW_SEALING)
        if holes:
            os.ftruncate(fd, len(data))
            for off in range(0, len(data), 256 << 10):
                os.pwrite(fd, data[off:off + 4096], off)
                contents_buf[off:off + 4096] = data[off:off + 4096]
        else:
            os.pwrite(fd, data, 0)
        if seals:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        os.lseek(fd, 77, os.SEEK_SET)
        machine.preserve(inst, ROOT, fd, token)

    contents_buf = bytearray(MiB)
    memfd(vm, 1, rng.randbytes(MiB + 300_000))
    contents[("vm", 1)] = _read(machine, "vm", 1)
    memfd(vm, 2, rng.randbytes(MiB), holes=True, seals=fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    contents[("vm", 2)] = bytes(contents_buf)
    memfd(db, 0, b"")
    contents[("db", 0)] = b""
    disk.write_bytes(rng.randbytes(5000))
    fd = os.open(disk, os.O_RDWR)
    machine.preserve(db, ROOT, fd, 9)
    for event in ("prepare", "freeze"):
        machine.begin(event, ROOT)()
    assert machine.state is State.FROZEN
    data = (directory / IMAGE).read_bytes()
    for inst in machine.instances.values():
        inst.drop_files()
    return data, contents


def _read(machine: LiveUpdate, inst: str, token: int) -> bytes:
    fd = machine.instances[inst].files[token].fd
    return os.pread(fd, os.fstat(fd).st_size, 0)


class Layout:
    """Where the parts of an image are, from its trailer."""

    def __init__(self, data: bytes) -> None:
        _magic, self.index_offset, self.index_len, self.data_end, _digest = TRAILER.unpack(data[-TRAILER.size:])
        self.size = len(data)
        self.index = msgpack.unpackb(data[self.index_offset:self.index_offset + self.index_len], raw=False)


def with_index(original: bytes, blob: bytes, *, data_end: int | None = None, index_len: int | None = None,
               index_offset: int | None = None) -> bytes:
    """``original`` with its index replaced by ``blob``, the trailer and digest made to match
    (so only the index's meaning can be wrong), or with lying offsets if given."""
    lay = Layout(original)
    preamble = original[:PREAMBLE.size]
    digest = hashlib.sha256(preamble + blob).digest()
    trailer = TRAILER.pack(TRAILER_MAGIC, lay.index_offset if index_offset is None else index_offset,
                           len(blob) if index_len is None else index_len,
                           lay.data_end if data_end is None else data_end, digest)
    return original[:lay.index_offset] + blob + trailer


def pack(index: Any) -> bytes:
    return msgpack.packb(index, use_bin_type=True)


# ---------------------------------------------------------------------------- corruptions

def _paths(node: Any, prefix: tuple = ()) -> Iterator[tuple]:  # type: ignore[type-arg]
    """Every place in the index a value sits at (dict keys and list indexes)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


def _set(root: Any, path: tuple, value: Any) -> Any:  # type: ignore[type-arg]
    if not path:
        return value
    node = root
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return root


def _get(root: Any, path: tuple) -> Any:  # type: ignore[type-arg]
    for key in path:
        root = root[key]
    return root


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"  # int and float both make a number: not what type confusion means here
    return type(value).__name__


def confused_value(rng: random.Random, old: Any) -> Any:
    """A value of another msgpack type than ``old``."""
    makers: dict[str, Callable[[], Any]] = {
        "number": lambda: rng.choice([0, -1, 1, 2 ** 63, 2 ** 64 - 1, -(2 ** 63), rng.getrandbits(40), 3.5, -0.0]),
        "str": lambda: rng.choice(["", "x", "../../etc/passwd", "\0", "é" * 100, "memfd", "file", "instance"]),
        "bytes": lambda: rng.randbytes(rng.randrange(0, 40)),
        "NoneType": lambda: None,
        "bool": lambda: rng.choice([True, False]),
        "list": lambda: rng.choice([[], [1, 2, 3], [[0, 1, 4096, [0]]], ["a"], [None]]),
        "dict": lambda: rng.choice([{}, {"type": "file"}, {"a": 1}, {"type": "instance", "name": 1}]),
    }
    others = [k for k in makers if k != _kind(old)]
    return makers[rng.choice(others)]()


# Values of the right type but wrong: what a schema must also refuse, by record kind.
# Instance inode numbers are the recovery's to check (it numbers instances): those are
# refused when the image is recovered rather than when it is opened.
BAD_VALUES: dict[str, dict[str, list[Any]]] = {
    "": {"chunk_size": [0, 1, 4095, 2 ** 31, -4096, 2 ** 64 - 1], "kexec_count": [-1, 2 ** 64 - 1]},
    "instance": {"name": ["", ".hidden", "state", "a/b", "x" * 64, "a\0b", "..", "con trol"],
                 "uid": [-1, 2 ** 32, 2 ** 63], "gid": [-1, 2 ** 32], "mode": [-1, 0o170000, 2 ** 40]},
    "memfd": {"token": [-1, -(2 ** 63)], "size": [-1, 2 ** 63, 2 ** 64 - 1, 1], "pos": [-1, 2 ** 63],
              "seals": [-1, 0x7FFF0000, 2 ** 40], "mode": [-1, 0o170000], "name": ["a\0b", "x" * 250],
              "flags": [-1, 2 ** 40]},
    "file": {"token": [-1], "size": [-1], "pos": [-1, 2 ** 63], "path": ["", "relative/path", "/etc/\0passwd"],
             "flags": [-1, os.O_RDWR | os.O_TRUNC, os.O_CREAT | os.O_WRONLY, os.O_RDWR | os.O_DIRECTORY, 2 ** 40],
             "handle_type": [-1, 2 ** 40], "handle": [bytes(129)], "ino": [-1]},
}
BAD_INODES = [-16, 0, 1, 2, 3, 15, 17, 2 ** 62 + 1, 2 ** 64 - 1]


def bad_value_mutations(index: dict) -> list[tuple[str, dict]]:  # type: ignore[type-arg]
    """Every field of BAD_VALUES in every record, set to each bad value; plus structural
    mischief: duplicate instances and tokens, extents out of bounds or overlapping."""
    out = []
    for path in _paths(index):
        if not path or not isinstance(path[-1], str):
            continue
        record = _get(index, path[:-1])
        kind = "" if len(path) == 1 else record.get("kind", record.get("type")) if len(path) == 3 else None
        for value in BAD_VALUES.get(kind, {}).get(path[-1], []):  # type: ignore[arg-type]
            if path[-1] == "size" and value == 1 and not record.get("extents"):
                continue  # a size is only wrong when it cuts off the contents
            out.append((f"{'.'.join(map(str, path))}={value!r}"[:80], _set(copy.deepcopy(index), path, value)))
    records = index["records"]
    inst_at = next(i for i, r in enumerate(records) if r["type"] == "instance")
    file_at = [i for i, r in enumerate(records) if r["type"] == "file"]
    dup = copy.deepcopy(index)
    dup["records"].append(copy.deepcopy(records[inst_at]))
    out.append(("duplicate instance", dup))
    dup = copy.deepcopy(index)
    dup["records"].append(copy.deepcopy(records[file_at[0]]))
    out.append(("duplicate token", dup))
    ino = copy.deepcopy(index)
    other = next(i for i, r in enumerate(records) if r["type"] == "instance" and i != inst_at)
    ino["records"][other]["ino"] = records[inst_at]["ino"]
    out.append(("two instances, one inode", ino))
    for i in file_at:
        for ext_i, ext in enumerate(records[i].get("extents", [])):
            start, length, image_off, crcs = ext
            for label, new in [("beyond size", [records[i]["size"], length, image_off, crcs]),
                               ("huge start", [2 ** 62, length, image_off, crcs]),
                               ("huge length", [start, 2 ** 63, image_off, crcs]),
                               ("zero length", [start, 0, image_off, []]),
                               ("negative", [-4096, length, image_off, crcs]),
                               ("far away", [start, length, image_off + 2 ** 40, crcs]),
                               ("before data", [start, length, 0, crcs]),
                               ("crc count", [start, length, image_off, crcs + [0]]),
                               ("crc type", [start, length, image_off, ["x"] * len(crcs)]),
                               ("crc huge", [start, length, image_off, [2 ** 64 - 1] * len(crcs)]),
                               ("5 fields", [start, length, image_off, crcs, 0])]:
                m = copy.deepcopy(index)
                m["records"][i]["extents"][ext_i] = new
                out.append((f"record {i} extent {ext_i} {label}", m))
    return out



def byte_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    lay = Layout(data)
    regions = [(0, PREAMBLE.size), (DATA_START, lay.data_end), (lay.index_offset, lay.index_offset + lay.index_len),
               (len(data) - TRAILER.size, len(data)), (0, len(data))]
    lo, hi = rng.choice(regions)
    off = rng.randrange(lo, hi)
    how = rng.choice(["flip", "flip", "byte", "run", "truncate", "insert", "delete", "append", "zero-page"])
    b = bytearray(data)
    if how == "flip":
        b[off] ^= 1 << rng.randrange(8)
    elif how == "byte":
        b[off] = rng.randrange(256)
    elif how == "run":
        n = rng.randrange(1, 64)
        b[off:off + n] = rng.randbytes(n)[:len(b) - off]
    elif how == "truncate":
        del b[off:]
    elif how == "insert":
        b[off:off] = rng.randbytes(rng.choice([1, 7, 4096, rng.randrange(1, 100)]))
    elif how == "delete":
        del b[off:off + rng.randrange(1, 200)]
    elif how == "append":
        b += rng.randbytes(rng.randrange(1, 5000))
    else:
        page = off // 4096 * 4096
        b[page:page + 4096] = bytes(len(b[page:page + 4096]))
    return f"{how}@{off}", bytes(b)


def trailer_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """Lengths and offsets in the trailer that lie: oversized, negative-looking, crossing."""
    lay = Layout(data)
    blob = data[lay.index_offset:lay.index_offset + lay.index_len]
    field_ = rng.choice(["index_len", "index_offset", "data_end"])
    value = rng.choice([0, 1, 2 ** 63, 2 ** 64 - 1, lay.size, lay.size * 2, 256 << 20, (256 << 20) + 1,
                        lay.index_offset + 1, lay.index_len - 1, lay.data_end + 4096, DATA_START - 1])
    return f"trailer {field_}={value}", with_index(data, blob, **{field_: value})


def msgpack_header_mutation(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """An array/map/str/bin header in the index claiming far more than there is (digest recomputed)."""
    lay = Layout(data)
    blob = bytearray(data[lay.index_offset:lay.index_offset + lay.index_len])
    off = rng.randrange(len(blob))
    header = rng.choice([b"\xdd", b"\xdf", b"\xdb", b"\xc6"]) + struct.pack(">I", rng.choice(
        [2 ** 32 - 1, 10_000_001, 1 << 20, len(blob) * 2]))
    blob[off:off + 5] = header
    return f"msgpack header {header.hex()}@{off}", with_index(data, bytes(blob))


# ---------------------------------------------------------------------------- the oracle

class Oracle:
    """Opens, verifies and (sometimes) recovers one corrupted image, and judges the result."""

    def __init__(self, tmp: Path, original: bytes, contents: dict[tuple[str, int], bytes], disk: Path) -> None:
        self.tmp = tmp
        self.original = original
        self.contents = contents
        self.disk = disk
        self.refused = self.accepted = self.booted = 0
        self.slowest = (0.0, "")
        ref = self._open_bytes(original)
        self.reference = self._describe(ref)
        ref.close()

    def _write(self, data: bytes) -> Path:
        path = self.tmp / "case" / IMAGE
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        return path

    def _open_bytes(self, data: bytes) -> HandoverImage:
        image = HandoverImage.open(self._write(data))
        image.verify()
        return image

    @staticmethod
    def _describe(image: HandoverImage) -> dict:  # type: ignore[type-arg]
        d = image.describe()
        d.pop("path")
        d.pop("size")
        return d

    def check(self, label: str, data: bytes, *, must_refuse: bool | str, boot: bool) -> None:
        """``must_refuse``: the image must be refused by open/verify (True), by the
        recovery ("recovery"), may be accepted if it reads back as the original (False),
        or may be either ("either", for an index rewritten with a valid digest)."""
        started = time.monotonic()
        try:
            image = HandoverImage.open(self._write(data))
        except ImageError:
            self.refused += 1
        except Exception as exc:  # the point of the test
            raise AssertionError(f"{label}: HandoverImage.open raised {type(exc).__name__}: {exc}") from exc
        else:
            try:
                image.verify()
                if must_refuse == "either":
                    self.accepted += 1
                elif must_refuse != "recovery":
                    self._check_accepted(label, image, bool(must_refuse))
            except ImageError:
                self.refused += 1
            except AssertionError:
                raise
            except Exception as exc:
                raise AssertionError(f"{label}: verify raised {type(exc).__name__}: {exc}") from exc
            finally:
                image.close()
        if boot or must_refuse == "recovery":
            self._boot(label, data, must_refuse)
        took = time.monotonic() - started
        self.slowest = max(self.slowest, (took, label))
        assert took < CASE_SECONDS, f"{label}: took {took:.2f} s"

    def _check_accepted(self, label: str, image: HandoverImage, must_refuse: bool) -> None:
        """A corruption the image format let through must have changed nothing that matters
        (informational fields, the writer's and the state word, may read differently)."""
        assert not must_refuse, f"{label}: accepted an image whose index is wrong"
        got, want = self._describe(image), self.reference
        def meaningful(d: dict) -> dict:  # type: ignore[type-arg]
            return {k: v for k, v in d.items() if k not in ("writer", "state")}
        assert meaningful(got) == meaningful(want), f"{label}: accepted, but reads back differently"
        assert got["writer"]["kexec_count"] == want["writer"]["kexec_count"]
        for rec in image.files:
            fd = os.memfd_create("check")
            try:
                image.copy_into(fd, rec.get("extents", []))
                size = rec["size"] if rec["kind"] == "memfd" else 0
                if rec["kind"] == "memfd":
                    os.ftruncate(fd, size)
                    got = os.pread(fd, size + 1, 0)
                    assert got == self.contents[rec["instance"], rec["token"]], f"{label}: contents differ"
            finally:
                os.close(fd)
        self.accepted += 1

    def _boot(self, label: str, data: bytes, must_refuse: bool | str = False) -> None:
        directory = self.tmp / "boot"
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir()
        (directory / IMAGE).write_bytes(data)
        try:
            machine = LiveUpdate.boot(directory, boot_id="after")
        except Exception as exc:
            raise AssertionError(f"{label}: LiveUpdate.boot raised {type(exc).__name__}: {exc}") from exc
        self.booted += 1
        try:
            if machine.state is State.NORMAL:
                assert not machine.instances and not (directory / IMAGE).exists()
                assert list(directory.glob(f"{IMAGE}.damaged-*")), f"{label}: not kept aside"
                assert machine.last_error.startswith("recovery: ")
            elif must_refuse != "either":
                assert must_refuse not in (True, "recovery"), f"{label}: recovered an image that must be refused"
                assert machine.state is State.UPDATED
                for (inst, token), want in self.contents.items():
                    pf = machine.instances[inst].files[token]
                    assert pf.error is None, f"{label}: {inst}/{token}: {pf.error}"
                    if pf.kind.name == "memfd":
                        assert os.pread(pf.fd, len(want) + 1, 0) == want, f"{label}: {inst}/{token} differs"
        finally:
            for inst in machine.instances.values():
                inst.drop_files()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[tuple[str, int], bytes], Path]:
    tmp = tmp_path_factory.mktemp("source")
    disk = tmp / "regular-file"
    data, contents = build_image(tmp / "images", disk)
    return data, contents, disk


def _oracle(tmp_path: Path, source: Source) -> Oracle:
    data, contents, disk = source
    return Oracle(tmp_path, data, contents, disk)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_corruptions(oracle: Oracle, seed: int, count: int, boot_every: int) -> dict[str, int]:
    rng = random.Random(seed)
    index = Layout(oracle.original).index
    confusable = [p for p in _paths(index) if p]
    tally: dict[str, int] = {}
    for n in range(count):
        family = rng.choice(["bytes", "bytes", "bytes", "confusion", "confusion", "trailer", "header"])
        boot = n % boot_every == 0
        if family == "bytes":
            label, data = byte_mutation(rng, oracle.original)
            oracle.check(f"#{n} {label}", data, must_refuse=False, boot=boot)
        elif family == "confusion":
            path = rng.choice(confusable)
            m = _set(copy.deepcopy(index), path, confused_value(rng, _get(index, path)))
            label = f"#{n} {'.'.join(map(str, path))} := {str(_get(m, path))[:30]!r}"
            oracle.check(label, with_index(oracle.original, pack(m)), must_refuse=_matters(path), boot=boot)
        elif family == "trailer":
            label, data = trailer_mutation(rng, oracle.original)
            oracle.check(f"#{n} {label}", data, must_refuse=False, boot=boot)
        else:
            label, data = msgpack_header_mutation(rng, oracle.original)
            # Five bytes inside a string's payload only change the string: any outcome but
            # an exception, a hang or a memory blow-up is sound.
            oracle.check(f"#{n} {label}", data, must_refuse="either", boot=boot)
        tally[family] = tally.get(family, 0) + 1
    return tally


# Informational fields: a value of another type there changes nothing kexecfs does
# (freeze_started only dates the blackout that status reports; not a float: unknown).
INFORMATIONAL = {("writer", "hostname"), ("writer", "created"), ("writer", "version"), ("writer", "boot_id"),
                 ("writer", "freeze_started"), ("state",)}


def _matters(path: tuple) -> bool:  # type: ignore[type-arg]
    return path[:2] not in INFORMATIONAL and path[:1] not in INFORMATIONAL


def test_every_bad_value_in_the_index_is_refused(tmp_path: Path, source: Source) -> None:
    """Right types, wrong values (digest recomputed): the schema check refuses each one,
    and a recovery of each starts normal with the image kept aside."""
    oracle = _oracle(tmp_path, source)
    index = Layout(oracle.original).index
    mutations = bad_value_mutations(index)
    for label, m in mutations:
        oracle.check(label, with_index(oracle.original, pack(m)), must_refuse=True, boot=True)
    assert oracle.accepted == 0
    inodes = 0
    for i, record in enumerate(index["records"]):
        if record["type"] == "instance":
            for ino in BAD_INODES:
                m = _set(copy.deepcopy(index), ("records", i, "ino"), ino)
                oracle.check(f"records.{i}.ino={ino}", with_index(oracle.original, pack(m)), must_refuse="recovery",
                             boot=True)
                inodes += 1
    print(f"{len(mutations) + inodes} bad values, all refused; slowest {oracle.slowest[0]:.3f} s")


def test_file_of_an_unknown_instance_or_kind_is_skipped(tmp_path: Path, source: Source) -> None:
    """SPEC: a record of an unknown kind is skipped with a warning (a newer writer's); so is a
    file of an instance the image does not hold. The rest is recovered."""
    oracle = _oracle(tmp_path, source)
    index = Layout(oracle.original).index
    at = next(i for i, r in enumerate(index["records"]) if r["type"] == "file" and r["kind"] == "memfd")
    gone = index["records"][at]
    for field_, value in (("kind", "eventfd"), ("instance", "nope")):
        directory = tmp_path / field_
        directory.mkdir()
        (directory / IMAGE).write_bytes(with_index(oracle.original, pack(_set(
            copy.deepcopy(index), ("records", at, field_), value))))
        machine = LiveUpdate.boot(directory, boot_id="skip")
        try:
            assert machine.state is State.UPDATED
            assert gone["token"] not in machine.instances[gone["instance"]].files
            files = sum(r["type"] == "file" for r in index["records"])
            assert sum(len(i.files) for i in machine.instances.values()) == files - 1
        finally:
            for inst in machine.instances.values():
                inst.drop_files()


def test_type_confusion_of_every_field(tmp_path: Path, source: Source) -> None:
    """Each place in the index, in turn, given a value of every other msgpack type."""
    oracle = _oracle(tmp_path, source)
    index = Layout(oracle.original).index
    rng = random.Random(3)
    n = 0
    for path in _paths(index):
        if not path:
            continue
        for _ in range(4):
            m = _set(copy.deepcopy(index), path, confused_value(rng, _get(index, path)))
            oracle.check(f"{'.'.join(map(str, path))}", with_index(oracle.original, pack(m)),
                         must_refuse=_matters(path), boot=n % 3 == 0)
            n += 1
    print(f"{n} type confusions: {oracle.refused} refused, {oracle.accepted} harmless; "
          f"slowest {oracle.slowest[0]:.3f} s")


def test_random_corruptions_fast(tmp_path: Path, source: Source) -> None:
    oracle = _oracle(tmp_path, source)
    tally = run_corruptions(oracle, seed=11, count=400, boot_every=5)
    print(f"{sum(tally.values())} corruptions {tally}: {oracle.refused} refused, {oracle.accepted} harmless")


def test_thousands_of_random_corruptions(tmp_path: Path, source: Source) -> None:
    oracle = _oracle(tmp_path, source)
    before = _maxrss_mib()
    started = time.monotonic()
    tally = run_corruptions(oracle, seed=20250701, count=10_000, boot_every=4)
    grown = _maxrss_mib() - before
    print(f"{sum(tally.values())} corruptions {tally} in {time.monotonic() - started:.1f} s: "
          f"{oracle.refused} refused, {oracle.accepted} harmless, {oracle.booted} recoveries; "
          f"slowest {oracle.slowest[0]:.3f} s ({oracle.slowest[1]}); peak RSS +{grown:.0f} MiB")
    assert grown < 256, f"refusing damaged images raised peak memory by {grown:.0f} MiB"


# ---------------------------------------------------------------------------- hypothesis: any index

def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=5))


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.binary(max_size=20), _containers, max_leaves=30)

records = st.one_of(
    st.fixed_dictionaries({"type": st.just("instance"), "name": st.text(max_size=70), "uid": st.integers(-5, 2 ** 33),
                           "gid": st.integers(-5, 2 ** 33), "mode": st.integers(-5, 2 ** 20),
                           "ino": st.integers(-5, 2 ** 64 - 1)}),
    st.fixed_dictionaries({"type": st.just("file"), "instance": st.sampled_from(["vm", "db", "x"]),
                           "token": st.integers(-5, 2 ** 64 - 1), "kind": st.sampled_from(["memfd", "file", "pipe"]),
                           "size": st.integers(-5, 2 ** 64 - 1), "pos": st.integers(-5, 2 ** 64 - 1),
                           "flags": st.integers(-5, 2 ** 32), "seals": st.integers(-5, 2 ** 32),
                           "name": st.text(max_size=10), "mode": st.integers(-5, 2 ** 20),
                           "path": st.sampled_from(["", "journal", "/nonexistent/x", "sub/../journal"]),
                           "dev": st.integers(0, 2 ** 64 - 1),
                           "ino": st.integers(0, 2 ** 64 - 1),
                           "extents": st.lists(st.lists(st.integers(-5, 2 ** 64 - 1), min_size=3, max_size=3).map(
                               lambda e: e + [[0]]), max_size=3)},
                          optional={"handle_type": st.integers(-5, 2 ** 33), "handle": st.binary(max_size=20)}),
    msgpack_values)


ANY_INDEX = dict(writer=st.one_of(msgpack_values, st.fixed_dictionaries({"kexec_count": st.integers(-5, 2 ** 64 - 1)})),
                 state_=msgpack_values, chunk=st.one_of(st.integers(-5, 2 ** 31), st.just(1 << 20)),
                 recs=st.lists(records, max_size=6))
ANY_SETTINGS = dict(deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@settings(max_examples=60, **ANY_SETTINGS)  # type: ignore[arg-type]
@given(**ANY_INDEX)
def test_any_index_is_refused_or_sound_fast(tmp_path: Path, source: Source, writer: Any, state_: Any,
                                            chunk: int, recs: list[Any]) -> None:
    any_index(tmp_path, source, writer, state_, chunk, recs)


@pytest.mark.nondeterministic
@settings(max_examples=1500, **ANY_SETTINGS)  # type: ignore[arg-type]
@given(**ANY_INDEX)
def test_any_index_is_refused_or_sound(tmp_path: Path, source: Source, writer: Any, state_: Any, chunk: int,
                                       recs: list[Any]) -> None:
    any_index(tmp_path, source, writer, state_, chunk, recs)


def any_index(tmp_path: Path, source: Source, writer: Any, state_: Any, chunk: int, recs: list[Any]) -> None:
    """Any msgpack index at all, with a matching digest: open refuses it or yields a sound
    image, and a recovery of it neither raises nor hangs."""
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths in a "file" record must not reach the repository
    try:
        _any_index(tmp_path, source, {"writer": writer, "state": state_, "chunk_size": chunk, "records": recs})
    finally:
        os.chdir(cwd)


def _any_index(tmp_path: Path, source: Source, index: dict) -> None:  # type: ignore[type-arg]
    oracle = _oracle(tmp_path, source)
    data = with_index(oracle.original, pack(index))
    try:
        image = HandoverImage.open(oracle._write(data))
    except ImageError:
        pass
    else:
        try:
            image.verify()
        except ImageError:
            pass
        finally:
            image.close()
    directory = tmp_path / "any"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    (directory / IMAGE).write_bytes(data)
    machine = LiveUpdate.boot(directory, boot_id="any")
    for inst in machine.instances.values():
        inst.drop_files()


# ---------------------------------------------------------------------------- through a daemon

def daemon_sample(tmp_path: Path, source: Source, count: int, seed: int) -> None:
    """``count`` corrupted images, one after another in the same image directory, each
    through a real daemon start: it serves (no crash, no hang), comes up normal with the
    image kept aside (every damaged image kept: none overwrites another), or updated
    when the corruption was harmless."""
    data, _contents, _disk = source
    rng = random.Random(seed)
    index = Layout(data).index
    paths = [p for p in _paths(index) if p and _matters(p)]
    d = Daemon.at(tmp_path)
    kept = 0
    try:
        for n in range(count):
            if n % 2:
                path = rng.choice(paths)
                corrupted = with_index(data, pack(_set(copy.deepcopy(index), path,
                                                       confused_value(rng, _get(index, path)))))
            else:
                _label, corrupted = byte_mutation(rng, data)
            d.image_dir.mkdir(mode=0o700, exist_ok=True)
            (d.image_dir / IMAGE).write_bytes(corrupted)
            started = time.monotonic()
            d.start()
            assert time.monotonic() - started < 20, "daemon start hung on a damaged image"
            now = state(d.mountpoint)
            if now == "normal":
                kept += 1
                assert status(d.mountpoint)["last_error"].startswith("recovery: ")
                assert not (d.image_dir / IMAGE).exists()
                assert len(list(d.image_dir.glob(f"{IMAGE}.damaged-*"))) == kept, "a damaged image was lost"
                os.mkdir(d.mountpoint / "serving")  # and it serves
                os.rmdir(d.mountpoint / "serving")
            else:
                assert now == "updated"
                (d.mountpoint / "state").write_text("finish\n")
            assert d.alive()
            d.stop()
            assert d.proc is not None and d.proc.returncode == 0, "the daemon did not exit cleanly"
        assert kept > count // 3
    finally:
        d.stop()
    d.check_log()


@needs_fuse
def test_damaged_images_through_a_daemon_fast(tmp_path: Path, source: Source) -> None:
    daemon_sample(tmp_path, source, 4, seed=5)


@needs_fuse
def test_damaged_images_through_a_daemon(tmp_path: Path, source: Source) -> None:
    daemon_sample(tmp_path, source, 40, seed=2025)
