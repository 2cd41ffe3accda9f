"""Per-disk replication settings: RPO, compression ceiling, priority.

Three layers; the first that sets a key wins:

1. set on the disk through the mount (`setfattr -n user.vrfs.rpo -v 30s
   vm1/disk.raw`), kept by disk identity in SRC/.vrfs/settings.json, so it
   follows the disk through renames and survives remounts;
2. the configuration file (`vrfs mount --config FILE`): rules of globs over
   datastore paths, the last matching rule wins;
3. the mount's options (`--rpo`, `--compress-level`; priority 0).

A group's RPO is the smallest of its disks': the group is cut as one.
"""

from __future__ import annotations

import builtins
import fnmatch
import json
import logging
import os
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vrfs.durable import write_atomically
from vrfs.errors import EXIT_USAGE, UserError
from vrfs.parse import parse_duration

log = logging.getLogger("vrfs.settings")

SETTINGS_FILE = "settings.json"
MAX_CONFIG = 4 << 20  # a configuration file beyond this is something else (/dev/zero, an image)
MIN_RPO = 1.0  # seconds: below this a cycle's own overhead is the lag
PRIORITY_RANGE = (-100, 100)


def _rpo(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("an RPO is a duration such as 30s, 5m, 1h")
    try:
        seconds = float(value) if isinstance(value, (int, float)) else parse_duration(str(value), "RPO")
    except UserError as exc:
        raise ValueError(str(exc)) from None
    if not seconds >= MIN_RPO:
        raise ValueError(f"RPO {value!r} is below the {MIN_RPO:g} s floor")
    if seconds > 366 * 86400:
        raise ValueError(f"RPO {value!r} is longer than a year")
    return seconds


def parse_rpo_option(text: str) -> float:
    """`vrfs mount --rpo`: the same limits as a disk's or a rule's RPO."""
    try:
        return _rpo(text)
    except ValueError as exc:
        raise UserError(f"--rpo: {exc}", EXIT_USAGE) from None


def _compression(value: Any) -> int:
    try:
        level = int(str(value).strip()) if not isinstance(value, bool) else -1
    except ValueError:
        raise ValueError(f"compression {value!r}: a zstd level from 1 to 19") from None
    if not 1 <= level <= 19:
        raise ValueError(f"compression {value!r}: a zstd level from 1 to 19")
    return level


def _priority(value: Any) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else 1 << 30
    except ValueError:
        raise ValueError(f"priority {value!r}: an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}") from None
    if not PRIORITY_RANGE[0] <= number <= PRIORITY_RANGE[1]:
        raise ValueError(f"priority {value!r}: an integer from {PRIORITY_RANGE[0]} to {PRIORITY_RANGE[1]}")
    return number


PARSERS: dict[str, Callable[[Any], Any]] = {"rpo": _rpo, "compression": _compression, "priority": _priority}


def format_value(key: str, value: Any) -> str:
    if key == "rpo":
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
            if value >= size and value % size == 0:
                return f"{int(value // size)}{unit}"
        return f"{value:g}s"
    return str(value)


@dataclass(frozen=True)
class DiskSettings:
    rpo: float
    compression: int
    priority: int
    origin: tuple[tuple[str, str], ...]  # per key: "disk", "config: RULE" or "default"

    def where(self, key: str) -> str:
        return dict(self.origin)[key]


@dataclass(frozen=True)
class Rule:
    match: str
    values: dict[str, Any]


def load_config(path: str) -> list[Rule]:
    """The rules of a configuration file; every mistake is one UserError naming it."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG + 1)
    except OSError as exc:
        raise UserError(f"cannot read --config {path}: {exc.strerror}", EXIT_USAGE) from None
    if len(data) > MAX_CONFIG:
        raise UserError(f"--config {path}: larger than {MAX_CONFIG >> 20} MiB: not a configuration file", EXIT_USAGE)
    try:
        doc = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise UserError(f"--config {path}: not UTF-8 text (byte {exc.start})", EXIT_USAGE) from None
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"--config {path}: not TOML: {exc}", EXIT_USAGE) from None
    except RecursionError:
        raise UserError(f"--config {path}: not TOML: nested too deeply", EXIT_USAGE) from None
    rules: list[Rule] = []
    unknown = set(doc) - {"default", "rule"}
    if unknown:
        raise UserError(f"--config {path}: unknown section {sorted(unknown)[0]!r} (expected [default] and "
                        "[[rule]])", EXIT_USAGE)
    default = doc.get("default", {})
    if not isinstance(default, dict):
        raise UserError(f"--config {path}: [default] must be a table", EXIT_USAGE)
    if "match" in default:
        raise UserError(f"--config {path}: [default] applies to every disk and takes no match; a match belongs "
                        "in a [[rule]]", EXIT_USAGE)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise UserError(f"--config {path}: rules are [[rule]] tables", EXIT_USAGE)
    for i, raw in enumerate([dict(default, match="*")] + raw_rules):
        where = "[default]" if i == 0 else f"rule {i}"
        if not isinstance(raw, dict) or not isinstance(raw.get("match"), str) or not raw["match"]:
            raise UserError(f"--config {path}: {where} needs match = \"GLOB\" (a datastore path pattern)",
                            EXIT_USAGE)
        values = {}
        for key, value in raw.items():
            if key == "match":
                continue
            if key not in PARSERS:
                raise UserError(f"--config {path}: {where}: unknown setting {key!r} (known: "
                                f"{', '.join(sorted(PARSERS))})", EXIT_USAGE)
            try:
                values[key] = PARSERS[key](value)
            except ValueError as exc:
                raise UserError(f"--config {path}: {where}: {exc}", EXIT_USAGE) from None
        rules.append(Rule(raw["match"], values))
    return rules


class Settings:
    """The effective settings of every disk, and the overrides set through the mount."""

    def __init__(self, defaults: dict[str, Any], rules: list[Rule] | None = None, vrfs_fd: int | None = None):
        self.defaults = {"priority": 0, **defaults}
        self.rules = rules or []
        self._vrfs_fd = vrfs_fd
        self._overrides: dict[str, dict[str, Any]] = self._load()
        self.version = 0  # bumps whenever an override changes: cached group RPOs are stale

    def for_disk(self, disk_id: bytes, path: str) -> DiskSettings:
        chosen: dict[str, Any] = {}
        origin: dict[str, str] = {}
        own = self._overrides.get(disk_id.hex(), {})
        for key in PARSERS:
            if key in own:
                chosen[key], origin[key] = own[key], "disk"
                continue
            for rule in reversed(self.rules):
                if key in rule.values and fnmatch.fnmatchcase(path, rule.match):
                    chosen[key], origin[key] = rule.values[key], f"config: {rule.match}"
                    break
            else:
                chosen[key], origin[key] = self.defaults[key], "default"
        return DiskSettings(chosen["rpo"], chosen["compression"], chosen["priority"], tuple(origin.items()))

    def set(self, disk_id: bytes, key: str, text: str) -> Any:
        """Set one key on one disk, written through; ValueError (with the reason)
        when the key or value is bad. Blocking: the mount uses the staged form."""
        overrides, value = self.staged_set(disk_id, key, text)
        self.persist(overrides)
        self.adopt(overrides)
        return value

    def clear(self, disk_id: bytes, key: str) -> bool:
        overrides = self.staged_clear(disk_id, key)
        if overrides is None:
            return False
        self.persist(overrides)
        self.adopt(overrides)
        return True

    def staged_set(self, disk_id: bytes, key: str, text: str) -> tuple[dict[str, dict[str, Any]], Any]:
        """The overrides with one key set, not yet in effect (persist, then adopt)."""
        if key not in PARSERS:
            raise ValueError(f"unknown setting {key!r} (known: {', '.join(sorted(PARSERS))})")
        value = PARSERS[key](text)
        overrides = {k: dict(v) for k, v in self._overrides.items()}
        overrides.setdefault(disk_id.hex(), {})[key] = value
        return overrides, value

    def staged_clear(self, disk_id: bytes, key: str) -> dict[str, dict[str, Any]] | None:
        """The overrides without one key of one disk; None when it is not set."""
        if key not in self._overrides.get(disk_id.hex(), {}):
            return None
        overrides = {k: dict(v) for k, v in self._overrides.items()}
        del overrides[disk_id.hex()][key]
        if not overrides[disk_id.hex()]:
            del overrides[disk_id.hex()]
        return overrides

    def forget(self, live_ids: "builtins.set[bytes]") -> None:
        """Drop the overrides of disks that are gone (at mount start)."""
        live = {i.hex() for i in live_ids}
        if set(self._overrides) - live:
            overrides = {k: v for k, v in self._overrides.items() if k in live}
            self.persist(overrides)
            self.adopt(overrides)

    def persist(self, overrides: dict[str, dict[str, Any]]) -> None:
        """Write overrides to settings.json, crash-safely. Blocking (fsync):
        off the FUSE loop's thread."""
        if self._vrfs_fd is not None:
            data = json.dumps({"version": 1, "disks": overrides}, indent=1, sort_keys=True).encode()
            write_atomically(self._vrfs_fd, SETTINGS_FILE, data)

    def adopt(self, overrides: dict[str, dict[str, Any]]) -> None:
        """Put persisted overrides in effect."""
        self._overrides = overrides
        self.version += 1

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._vrfs_fd is None:
            return {}
        try:
            raw = json.loads(self._read())
            disks = raw["disks"]
            out: dict[str, dict[str, Any]] = {}
            for disk_hex, values in disks.items():
                bytes.fromhex(disk_hex)
                out[disk_hex] = {k: PARSERS[k](v) for k, v in values.items() if k in PARSERS}
            return out
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # A damaged settings file costs the per-disk settings, never the mount.
            log.error("%s is damaged (%s): per-disk settings set through the mount are lost; the "
                      "configuration file and the mount's options apply", SETTINGS_FILE, exc)
            return {}

    def _read(self) -> bytes:
        # O_NONBLOCK: a FIFO in its place must not hang the mount's start.
        fd = os.open(SETTINGS_FILE, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=self._vrfs_fd)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            return os.read(fd, 1 << 24)
        finally:
            os.close(fd)
