#!/bin/bash
# Build (or reuse) the qemu guest for `make test-kexec`, under build/vm/:
#
#   vmlinuz     stock Debian bookworm kernel (apt-get download linux-image-6.1.0-N-amd64)
#   stub.img    busybox initramfs: loads virtio/ext4 modules, mounts root read-only,
#               switch_roots into /usr/sbin/kxvm-init (tests/vm/guest/kxvm-init)
#   root.ext4   debootstrap minbase + python3, kexec-tools, fuse3, kmod, e2fsprogs,
#               util-linux + host-built cp311 wheels of kexecfs and its dependencies
#               + the guest scripts of tests/vm/guest
#   root-systemd.ext4   (KXVM_SYSTEMD=1, for the systemd variant) debootstrap minbase +
#               systemd, udev and what `make install` needs; kexecfs installed in it by
#               `make install` (chroot, no network: pip takes the host-built wheels), its
#               units enabled, and the test's own unit (guest/kxvm-systemd.service)
#
# Every layer is cached behind a stamp that holds a sha256 of its inputs (including the
# text of the shell function that builds it), so an unchanged layer costs nothing and
# a change of the project's sources only rebuilds the wheels and root.ext4 (seconds),
# never the debootstrap tree (a minute).
#
# Usage: tests/vm/build-guest.sh            (from anywhere; needs root)
# Env:   PY=python3.11 to build wheels with   (default: .venv/bin/python, else python3)
#        KXVM_KVER=6.1.0-N-amd64              (default: what linux-image-amd64 depends on)
#        KXVM_MIRROR=http://deb.debian.org/debian
#        KXVM_WITH_PROJECT=0                  (guest without kexecfs: for run-kexec.py --standin)
#        KXVM_SYSTEMD=1                       (also root-systemd.ext4, for --variant systemd)
#        KXVM_LAYERS=kernel                   (stop after the kernel and busybox: tests/vm/tiny)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
OUT=$REPO/build/vm
CACHE=$OUT/cache
SUITE=bookworm
MIRROR=${KXVM_MIRROR:-http://deb.debian.org/debian}
GUEST_PY=3.11                   # bookworm's python3; wheels must be cp311
BASE_PACKAGES=python3,kexec-tools,fuse3,kmod,e2fsprogs,util-linux
# Modules the stub needs to reach the root disk; the others (fuse, pmem, rng) are
# loaded by kxvm-init with the guest's own modprobe from the same mini module tree.
# The systemd guest: systemd as PID 1, and exactly what the Makefile's install target
# checks for (APT_PACKAGES: with all of them present it installs no package) plus make,
# and libselinux1-dev, which debootstrap does not find for libfuse3-dev (a virtual name).
SYSTEMD_PACKAGES=python3,python3-venv,python3-dev,gcc,make,pkg-config,libfuse3-dev,libselinux1-dev,fuse3,util-linux,systemd,systemd-sysv,udev,man-db,kexec-tools,kmod,e2fsprogs
STUB_MODULES="virtio_pci virtio_blk ext4"
ROOT_MODULES="$STUB_MODULES fuse nd_e820 nd_pmem virtio-rng"

log() { printf '[build-guest %5ss] %s\n' "$SECONDS" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, mkfs -d with root-owned files)"
mkdir -p "$OUT" "$CACHE"

# ---------------------------------------------------------------- helpers
sha() { sha256sum | cut -c1-64; }
# stamp_ok NAME HASH: true when layer NAME was built from exactly HASH
stamp_ok() { [ -f "$OUT/$1.stamp" ] && [ "$(cat "$OUT/$1.stamp")" = "$2" ]; }
stamp_set() { echo "$2" > "$OUT/$1.stamp"; }

ensure_host_packages() {
    # A fresh bookworm machine has none of these; install only what is missing.
    # (libfuse3-dev, pkg-config, gcc, python3-dev: to build pyfuse3 and kexecfs' C code)
    local want=(qemu-system-x86 debootstrap kmod cpio e2fsprogs libfuse3-dev pkg-config gcc
                python3-dev python3-venv)
    local missing=() p
    for p in "${want[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        log "installing host packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

# apt_download PKG: the .deb of PKG in $CACHE (downloaded once)
apt_download() {
    local pkg=$1 f
    f=$(ls "$CACHE/${pkg}_"*.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        # (as root apt warns that _apt cannot write there: harmless, filtered)
        (cd "$CACHE" && apt-get download -qq "$pkg" 2>&1 | grep -v 'unsandboxed as root' >&2) \
            || { apt-get update -qq && (cd "$CACHE" && apt-get download -qq "$pkg" >&2); }
        f=$(ls "$CACHE/${pkg}_"*.deb | head -1)
    fi
    echo "$f"
}

pick_python() {
    # The wheels carry C extensions (pyfuse3, msgpack, kexecfs): they must be built by
    # a CPython of the guest's minor version. The project's venv if there is one.
    local py=${PY:-}
    if [ -z "$py" ]; then
        if [ -x "$REPO/.venv/bin/python" ]; then py=$REPO/.venv/bin/python; else py=python3; fi
    fi
    case "$py" in
        /*) ;;
        */*) py=$REPO/$py ;;
        *) py=$(command -v "$py") || die "no $py" ;;
    esac
    local v; v=$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    [ "$v" = "$GUEST_PY" ] || die "$py is Python $v; the bookworm guest runs $GUEST_PY, so the wheels (C extensions) must be built by a $GUEST_PY (set PY=)"
    if ! "$py" -m pip --version >/dev/null 2>&1; then
        # a bare Debian python3 has no pip: a private venv for the wheel builds
        [ -x "$OUT/pyvenv/bin/python" ] || "$py" -m venv "$OUT/pyvenv" >&2 || die "python3 -m venv failed"
        py=$OUT/pyvenv/bin/python
    fi
    echo "$py"
}

# ---------------------------------------------------------------- kernel
build_kernel() {
    # Extract the Debian kernel and make a mini module tree holding only what the guest
    # loads (with its dependencies), indexed by depmod so both busybox insmod lists
    # and the guest's kmod modprobe work.
    local deb=$1 kver=$2 x=$OUT/kernel
    rm -rf "$x" && mkdir -p "$x/mods/lib/modules/$kver"
    dpkg-deb -x "$deb" "$x/deb"
    cp "$x/deb/boot/vmlinuz-$kver" "$x/vmlinuz"
    depmod -b "$x/deb" "$kver"
    local m f seen=" "
    : > "$x/stub.order"
    for m in $ROOT_MODULES; do
        for f in $(modprobe -d "$x/deb" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}'); do
            f=${f#"$x/deb/lib/modules/$kver/"}
            case "$seen" in *" $f "*) continue;; esac
            seen="$seen$f "
            mkdir -p "$x/mods/lib/modules/$kver/$(dirname "$f")"
            cp "$x/deb/lib/modules/$kver/$f" "$x/mods/lib/modules/$kver/$f"
        done
    done
    for m in $STUB_MODULES; do
        modprobe -d "$x/deb" -S "$kver" --show-depends "$m" | awk '$1=="insmod"{print $2}' \
            | sed "s|^$x/deb/lib/modules/$kver/||" >> "$x/stub.order"
    done
    awk '!seen[$0]++' "$x/stub.order" > "$x/stub.order.tmp" && mv "$x/stub.order.tmp" "$x/stub.order"
    cp "$x/deb/lib/modules/$kver/modules.order" "$x/deb/lib/modules/$kver/modules.builtin"* \
        "$x/mods/lib/modules/$kver/"
    depmod -b "$x/mods" "$kver"
    grep -q '^CONFIG_KEXEC=y' "$x/deb/boot/config-$kver" || die "kernel $kver has no CONFIG_KEXEC"
    rm -rf "$x/deb"
}

# ---------------------------------------------------------------- stub initramfs
build_stub() {
    local bbdeb=$1 kver=$2 s=$OUT/stub
    rm -rf "$s" && mkdir -p "$s/root/bin" "$s/root/proc" "$s/root/sys" "$s/root/dev" "$s/root/newroot"
    dpkg-deb --fsys-tarfile "$bbdeb" | tar -xO ./bin/busybox > "$s/root/bin/busybox"
    chmod 755 "$s/root/bin/busybox"
    local a
    for a in sh mount umount insmod switch_root sleep cat echo poweroff mkdir; do
        ln -s busybox "$s/root/bin/$a"
    done
    mkdir -p "$s/root/lib/modules"
    cp -a "$OUT/kernel/mods/lib/modules/$kver" "$s/root/lib/modules/"
    cp "$OUT/kernel/stub.order" "$s/root/modules.load"
    install -m 755 "$HERE/guest/stub-init" "$s/root/init"
    (cd "$s/root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -1) > "$OUT/stub.img"
    rm -rf "$s"
}

# ---------------------------------------------------------------- debootstrap base
build_base() {
    # The slow layer (~1 min): only rebuilt when the package list, suite or this
    # function change. Docs, locales and apt caches are dropped (~140 MB left).
    local b=$OUT/base
    rm -rf "$b" && mkdir -p "$b" "$CACHE/debootstrap"
    debootstrap --variant=minbase --include="$BASE_PACKAGES" --cache-dir="$CACHE/debootstrap" \
        "$SUITE" "$b/tree" "$MIRROR" > "$b/debootstrap.log" 2>&1 \
        || { tail -30 "$b/debootstrap.log" >&2; die "debootstrap failed (log: $b/debootstrap.log)"; }
    rm -rf "$b/tree/usr/share/doc" "$b/tree/usr/share/man" "$b/tree/usr/share/info" \
        "$b/tree/usr/share/locale" "$b/tree/var/cache/apt"/*.bin "$b/tree/var/cache/apt/archives"/*.deb \
        "$b/tree/var/lib/apt/lists"/*_Packages "$b/tree/var/log"/*
    echo kxvm > "$b/tree/etc/hostname"
}

build_sysbase() {
    # The systemd guest's tree (~3 min): rebuilt only when its package list or this function change.
    local b=$OUT/sysbase
    rm -rf "$b" && mkdir -p "$b" "$CACHE/debootstrap"
    debootstrap --variant=minbase --include="$SYSTEMD_PACKAGES" --cache-dir="$CACHE/debootstrap" \
        "$SUITE" "$b/tree" "$MIRROR" > "$b/debootstrap.log" 2>&1 \
        || { tail -30 "$b/debootstrap.log" >&2; die "debootstrap of the systemd guest failed (log: $b/debootstrap.log)"; }
    rm -rf "$b/tree/usr/share/doc" "$b/tree/usr/share/info" "$b/tree/usr/share/locale" \
        "$b/tree/var/cache/apt"/*.bin "$b/tree/var/cache/apt/archives"/*.deb "$b/tree/var/lib/apt/lists"/*_Packages
    echo kxvm > "$b/tree/etc/hostname"
}

# ---------------------------------------------------------------- wheels
deps_of_project() {
    # The runtime requirements of kexecfs, from pyproject.toml (one per line).
    "$1" - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
with open(sys.argv[1], "rb") as f:
    print("\n".join(tomllib.load(f)["project"].get("dependencies", [])))
EOF
}

build_dep_wheels() {
    # pyfuse3 has no wheel on PyPI: pip builds it from the sdist (needs libfuse3-dev).
    local py=$1 w=$OUT/wheels/deps
    rm -rf "$w" && mkdir -p "$w"
    deps_of_project "$py" | xargs -d '\n' "$py" -m pip wheel -q --wheel-dir "$w" > "$OUT/wheels/deps.log" 2>&1 \
        || { tail -40 "$OUT/wheels/deps.log" >&2; die "building the dependency wheels failed (log: $OUT/wheels/deps.log)"; }
}

project_files() {
    # What goes into the kexecfs wheel: every tracked or new (not ignored) file, but
    # not the tests, benchmarks and CI (so editing a unit test doesn't rebuild the guest).
    git -C "$REPO" ls-files -co --exclude-standard -- . ':!tests' ':!bench' ':!.ci' \
        | while IFS= read -r f; do [ -f "$REPO/$f" ] && printf '%s\n' "$f"; done | LC_ALL=C sort
}

build_tool_wheels() {
    # What pip's isolated build of kexecfs needs (pyproject's build-system), for `make
    # install` in the guest tree, which has no network.
    local py=$1 w=$OUT/wheels/build
    rm -rf "$w" && mkdir -p "$w"
    "$py" -m pip download -q --only-binary :all: --dest "$w" "setuptools>=64" wheel > "$OUT/wheels/build.log" 2>&1 \
        || { tail -20 "$OUT/wheels/build.log" >&2; die "downloading setuptools and wheel failed"; }
}

build_project_wheel() {
    # Built from a snapshot copy of exactly the hashed files: the work tree is being
    # edited concurrently, and setuptools would litter it with build/ and egg-info.
    local py=$1 src=$OUT/src w=$OUT/wheels/proj
    rm -rf "$src" "$w" && mkdir -p "$src" "$w"
    (cd "$REPO" && project_files | cpio -pdm --quiet "$src")
    "$py" -m pip wheel -q --no-deps --wheel-dir "$w" "$src" > "$OUT/wheels/proj.log" 2>&1 \
        || { tail -40 "$OUT/wheels/proj.log" >&2; die "building the kexecfs wheel failed (log: $OUT/wheels/proj.log)"; }
}

# ---------------------------------------------------------------- root image
install_wheels() {
    # Install the cp311 wheels into the guest's /usr/local (Debian's python3 searches
    # /usr/local/lib/python3.11/dist-packages) and make the console scripts with the
    # guest's interpreter (pip --target would write the host's path in the shebang).
    local py=$1 tree=$2 site=$2/usr/local/lib/python3.11/dist-packages
    mkdir -p "$site" "$tree/usr/local/bin"
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$site" \
        "$OUT"/wheels/deps/*.whl "$OUT"/wheels/proj/*.whl >&2
    rm -rf "$site/bin"
    "$py" - "$site" "$tree/usr/local/bin" <<'EOF'
import configparser, glob, os, sys
site, bindir = sys.argv[1:]
for ep in glob.glob(os.path.join(site, "*.dist-info", "entry_points.txt")):
    cp = configparser.ConfigParser(delimiters=("=",))
    cp.optionxform = str
    cp.read(ep)
    if not cp.has_section("console_scripts"):
        continue
    for name, target in cp.items("console_scripts"):
        mod, _, func = target.strip().partition(":")
        path = os.path.join(bindir, name)
        with open(path, "w") as f:
            f.write(f"#!/usr/bin/python3\nimport sys\nfrom {mod} import {func}\nsys.exit({func}())\n")
        os.chmod(path, 0o755)
EOF
    # The guest root is read-only: precompile, with hashes rather than mtimes.
    "$py" -m compileall -q -j0 --invalidation-mode unchecked-hash "$site" >/dev/null || true
}

build_root() {
    local py=$1 kver=$2 r=$OUT/rootfs
    rm -rf "$r" && mkdir -p "$r"
    cp -a "$OUT/base/tree" "$r/tree"
    local t=$r/tree
    [ -n "$py" ] && install_wheels "$py" "$t"
    # the kernel and stub again inside the guest, for `kexec -l`
    mkdir -p "$t/boot" "$t/usr/lib/modules" "$t/data" "$t/pmem" "$t/usr/local/lib/kxvm"
    cp "$OUT/kernel/vmlinuz" "$t/boot/vmlinuz"
    cp "$OUT/stub.img" "$t/boot/stub.img"
    cp -a "$OUT/kernel/mods/lib/modules/$kver" "$t/usr/lib/modules/"
    install -m 755 "$HERE/guest/kxvm-init" "$t/usr/sbin/kxvm-init"
    install -m 755 "$HERE/guest/service.py" "$t/usr/local/lib/kxvm/service.py"
    # the kernel's LUO selftests, an outside client run across the kexec (kxvm-init)
    cp -a "$OUT/luo" "$t/usr/local/lib/kxvm/luo"
    # the project's units (kxvm-init runs the freeze hook's commands) and the mount
    # helper script, from the same snapshot of the sources as the wheel
    if [ -n "$py" ]; then
        [ -d "$OUT/src/systemd" ] && cp -a "$OUT/src/systemd" "$t/usr/local/lib/kxvm/systemd"
        [ -f "$OUT/src/mount_kexecfs.py" ] && cp "$OUT/src/mount_kexecfs.py" "$t/usr/local/lib/kxvm/"
    fi
    # ext4 image straight from the directory (no loop mount); read-only at run time
    local mb; mb=$(du -sm "$t" | cut -f1)
    rm -f "$OUT/root.ext4.tmp"
    mkfs.ext4 -q -F -L kxvm-root -E root_owner=0:0 -d "$t" "$OUT/root.ext4.tmp" "$((mb * 12 / 10 + 64))M" >/dev/null
    mv "$OUT/root.ext4.tmp" "$OUT/root.ext4"
    rm -rf "$r"
}

in_tree() {  # in_tree TREE CMD...: run CMD chrooted in TREE, with /proc and /dev
    local t=$1; shift
    mount -t proc proc "$t/proc" && mount --bind /dev "$t/dev" || die "cannot mount /proc and /dev in $t"
    local rc=0
    chroot "$t" /usr/bin/env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
        LANG=C.UTF-8 PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels "$@" || rc=$?
    umount "$t/dev" "$t/proc"
    return $rc
}

build_sysroot() {
    # kexecfs installed the way the README says, `make install`, run in the guest's own
    # tree from the same snapshot of the sources as the wheel; then the operator's part:
    # enable kexecfs.service, kexecfs-freeze.service and the example service.
    local kver=$1 r=$OUT/sysroot t
    rm -rf "$r" && mkdir -p "$r"
    cp -a "$OUT/sysbase/tree" "$r/tree"
    t=$r/tree
    mkdir -p "$t/boot" "$t/usr/lib/modules" "$t/usr/local/lib/kxvm" "$t/tmp/wheels" "$t/var/log/journal"
    cp "$OUT/kernel/vmlinuz" "$t/boot/vmlinuz"
    cp "$OUT/stub.img" "$t/boot/stub.img"
    cp -a "$OUT/kernel/mods/lib/modules/$kver" "$t/usr/lib/modules/"
    cp -a "$OUT/src" "$t/tmp/kexecfs"
    cp "$OUT"/wheels/deps/*.whl "$OUT"/wheels/build/*.whl "$t/tmp/wheels/"
    in_tree "$t" make -C /tmp/kexecfs install > "$r/make-install.log" 2>&1 \
        || { tail -30 "$r/make-install.log" >&2; die "make install in the systemd guest failed (log: $r/make-install.log)"; }
    install -m 644 "$HERE/guest/kxvm-systemd.service" "$t/etc/systemd/system/"
    install -m 755 "$HERE/guest/kxvm-systemd-stage" "$t/usr/local/lib/kxvm/"
    # Not a first boot (systemd-firstboot would prompt on the console): a machine id, and
    # the example service's user made as systemd-sysusers would at boot.
    in_tree "$t" systemd-machine-id-setup >/dev/null
    in_tree "$t" systemd-sysusers >/dev/null
    in_tree "$t" systemctl enable kexecfs.service kexecfs-freeze.service kexecfs-example.service \
        kxvm-systemd.service >/dev/null 2>&1 || die "systemctl enable in the systemd guest failed"
    # Quiet and quick under TCG: no login prompts, no maintenance timers.
    in_tree "$t" systemctl mask serial-getty@ttyS0.service getty@tty1.service apt-daily.timer \
        apt-daily-upgrade.timer man-db.timer e2scrub_all.timer fstrim.timer >/dev/null 2>&1 || true
    # Debian's kexec-tools would load /vmlinuz itself at shutdown (kexec-load.service).
    echo 'LOAD_KEXEC=false' > "$t/etc/default/kexec"
    rm -rf "$t/tmp/kexecfs" "$t/tmp/wheels"
    local mb; mb=$(du -sm "$t" | cut -f1)
    rm -f "$OUT/root-systemd.ext4.tmp"
    # Writable at run time (qemu snapshot=on: the changes live as long as the qemu process,
    # across the kexec, and never reach this file); room for the journal and the image.
    mkfs.ext4 -q -F -L kxvm-root -E root_owner=0:0 -d "$t" "$OUT/root-systemd.ext4.tmp" "$((mb * 12 / 10 + 256))M" >/dev/null
    mv "$OUT/root-systemd.ext4.tmp" "$OUT/root-systemd.ext4"
    rm -rf "$r/tree"
}

# ---------------------------------------------------------------- main
T0=$SECONDS
ensure_host_packages

KVER=${KXVM_KVER:-$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-6/{sub("linux-image-","",$2); print $2; exit}')}
if [ -z "$KVER" ]; then
    apt-get update -qq
    KVER=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-6/{sub("linux-image-","",$2); print $2; exit}')
fi
[ -n "$KVER" ] || die "cannot find the bookworm kernel package (linux-image-amd64 depends on ?)"
KDEB=$(apt_download "linux-image-$KVER")
BBDEB=$(apt_download busybox-static)

h=$( { echo "$KVER"; sha256sum < "$KDEB"; echo "$ROOT_MODULES|$STUB_MODULES"; declare -f build_kernel; } | sha)
if ! stamp_ok kernel "$h"; then log "kernel $KVER: extracting"; build_kernel "$KDEB" "$KVER"; stamp_set kernel "$h"; fi
H_KERNEL=$h

h=$( { echo "$H_KERNEL"; sha256sum < "$BBDEB"; cat "$HERE/guest/stub-init"; declare -f build_stub; } | sha)
if ! stamp_ok stub "$h"; then log "stub initramfs: building"; build_stub "$BBDEB" "$KVER"; stamp_set stub "$h"; fi
H_STUB=$h
cp "$OUT/kernel/vmlinuz" "$OUT/vmlinuz"
# KXVM_LAYERS=kernel: the kernel and busybox only, for guests without a root image
# (tests/vm/tiny/build.sh: the kexecfs vm tests and bench).
if [ "${KXVM_LAYERS:-all}" = kernel ]; then
    echo "$KVER" > "$OUT/kver"; log "kernel $KVER and busybox ready (KXVM_LAYERS=kernel)"; exit 0
fi

h=$( { echo "$SUITE $MIRROR $BASE_PACKAGES"; declare -f build_base; } | sha)
if ! stamp_ok base "$h" || [ ! -d "$OUT/base/tree" ]; then
    log "debootstrap $SUITE minbase: building (about a minute)"; build_base; stamp_set base "$h"
fi
H_BASE=$h

WITH_PROJECT=${KXVM_WITH_PROJECT:-1}
H_DEPS=none H_PROJ=none PYB=
if [ "$WITH_PROJECT" = 1 ]; then
    PYB=$(pick_python)
    h=$( { echo "$PYB"; deps_of_project "$PYB"; declare -f build_dep_wheels; } | sha)
    if ! stamp_ok deps "$h" || ! ls "$OUT"/wheels/deps/*.whl >/dev/null 2>&1; then
        log "dependency wheels: building ($(deps_of_project "$PYB" | tr '\n' ' '))"
        build_dep_wheels "$PYB"; stamp_set deps "$h"
    fi
    H_DEPS=$h

    h=$( { echo "$PYB"; cd "$REPO" && project_files | while IFS= read -r f; do echo "$f"; sha256sum < "$f"; done
           declare -f project_files build_project_wheel; } | sha)
    if ! stamp_ok proj "$h" || ! ls "$OUT"/wheels/proj/*.whl >/dev/null 2>&1 || [ ! -d "$OUT/src" ]; then
        log "kexecfs wheel: building"; build_project_wheel "$PYB"; stamp_set proj "$h"
    fi
    H_PROJ=$h
fi

# The kernel's 6.19 LUO selftests (../shared/luo, unmodified), linked statically: the guest
# runs them under kexecfs run, stage 1 before the kexec and stage 2 after it.
LUO_KIT=${KXVM_LUO_KIT:-$REPO/../shared/luo}
[ -f "$LUO_KIT/Makefile" ] || die "no LUO selftest kit at $LUO_KIT (set KXVM_LUO_KIT)"
h=$( { find "$LUO_KIT" -type f | LC_ALL=C sort | while IFS= read -r f; do echo "$f"; sha256sum < "$f"; done; } | sha)
if ! stamp_ok luo "$h" || [ ! -x "$OUT/luo/luo_kexec_simple" ]; then
    log "LUO selftests: building (static)"
    rm -rf "$OUT/luo"
    make -s -C "$LUO_KIT" OUT="$OUT/luo" CFLAGS="-Wall -O2 -static" >&2 || die "building the LUO selftests failed"
    stamp_set luo "$h"
fi
H_LUO=$h

h=$( { echo "$H_STUB $H_BASE $H_DEPS $H_PROJ $H_LUO"; cat "$HERE"/guest/*; declare -f build_root install_wheels; } | sha)
if ! stamp_ok root "$h" || [ ! -f "$OUT/root.ext4" ]; then
    log "root.ext4: building"; build_root "$PYB" "$KVER"; stamp_set root "$h"
fi

if [ "${KXVM_SYSTEMD:-0}" = 1 ]; then
    [ "$WITH_PROJECT" = 1 ] || die "the systemd guest needs the project (KXVM_WITH_PROJECT=1)"
    h=$( { echo "$SUITE $MIRROR $SYSTEMD_PACKAGES"; declare -f build_sysbase; } | sha)
    if ! stamp_ok sysbase "$h" || [ ! -d "$OUT/sysbase/tree" ]; then
        log "debootstrap $SUITE minbase with systemd: building (a few minutes)"; build_sysbase; stamp_set sysbase "$h"
    fi
    H_SYSBASE=$h
    h=$( { echo "$PYB"; declare -f build_tool_wheels; } | sha)
    if ! stamp_ok tools "$h" || ! ls "$OUT"/wheels/build/*.whl >/dev/null 2>&1; then
        log "setuptools and wheel for make install: downloading"; build_tool_wheels "$PYB"; stamp_set tools "$h"
    fi
    H_TOOLS=$h
    h=$( { echo "$H_STUB $H_SYSBASE $H_DEPS $H_PROJ $H_TOOLS"; cat "$HERE"/guest/kxvm-systemd*
           declare -f build_sysroot in_tree; } | sha)
    if ! stamp_ok sysroot "$h" || [ ! -f "$OUT/root-systemd.ext4" ]; then
        log "root-systemd.ext4: make install in the guest tree"; build_sysroot "$KVER"; stamp_set sysroot "$h"
    fi
fi
echo "$KVER" > "$OUT/kver"
log "guest ready in $((SECONDS - T0)) s: kernel $KVER, $(du -h "$OUT/root.ext4" | cut -f1) root.ext4 (build/vm)"
