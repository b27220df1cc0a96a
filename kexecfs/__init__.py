"""kexecfs: the live-update filesystem interface proposed for Linux's Live Update
Orchestrator, built in userspace with FUSE.

Layout (the architecture at a glance):

- ``machine``   the machine-wide state machine (normal → prepared → frozen → updated)
- ``instance``  instances (LUO sessions) and the files preserved in them
- ``kinds/``    one plug-in per preservable file kind: detect, capture, serialize, restore
- ``capture``   taking a descriptor out of the calling process (pidfd_getfd)
- ``image``     the handover image: format, atomic writer, checked reader
- ``abi``       the LUO ioctl ABI: numbers, struct layouts, dispatch table
- ``fs/``       the FUSE skin: node table and pyfuse3 Operations
- ``fusehook``  the C extension that adds ioctl and request context to pyfuse3
- ``daemon``    mounting, the trio main loop, simulated kexec, readiness
- ``cli``       the ``kexecfs`` command
- ``client``    a small library services use instead of raw files and ioctls
"""

__version__ = "0.1.0"
