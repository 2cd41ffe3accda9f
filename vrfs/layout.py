"""Names in a datastore's state directory, shared by the protected site
(the mount, the shipper) and the recovery commands that write or read a
datastore without serving it (failover, reprotect). Imports nothing."""

STATE_DIR = ".vrfs"  # in the backing tree; hidden from the mount
TRACKING_DIR = "state"  # STATE_DIR/TRACKING_DIR: per-disk state files and the activity log
CONFIG_NAME = "datastore.json"  # block and extent size, fixed once the datastore has state
LOCK_NAME = "lock"  # flock: one vrfs mount per datastore
LINEAGE_FILE = "lineage.json"  # disk_id -> the point a failover started it from
GENERATIONS_FILE = "generations.json"  # disk_id -> its generations, when a failover made more
