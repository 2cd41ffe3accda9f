"""Parsing of operator input: sizes, durations, addresses. Bad input raises UserError."""

import ipaddress
import math
import re

from vrfs import DEFAULT_PORT
from vrfs.errors import EXIT_USAGE, UserError

_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_SIZE = 1 << 60  # 1024 P: beyond any disk, rate or file, and well inside a 64-bit integer
MAX_DURATION = 10 * 366 * 86400.0  # ten years: longer is a typo, and overflows timers
# A host name (RFC 1123 labels; "_" too, as resolvers accept it) or an IPv4 address.
_HOST_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
                        r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?")


def parse_size(text: str, what: str = "size") -> int:
    """'64K', '1M', '4096', '2GiB' -> bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"bad {what} {text!r}: expected a number with an optional K, M, G or T suffix", EXIT_USAGE)
    size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    if size > MAX_SIZE:
        raise UserError(f"bad {what} {text!r}: too large (at most {MAX_SIZE >> 40}T)", EXIT_USAGE)
    return size


def parse_block_size(text: str) -> int:
    size = parse_size(text, "block size")
    if size < 4096 or size > (1 << 20) or size & (size - 1):
        raise UserError(f"bad block size {text!r}: must be a power of two from 4K to 1M", EXIT_USAGE)
    return size


def parse_duration(text: str, what: str = "duration") -> float:
    """'5m', '30s', '1h', '90' (seconds) -> seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"bad {what} {text!r}: expected a positive number with an optional s, m, h or d suffix",
                        EXIT_USAGE)
    seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise UserError(f"bad {what} {text!r}: too long (at most 10 years)", EXIT_USAGE)
    return seconds


def parse_address(text: str, default_host: str = "", what: str = "address") -> tuple[str, int]:
    """'host:port', 'host', ':port', '[::1]:port' -> (host, port)."""
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?|([^:\[\]]*)(?::(\d+))?", text.strip())
    if not m or text.strip() == "":
        raise UserError(f"bad {what} {text!r}: expected HOST:PORT", EXIT_USAGE)
    host = m.group(1) or m.group(3) or default_host
    port_text = m.group(2) or m.group(4)
    port = int(port_text) if port_text else DEFAULT_PORT
    if not host:
        raise UserError(f"bad {what} {text!r}: no host given", EXIT_USAGE)
    if m.group(1) is not None:
        try:
            ipaddress.IPv6Address(m.group(1))
        except ValueError:
            raise UserError(f"bad {what} {text!r}: {m.group(1)!r} is not an IPv6 address", EXIT_USAGE) from None
    elif not _HOST_NAME.fullmatch(host):
        raise UserError(f"bad {what} {text!r}: {host!r} is not a host name or address", EXIT_USAGE)
    if not 0 < port < 65536:
        raise UserError(f"bad {what} {text!r}: port must be 1-65535", EXIT_USAGE)
    return host, port


def format_size(n: float) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return str(n)


def printable(text: str) -> str:
    """A name as `ls -b` shows it: control characters (newlines, escape
    sequences) and undecodable bytes (surrogate escapes) written as \\n,
    \\x1b, \\xff, so that a file name can neither forge a line of a log or
    a table nor reach a terminal as a command."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(c: str) -> str:
    if 0xDC80 <= ord(c) <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode gives it
        return f"\\x{ord(c) - 0xDC00:02x}"
    return _ESCAPES.get(c) or c.encode("unicode_escape").decode("ascii")
