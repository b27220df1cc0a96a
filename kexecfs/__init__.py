"""kexecfs: the live-update filesystem interface proposed for Linux's Live Update
Orchestrator, built in userspace with FUSE.

Layout (the architecture at a glance): two wings.

- ``core/``      the model, FUSE-free: ``machine`` (the state machine and its one door for
                 events), ``instance`` (instances, preserved files, what a restore grants),
                 ``kinds/`` (one plug-in per preservable kind), ``image`` (the handover
                 image format), ``journal`` and ``resume`` (a restart of the daemon),
                 ``capture`` (pidfd_getfd), ``errors``, ``faults``, ``syscalls``
- ``fs/``        the FUSE skin built on it: ``operations`` (pyfuse3, and the swap to the
                 machine a simulated kexec recovers), ``nodes`` (the tree as a table),
                 ``textfiles``, ``control`` (ioctls), ``restored`` (fds/<token>), ``daemon``
                 (mount, main loop, readiness), ``fusehook`` (the C extension's loader),
                 ``restart``, ``fdstore``, ``keeper`` (what outlives the daemon)
- ``abi``        the LUO ioctl ABI: numbers, structs, states, events (standard library only)
- ``cli``        the ``kexecfs`` command;  ``client``: the library services use
- ``vm/``        ``kexecfs vm``: QEMU guests whose RAM lives in kexecfs (a client of the mount,
                 standard library only)
- ``defaults``   the default mount point and image directory
"""

__version__ = "0.1.0"
