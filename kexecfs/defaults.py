"""Where kexecfs lives when nobody says otherwise (SPEC section 1 and 4): one place for
the daemon, the command and the client library."""

DEFAULT_MOUNTPOINT = "/run/kexecfs"
DEFAULT_IMAGE_DIR = "/var/lib/kexecfs"

# Where the daemon may log without --log-file (kexecfs mount --log-target; see kexecfs.fs.daemon).
LOG_TARGETS = ("auto", "stderr", "journal", "syslog")
