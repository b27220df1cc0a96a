# Real-kexec test in qemu (tests/vm/README.md). Included from the top Makefile.
#
#   make test-kexec            build/reuse the guests (build/vm/), then four runs:
#                              disk must PASS, tmpfs must FAIL (negative control),
#                              pmem must PASS, systemd (PID 1, make install, a real
#                              systemctl kexec) must PASS. Needs root; installs its host packages.
#   make test-kexec-standin    the same VM plumbing without kexecfs (harness self-test)
#   make test-kexec KXVM_ARGS="--variant disk -v"    one run, whole serial console
#
# The wheels for the guest are built by $(PY) when the venv exists (it must be a
# CPython 3.11 like the guest's), else by python3; the harness itself is stdlib only.
VENV ?= .venv
PY ?= $(VENV)/bin/python
KXVM_ARGS ?=
KXVM_PY = $(if $(wildcard $(PY)),$(abspath $(PY)),)

.PHONY: test-kexec test-kexec-standin
test-kexec:
	PY="$(KXVM_PY)" python3 tests/vm/run-kexec.py $(KXVM_ARGS)

test-kexec-standin:
	python3 tests/vm/run-kexec.py --standin $(KXVM_ARGS)
