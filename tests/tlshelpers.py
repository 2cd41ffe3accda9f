"""The tests' sites: one TLS directory per site, made with vrfs's own key
generation, every source pinned at the receivers' directory under its name
and the receivers pinned at every source's. Made once per test session in a
temporary directory that is removed at exit.

Server and Mount (servehelpers, mounthelpers) add these directories to every
`vrfs serve` and `vrfs mount --peer` unless a test passes --tls-dir or
--insecure itself, so every replication test runs over mutual TLS."""

from __future__ import annotations

import atexit
import shutil
import socket
import tempfile
from pathlib import Path

from vrfs.tls import ClientTls
from vrfs.trust import TlsDir

RECEIVER = "dr"  # the name under which sources pin the receivers
_root: Path | None = None


def _base() -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="vrfs-test-pki-"))
        atexit.register(shutil.rmtree, _root, True)
    return _root


def _site(path: Path, name: str) -> TlsDir:
    tls = TlsDir(path)
    if not tls.key_path.exists():
        tls.keygen(name)
    return tls


def receiver_dir() -> Path:
    return _site(_base() / "receiver", RECEIVER).path


def source_dir(name: str) -> Path:
    """The TLS directory of the source NAME, pinned both ways with the receivers."""
    receiver = _site(_base() / "receiver", RECEIVER)
    source = _site(_base() / "sources" / name, name)
    receiver.add(name, str(source.cert_path))
    source.add(RECEIVER, str(receiver.cert_path))
    return source.path


def client_tls(name: str) -> ClientTls:
    return ClientTls(TlsDir(source_dir(name)))


def has_security(args: tuple[str, ...] | list[str]) -> bool:
    return "--tls-dir" in args or "--insecure" in args


def serve_args(args: tuple[str, ...] | list[str] = ()) -> list[str]:
    """What a `vrfs serve` command line needs for the tests' receiver."""
    return [] if has_security(args) else ["--tls-dir", str(receiver_dir())]


def mount_args(args: tuple[str, ...] | list[str]) -> list[str]:
    """What a `vrfs mount` command line needs, when it replicates, for its source name."""
    if "--peer" not in args or has_security(args):
        return []
    args = list(args)
    name = args[args.index("--name") + 1] if "--name" in args else socket.gethostname()
    return ["--tls-dir", str(source_dir(name))]
