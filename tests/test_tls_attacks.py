"""Attacks on the mutual-TLS link, as a hostile peer or an unlucky operator
would make them, against real `vrfs serve` processes and the real CLI
(docs/trust.md). Each test names the weakness it proves (or the defence it
checks); every receiver here has a TLS directory of its own, so that changing
its pins touches no other test."""

from __future__ import annotations

import datetime
import os
import resource
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vrfs.link import Link, LinkError
from vrfs.tls import ClientTls
from vrfs.trust import TlsDir, make_certificate

from servehelpers import Server, aiter_blocks, disk, header, tree_digest, vrfs_command, vrfs_env

pytestmark = pytest.mark.timeout(60)
BS = 65536
DISK = disk(1, "vm1/a.raw", 4 * BS)
NOW = datetime.datetime.now(datetime.timezone.utc)
DAY = datetime.timedelta(days=1)


# ---------------------------------------------------------------- helpers

def pki(tmp: Path, *sources: str) -> tuple[TlsDir, dict[str, TlsDir]]:
    """A receiver "dr" and sources of its own, pinned both ways."""
    rx = TlsDir(tmp / "tls-dr")
    rx.keygen("dr")
    out = {}
    for name in sources:
        src = TlsDir(tmp / f"tls-{name}")
        src.keygen(name)
        src.add("dr", str(rx.cert_path))
        rx.add(name, str(src.cert_path))
        out[name] = src
    return rx, out


def limit_memory() -> None:
    """In a child: 1 GiB of address space, so that reading /dev/zero fails fast instead of eating the host."""
    resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run(vrfs_command(*args), capture_output=True, text=True, env=vrfs_env(), timeout=timeout,
                          preexec_fn=limit_memory)


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> None:
    assert r.returncode != 0, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vrfs: "), r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)


def start(tmp: Path, rx: TlsDir, *args: str, name: str = "serve") -> Server:
    server = Server(f"dir:{tmp / ('store-' + name)}", tmp / f"{name}.log")
    server.args = ("--tls-dir", str(rx.path), *args)
    server.preexec = limit_memory
    return server.start()


def store_of(server: Server) -> Path:
    return Path(server.store_url[len("dir:"):])


async def connect(server: Server, tls: TlsDir, name: str, timeout: float = 10) -> Link:
    with trio.fail_after(timeout):
        return await Link.connect("127.0.0.1", server.port, name, tls=ClientTls(tls))


async def ship(link: Link, cycle_id: int, fill: bytes) -> None:
    await link.send_cycle(header("vm1", cycle_id, DISK), aiter_blocks([(0, i, fill * BS) for i in range(4)]))


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def wait_for(cond, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def issued_by(issuer_key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate, name: str,
              ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A leaf certificate signed by another key (a pinned site's, or a CA's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW - DAY).not_valid_after(NOW + DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return key, cert


def site_with(tmp: Path, dirname: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate,
              rx: TlsDir) -> TlsDir:
    tls = TlsDir(tmp / dirname)
    tls.write_site(key, cert)
    tls.add("dr", str(rx.cert_path))
    return tls


def client_hello() -> bytes:
    """The bytes of a real TLS 1.3 ClientHello (what a stalled handshake sends first)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


# ---------------------------------------------------------------- the CLI and pin files

def test_trust_remove_cannot_leave_the_trusted_directory(tmp_path: Path) -> None:
    """`vrfs trust remove ../site` deleted the site's own certificate (and
    `../../x` any x.crt or x.fp reachable from the TLS directory): remove did
    not check the name that add checks."""
    tls = TlsDir(tmp_path / "tls")
    tls.keygen("hv1")
    (tmp_path / "victim.crt").write_text("not ours\n")
    for name in ("../site", "../../victim", "/etc/ssl/x", ".hidden", ""):
        r = cli("trust", "remove", "--tls-dir", str(tls.path), name)
        one_line_error(r, "bad name")
    assert tls.cert_path.exists() and (tmp_path / "victim.crt").exists()


def test_keygen_names_a_certificate_cannot_hold(tmp_path: Path) -> None:
    """A name longer than the 64 characters of an X.509 common name, or not
    UTF-8, gave a traceback from `cryptography`."""
    long = "h" * 100
    r = cli("keygen", "--tls-dir", str(tmp_path / "long"), "--name", long)
    assert r.returncode == 0, r.stderr  # the pin's name is what counts; the CN is only a label
    assert TlsDir(tmp_path / "long").site_certificate()
    r = cli("keygen", "--tls-dir", str(tmp_path / "bad"), "--name", "hv\udcff")
    one_line_error(r, "bad name")
    r = cli("trust", "add", "--tls-dir", str(tmp_path / "bad"), "hv\udcff", str(TlsDir(tmp_path / "long").cert_path))
    one_line_error(r, "bad name")
    # The other bad inputs of keygen already give one line each.
    for args, words in ((("--name", "x", "--days", "-5"), ("--days",)),
                        (("--name", "x", "--days", "10" * 20), ("--days",)),
                        (("--name", "x"), ("exists",))):  # onto the existing key
        one_line_error(cli("keygen", "--tls-dir", str(tmp_path / "long"), *args), *words)
    (tmp_path / "file").write_text("")
    one_line_error(cli("keygen", "--tls-dir", str(tmp_path / "file" / "tls"), "--name", "x"), "cannot create")


def test_pin_files_that_are_not_one_plain_certificate(tmp_path: Path) -> None:
    """A FIFO named NAME.crt in trusted/ hung `vrfs trust list` (and the
    receiver: see below); a symlink to /dev/zero made them read until memory
    ran out; `trust add NAME /dev/zero` too. A PEM file of several
    certificates was pinned as its first one, the others silently ignored."""
    rx, srcs = pki(tmp_path, "hv1", "hv2")
    trusted = rx.trusted_path
    os.mkfifo(trusted / "fifo.crt")
    (trusted / "zero.crt").symlink_to("/dev/zero")
    (trusted / "dir.crt").mkdir()
    (trusted / "junk.crt").write_bytes(os.urandom(300))
    bundle = srcs["hv1"].cert_path.read_bytes() + srcs["hv2"].cert_path.read_bytes()
    (tmp_path / "bundle.pem").write_bytes(bundle)
    (trusted / "two.crt").write_bytes(bundle)

    r = cli("trust", "list", "--tls-dir", str(rx.path), timeout=20)
    assert r.returncode == 1, r.stderr
    out = r.stdout
    for name in ("fifo.crt", "zero.crt", "dir.crt", "junk.crt", "two.crt"):
        assert f"unusable: {trusted / name}" in out, out
    assert "hv1 " in out and "hv2 " in out, out
    assert "Traceback" not in r.stderr

    one_line_error(cli("trust", "add", "--tls-dir", str(rx.path), "z", "/dev/zero"), "/dev/zero")
    one_line_error(cli("trust", "add", "--tls-dir", str(rx.path), "b", str(tmp_path / "bundle.pem")),
                   "2 certificates")
    assert rx.pin("b") is None and rx.pin("z") is None
