"""vrfs: asynchronous, per-disk replication of VM disk images as a FUSE datastore."""

__version__ = "0.1.0"

DEFAULT_PORT = 44046
