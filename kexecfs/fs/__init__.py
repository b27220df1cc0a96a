"""The FUSE skin of kexecfs: the node table and the pyfuse3 operations."""
