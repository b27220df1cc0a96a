#!/usr/bin/env python3
"""Mount kexecfs: ``mount_kexecfs.py MOUNTPOINT [--image-dir DIR] [--foreground] [--debug]``.

The same as ``kexecfs mount``; kept as a script so a checkout can mount without installing.
"""

import sys

from kexecfs.cli import main

if __name__ == "__main__":
    sys.exit(main(["mount", *sys.argv[1:]]))
