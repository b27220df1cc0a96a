#!/bin/bash
# The tiny guest of the kexecfs vm tests and bench, under build/vm/:
#
#   vmlinuz    the Debian 6.1 kernel of the real-kexec VM test (tests/vm/build-guest.sh,
#              which also installs the host's qemu-system-x86 if missing)
#   tiny.img   an initramfs of busybox-static (the same .deb) and tests/vm/tiny/init
#
# Cached behind a stamp of its inputs, like build-guest.sh's layers. Needs root (apt).
# Prints the two paths.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../../.." && pwd)
OUT=$REPO/build/vm
mkdir -p "$OUT"
exec 9>"$OUT/.tiny.lock"
flock 9  # two test runs in one checkout build it once

KXVM_LAYERS=kernel bash "$HERE/../build-guest.sh" >&2
BBDEB=$(ls "$OUT"/cache/busybox-static_*.deb | head -1)
h=$( { sha256sum < "$BBDEB"; cat "$HERE/init" "$0"; } | sha256sum | cut -c1-64)
if [ ! -f "$OUT/tiny.img" ] || [ "$(cat "$OUT/tiny.stamp" 2>/dev/null)" != "$h" ]; then
    t=$OUT/tiny-tree
    rm -rf "$t" && mkdir -p "$t/bin" "$t/proc" "$t/dev"
    dpkg-deb --fsys-tarfile "$BBDEB" | tar -xO ./bin/busybox > "$t/bin/busybox"
    chmod 755 "$t/bin/busybox"
    for a in sh mount cat sleep echo; do ln -s busybox "$t/bin/$a"; done
    install -m 755 "$HERE/init" "$t/init"
    (cd "$t" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$OUT/tiny.img.tmp"
    mv "$OUT/tiny.img.tmp" "$OUT/tiny.img"
    rm -rf "$t"
    echo "$h" > "$OUT/tiny.stamp"
fi
echo "$OUT/vmlinuz"
echo "$OUT/tiny.img"
