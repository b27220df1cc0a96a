"""Build of the C extension kexecfs._fusehook; all other metadata is in pyproject.toml.

The extension is compiled against the same libfuse3 headers and library as
pyfuse3 (which is always built from source: PyPI has no wheels), found with
pkg-config (Debian: libfuse3-dev, pkg-config).
"""

import shlex
import subprocess

from setuptools import Extension, setup


def pkg_config(*args: str) -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", *args, "fuse3"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(
            f"kexecfs: `pkg-config {' '.join(args)} fuse3` failed ({exc}); "
            "install pkg-config and the libfuse3 headers (Debian: libfuse3-dev)"
        ) from exc
    return shlex.split(out)


setup(
    ext_modules=[
        Extension(
            "kexecfs._fusehook",
            # One file per concern: the top of module.c says which holds what.
            sources=[
                "kexecfs/fusehook-c/module.c",
                "kexecfs/fusehook-c/log.c",
                "kexecfs/fusehook-c/session.c",
                "kexecfs/fusehook-c/ioctl.c",
                "kexecfs/fusehook-c/passthrough.c",
                "kexecfs/fusehook-c/connection.c",
            ],
            # So that a change to it rebuilds the extension, and an sdist ships it.
            depends=["kexecfs/fusehook-c/fusehook.h", "kexecfs/fusehook-c/fuseproto.h"],
            extra_compile_args=[*pkg_config("--cflags"), "-Wall", "-Wextra"],
            # -ldl: dlvsym() (part of libc itself since glibc 2.34, harmless there).
            extra_link_args=[*pkg_config("--libs"), "-ldl"],
        )
    ],
)
