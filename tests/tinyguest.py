"""The tiny guest for ``kexecfs vm`` tests (and the bench): the real-kexec VM test's Debian
6.1 kernel with a busybox initramfs whose init prints ``KXTICK <n> <boot id>`` on the
serial console every second (tests/vm/tiny/). Its console goes to a file that every QEMU
of the VM appends to, so one file tells the whole story: a resumed guest goes on
counting with the same boot id; a guest that booted again starts at 1 with a new one.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "tests" / "vm" / "tiny" / "build.sh"
TICK = re.compile(r"KXTICK (\d+) ([0-9a-f-]{36})")
# Guest RAM of the tests' guests: enough for the 6.1 kernel and its initramfs.
MEMORY = "160M"


@dataclass(frozen=True)
class TinyGuest:
    kernel: Path
    initrd: Path

    @classmethod
    def build(cls) -> TinyGuest:
        """Build (or reuse) the guest; installs the host's qemu-system-x86 if missing."""
        r = subprocess.run(["bash", str(BUILD)], capture_output=True, text=True, timeout=900)
        if r.returncode:
            raise RuntimeError(f"{BUILD} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        kernel, initrd = r.stdout.split()[-2:]
        return cls(Path(kernel), Path(initrd))

    def qemu_options(self, console: Path) -> list[str]:
        """What a user passes after ``kexecfs vm start NAME --memory M --``."""
        return [*accel(), "-nodefaults", "-display", "none", "-smp", "1",
                "-kernel", str(self.kernel), "-initrd", str(self.initrd),
                "-append", "console=ttyS0 quiet panic=-1",
                "-chardev", f"file,id=console,path={console},append=on", "-serial", "chardev:console"]


def accel() -> list[str]:
    """TCG unless a real hardware KVM is there (KEXEC-VM-NOTES.md: the PVM /dev/kvm of
    this machine cannot run a stock kernel)."""
    if os.path.exists("/dev/kvm") and any(os.path.isdir(f"/sys/module/{m}") for m in ("kvm_intel", "kvm_amd")):
        return ["-accel", "kvm", "-cpu", "host"]
    return ["-accel", "tcg", "-cpu", "max"]


class Console:
    """The console file of one VM."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def ticks(self) -> list[tuple[int, str]]:
        try:
            text = self.path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        return [(int(n), boot) for n, boot in TICK.findall(text)]

    def wait_for_tick(self, at_least: int, timeout: float = 90) -> list[tuple[int, str]]:
        """Until the guest printed tick number ``at_least`` (booting under TCG takes ~5 s)."""
        deadline = time.monotonic() + timeout
        while True:
            ticks = self.ticks()
            if ticks and ticks[-1][0] >= at_least:
                return ticks
            if time.monotonic() > deadline:
                raise AssertionError(f"the guest printed no tick {at_least} within {timeout:.0f} s; "
                                     f"console:\n{self.path.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)


def one_life(ticks: list[tuple[int, str]]) -> str:
    """The boot id of a guest that counted 1, 2, 3, ... without a gap or a restart;
    AssertionError otherwise."""
    numbers = [n for n, _ in ticks]
    assert numbers == list(range(1, len(numbers) + 1)), f"the count restarted or skipped: {numbers}"
    boots = {boot for _, boot in ticks}
    assert len(boots) == 1, f"the guest booted again: boot ids {boots}"
    return boots.pop()
