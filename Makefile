# kexecfs — `make run` mounts it with sensible defaults, `make test` runs the tests.
# Both do their own set-up on a fresh Debian machine as root (apt packages, venv, pip).

VENV ?= .venv
PY := $(VENV)/bin/python
MOUNTPOINT ?= /run/kexecfs
IMAGE_DIR ?= /var/lib/kexecfs
# man-db: man(1), which systemd-analyze verify runs for each unit's Documentation=man:.
APT_PACKAGES := fuse3 libfuse3-dev pkg-config gcc python3 python3-venv python3-dev util-linux systemd man-db
# Where make install puts what is not the Python package (DESTDIR for staging, as usual).
PREFIX ?= /usr/local
DESTDIR ?=
UNITDIR ?= /etc/systemd/system
STAMP := $(VENV)/.installed

.PHONY: setup run stop test test-hard test-luo bench install install-files man clean

# System packages: only what is missing, so a set-up machine needs no network.
.apt.stamp:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi
	@touch $@

$(STAMP): .apt.stamp pyproject.toml setup.py $(wildcard kexecfs/fusehook-c/*.[ch])
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $@

setup: $(STAMP)

run: setup
	@if mountpoint -q $(MOUNTPOINT); then echo "$(MOUNTPOINT) is already mounted"; else \
		$(VENV)/bin/kexecfs mount $(MOUNTPOINT) --image-dir $(IMAGE_DIR) --log-file /var/log/kexecfs.log; fi
	@echo
	@echo "kexecfs is mounted on $(MOUNTPOINT) (images in $(IMAGE_DIR), log in /var/log/kexecfs.log). Try:"
	@echo "  cat $(MOUNTPOINT)/state $(MOUNTPOINT)/status"
	@echo "  mkdir $(MOUNTPOINT)/demo"
	@echo "  exec 5<>\$$(mktemp -p /var/tmp); echo 5 > $(MOUNTPOINT)/demo/fd_preserve; cat $(MOUNTPOINT)/demo/fd_preserve"
	@echo "  echo prepare > $(MOUNTPOINT)/state; echo kexec > $(MOUNTPOINT)/state; cat $(MOUNTPOINT)/state"
	@echo "  cat $(MOUNTPOINT)/demo/fds/0; echo finish > $(MOUNTPOINT)/state"
	@echo "  $(VENV)/bin/kexecfs run -- PROGRAM    # an unmodified LUO program (Linux 6.19 API) sees it as /dev/liveupdate"
	@echo "Stop it with: make stop"

stop:
	umount $(MOUNTPOINT)

# make test: all but the long nondeterministic runs (see the markers in pyproject.toml);
# the same inputs give the same run, so CI can take it. make test-hard: everything.
test: setup
	$(PY) -m pytest -q tests -m 'not nondeterministic and not kernel_selftests'

test-hard: setup
	$(PY) -m pytest -q tests -m 'not kernel_selftests'

# The kernel's 6.19 LUO selftests, unmodified, under kexecfs run. DIR holds a built
# liveupdate and luo_kexec_simple (a kernel tree's selftests build, or
# make -C ../shared/luo OUT=DIR).
test-luo: setup
	@test -n "$(LUO_SELFTESTS)" || { echo "make test-luo LUO_SELFTESTS=DIR (see tests/test_t3_luo_selftests.py)"; exit 2; }
	LUO_SELFTESTS=$(abspath $(LUO_SELFTESTS)) $(PY) -m pytest -q -s tests/test_t3_luo_selftests.py -m kernel_selftests

# The bench extra (matplotlib for the plot, py-spy for profiles) only for make bench.
BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench

# A system installation for systemd: a venv in /opt/kexecfs, the command in
# /usr/local/bin, the units in /etc/systemd/system (see README, "Containers and systemd").
install: .apt.stamp install-files
	test -x /opt/kexecfs/bin/python || python3 -m venv /opt/kexecfs
	/opt/kexecfs/bin/pip install -q .
	ln -sf /opt/kexecfs/bin/kexecfs $(PREFIX)/bin/kexecfs
	sed '1s|.*|#!/opt/kexecfs/bin/python|' examples/keep_memfd.py > $(PREFIX)/bin/kexecfs-keep-memfd
	chmod 755 $(PREFIX)/bin/kexecfs-keep-memfd
	-mandb -q
	-systemctl daemon-reload

# Everything but the Python package: units, man pages, completion, the update script, docs.
# `make install-files DESTDIR=/tmp/stage` stages them (the tests do).
install-files:
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(PREFIX)/sbin $(DESTDIR)$(UNITDIR)
	install -m 644 systemd/*.service systemd/*.timer $(DESTDIR)$(UNITDIR)/
	install -m 755 examples/kexecfs-kexec $(DESTDIR)$(PREFIX)/sbin/kexecfs-kexec
	install -D -m 644 systemd/kexecfs-example.sysusers $(DESTDIR)/etc/sysusers.d/kexecfs-example.conf
	install -D -m 644 man/man1/kexecfs.1 $(DESTDIR)$(PREFIX)/share/man/man1/kexecfs.1
	install -D -m 644 man/man7/kexecfs.7 $(DESTDIR)$(PREFIX)/share/man/man7/kexecfs.7
	install -D -m 644 completion/kexecfs $(DESTDIR)$(PREFIX)/share/bash-completion/completions/kexecfs
	install -D -m 644 README.md $(DESTDIR)$(PREFIX)/share/doc/kexecfs/README.md
	install -m 644 docs/*.md $(DESTDIR)$(PREFIX)/share/doc/kexecfs/

# kexecfs(1) and the bash completion, generated from the command's parser (kexecfs/cli.py);
# the results are committed, and a test fails when they are stale.
man:
	python3 tools/cli-docs.py --write

# The real kexec in a qemu guest (tests/vm/README.md): build-guest.sh caches under build/vm.
# (-include: a copy of the sources without tests/, as the VM guest's, still installs.)
-include tests/vm/vm.mk
test-kexec: setup

clean:
	rm -rf $(VENV) build *.egg-info kexecfs/*.so .apt.stamp
