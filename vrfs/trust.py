"""A site's key, the peers it pins, and the TLS contexts built from them.

A TLS directory (default /etc/vrfs) holds:

    site.key            this site's private key (ECDSA P-256, mode 0600)
    site.crt            its self-signed certificate
    trusted/NAME.crt    a pinned peer: its certificate
    trusted/NAME.fp     a pinned peer known only by its fingerprint

There is no certificate authority: a peer is trusted because an operator
pinned exactly its certificate under a name. At the receiver that name is
the only source name the peer may use. OpenSSL verifies the chain of a
client certificate against the pinned certificates, so a receiver can pin a
source only by its certificate; a source checks the receiver's certificate
itself, after the handshake and before it sends anything, so it can pin a
receiver by fingerprint too (`docs/trust.md`).

Nothing here does I/O on the network; vrfs/tls.py drives the handshakes.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
import secrets
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vrfs.durable import atomic_write

DEFAULT_TLS_DIR = "/etc/vrfs"
KEY_FILE = "site.key"
CERT_FILE = "site.crt"
TRUSTED_DIR = "trusted"
CERT_SUFFIX = ".crt"
FINGERPRINT_SUFFIX = ".fp"
DEFAULT_DAYS = 3650
MAX_NAME = 255
MAX_PIN_BYTES = 64 << 10  # a certificate is about 600 bytes; /dev/zero is endless
MAX_COMMON_NAME = 64  # X.509's upper bound; the name a peer is pinned under is what counts

_FINGERPRINT = re.compile(r"^(?:sha256:)?((?:[0-9a-f]{2}:?){31}[0-9a-f]{2})$")


class TrustError(Exception):
    """A TLS directory, a pin or a certificate that cannot be used; one line for the operator."""


def fingerprint(der: bytes) -> str:
    """How vrfs names a certificate: the SHA-256 of its DER form."""
    return "sha256:" + hashlib.sha256(der).hexdigest()


def parse_fingerprint(text: str) -> str | None:
    """A fingerprint as an operator may type it (with or without "sha256:",
    colons, upper case), in vrfs's form; None when it is not one."""
    m = _FINGERPRINT.match(text.strip().lower())
    return "sha256:" + m.group(1).replace(":", "") if m else None


def check_pin_name(name: str) -> str:
    """A pinned name is a source name at the receiver: one safe path component."""
    try:
        encoded = name.encode()
    except UnicodeEncodeError:  # bytes of another encoding on the command line: not a name a HELLO can carry
        encoded = b""
    if (not encoded or len(encoded) > MAX_NAME or name in (".", "..")
            or name.startswith(".") or any(c in name for c in "/\0\n\r\t") or name != name.strip()):
        raise TrustError(f"bad name {name!r}: one word, as the source names itself with `vrfs mount --name`")
    return name


@dataclass(frozen=True)
class Pin:
    """One trusted peer."""

    name: str
    fingerprint: str
    certificate: x509.Certificate | None  # None: pinned by fingerprint only

    @property
    def not_after(self) -> datetime.datetime | None:
        return self.certificate.not_valid_after_utc if self.certificate is not None else None


def read_small(path: Path, regular_only: bool) -> bytes:
    """A certificate or fingerprint file, read without hanging or filling
    memory: at most MAX_PIN_BYTES; with ``regular_only`` (the pins in
    trusted/, read at every connection) a FIFO, a device or a directory is
    refused without being read. Raises OSError or TrustError."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_NONBLOCK if regular_only else 0)
    fd = os.open(path, flags)
    try:
        if regular_only and not stat.S_ISREG(os.fstat(fd).st_mode):
            raise TrustError(f"{path}: not a regular file")
        chunks, size = [], 0
        while size <= MAX_PIN_BYTES:
            chunk = os.read(fd, MAX_PIN_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_PIN_BYTES:
        raise TrustError(f"{path} is not a certificate: more than {MAX_PIN_BYTES} bytes")
    return b"".join(chunks)


def load_certificate(data: bytes, what: str) -> x509.Certificate:
    """A certificate from PEM or DER bytes: exactly one (a pin names one peer)."""
    count = data.count(b"-----BEGIN CERTIFICATE-----")
    if count > 1:
        raise TrustError(f"{what} holds {count} certificates: a pin is one certificate, its peer's own")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data)
        return x509.load_der_x509_certificate(data)
    except ValueError as exc:
        raise TrustError(f"{what} is not a certificate: {exc}") from None


def check_validity(cert: x509.Certificate, what: str, now: datetime.datetime | None = None) -> None:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    if now < cert.not_valid_before_utc:
        raise TrustError(f"{what} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")
    if now > cert.not_valid_after_utc:
        raise TrustError(f"{what} expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")


def make_certificate(key: ec.EllipticCurvePrivateKey, name: str, not_before: datetime.datetime,
                     not_after: datetime.datetime) -> x509.Certificate:
    """A self-signed certificate for both ends of a link (server and client auth)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:MAX_COMMON_NAME]),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vrfs site")])
    return (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(not_before).not_valid_after(not_after)
            # A CA of itself only, so that OpenSSL takes the pinned certificate as its own trust anchor.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(key, hashes.SHA256()))


def _write(path: Path, data: bytes, mode: int) -> None:
    try:
        atomic_write(path, data)  # created 0600: a key is never readable by others, even briefly
        os.chmod(path, mode)
    except OSError as exc:
        raise TrustError(f"cannot write {path}: {exc.strerror}") from None


class TlsDir:
    """A site's TLS directory: its key and certificate, and its pins."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.key_path = self.path / KEY_FILE
        self.cert_path = self.path / CERT_FILE
        self.trusted_path = self.path / TRUSTED_DIR

    # ------------------------------------------------------------ the site's key

    def keygen(self, name: str, days: int = DEFAULT_DAYS, force: bool = False) -> x509.Certificate:
        if days < 1 or days > 100 * 366:
            raise TrustError(f"--days {days}: from 1 to 36600")
        if self.key_path.exists() and not force:
            raise TrustError(f"{self.key_path} exists: this site has a key (fingerprint "
                             f"{self.site_fingerprint()}); --force replaces it, and every peer must pin the new one")
        self._mkdirs()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = make_certificate(key, name, now - datetime.timedelta(hours=1), now + datetime.timedelta(days=days))
        self.write_site(key, cert)
        return cert

    def write_site(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self._mkdirs()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        _write(self.key_path, key_pem, mode=0o600)
        _write(self.cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)

    def site_certificate(self) -> x509.Certificate:
        try:
            data = self.cert_path.read_bytes()
        except FileNotFoundError:
            raise TrustError(f"no site key in {self.path}: run `vrfs keygen --tls-dir {self.path}` "
                             "(or give both ends --insecure for plain TCP)") from None
        except OSError as exc:
            raise TrustError(f"cannot read {self.cert_path}: {exc.strerror}") from None
        return load_certificate(data, str(self.cert_path))

    def site_fingerprint(self) -> str:
        return fingerprint(self.site_certificate().public_bytes(serialization.Encoding.DER))

    def require_site_key(self, check_dates: bool = True) -> x509.Certificate:
        """The site's certificate, checked usable: present, readable, in date, with its key."""
        cert = self.site_certificate()
        if not self.key_path.exists():
            raise TrustError(f"{self.key_path} is missing (the certificate is there): run `vrfs keygen --force "
                             f"--tls-dir {self.path}` and pin the new certificate at every peer")
        if check_dates:
            check_validity(cert, f"this site's certificate {self.cert_path}")
        return cert

    # ------------------------------------------------------------ pins

    def pins(self) -> list[Pin]:
        """Every pinned peer, by name. Unreadable entries are skipped (and named by `vrfs trust list`)."""
        return [pin for pin in (self._load_pin(p) for p in self._pin_files()) if isinstance(pin, Pin)]

    def broken_pins(self) -> list[str]:
        return [msg for msg in (self._load_pin(p) for p in self._pin_files()) if isinstance(msg, str)]

    def pin(self, name: str) -> Pin | None:
        return next((p for p in self.pins() if p.name == name), None)

    def add(self, name: str, cert_or_fingerprint: str) -> Pin:
        check_pin_name(name)
        fp = parse_fingerprint(cert_or_fingerprint)
        cert = None
        if fp is None:
            path = Path(cert_or_fingerprint)
            try:
                data = read_small(path, regular_only=False)  # a pipe is fine: `vrfs trust add dr <(ssh dr cat ...)`
            except FileNotFoundError:
                raise TrustError(f"{cert_or_fingerprint!r} is neither a certificate file nor a fingerprint "
                                 "(sha256: and 64 hex digits, as `vrfs keygen` prints it)") from None
            except OSError as exc:
                raise TrustError(f"cannot read {path}: {exc.strerror}") from None
            cert = load_certificate(data, str(path))
            fp = fingerprint(cert.public_bytes(serialization.Encoding.DER))
        for other in self.pins():
            if other.name == name:
                if other.fingerprint == fp:
                    if cert is None or other.certificate is not None:
                        return other  # the same pin again: nothing to do
                    break  # a fingerprint pin gains its certificate
                raise TrustError(f"{name} is already pinned to {other.fingerprint}: "
                                 f"`vrfs trust remove {name}` first")
            if other.fingerprint == fp:
                raise TrustError(f"that certificate is already pinned as {other.name!r}: one certificate, one name")
        self._mkdirs()
        if cert is not None:
            _write(self.trusted_path / (name + CERT_SUFFIX), cert.public_bytes(serialization.Encoding.PEM),
                             mode=0o644)
            (self.trusted_path / (name + FINGERPRINT_SUFFIX)).unlink(missing_ok=True)
        else:
            _write(self.trusted_path / (name + FINGERPRINT_SUFFIX), (fp + "\n").encode(), mode=0o644)
        return Pin(name, fp, cert)

    def remove(self, name: str) -> Pin:
        check_pin_name(name)  # "../site" would be the site's own certificate
        pin = self.pin(name)
        found = False
        for suffix in (CERT_SUFFIX, FINGERPRINT_SUFFIX):
            try:
                (self.trusted_path / (name + suffix)).unlink()
                found = True
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise TrustError(f"cannot remove the pin {name}: {exc.strerror}") from None
        if not found:
            raise TrustError(f"no peer named {name!r} is pinned in {self.trusted_path}")
        return pin or Pin(name, "?", None)

    def names_of(self, fp: str) -> list[str]:
        """Every name ``fp`` is pinned under. More than one is an operator's
        slip (a copy made by hand: `add` refuses it) and authenticates no one:
        a peer's name must not depend on the order of file names."""
        return [p.name for p in self.pins() if p.fingerprint == fp]

    def conflicts(self) -> list[str]:
        """The certificates pinned under several names, in words (`vrfs trust list`)."""
        by_fp: dict[str, list[str]] = {}
        for p in self.pins():
            by_fp.setdefault(p.fingerprint, []).append(p.name)
        return [f"{fp} is pinned under several names ({', '.join(names)}): it is refused under each of them "
                f"until all but one are removed" for fp, names in by_fp.items() if len(names) > 1]

    def state(self) -> tuple:
        """Changes whenever a pin is added, removed or replaced: when to rebuild a context."""
        try:
            entries = list(os.scandir(self.trusted_path))
        except OSError:
            return ()
        out = []
        for e in entries:
            try:
                st = e.stat()
            except OSError:  # a dangling symlink must not hide the other entries' changes
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue  # gone meanwhile
            out.append((e.name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(sorted(out))

    def _pin_files(self) -> list[Path]:
        try:
            names = sorted(os.listdir(self.trusted_path))
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise TrustError(f"cannot read {self.trusted_path}: {exc.strerror}") from None
        return [self.trusted_path / n for n in names if n.endswith((CERT_SUFFIX, FINGERPRINT_SUFFIX))
                and not n.startswith(".")]

    def _load_pin(self, path: Path) -> Pin | str:
        name = path.name.rsplit(".", 1)[0]
        try:
            data = read_small(path, regular_only=True)
        except OSError as exc:
            return f"{path}: {exc.strerror}"
        except TrustError as exc:
            return str(exc)
        if path.name.endswith(FINGERPRINT_SUFFIX):
            if (path.parent / (name + CERT_SUFFIX)).exists():
                return "superseded"
            fp = parse_fingerprint(data.decode(errors="replace"))
            return Pin(name, fp, None) if fp else f"{path}: not a fingerprint"
        try:
            cert = load_certificate(data, str(path))
        except TrustError as exc:
            return str(exc)
        return Pin(name, fingerprint(cert.public_bytes(serialization.Encoding.DER)), cert)

    def _mkdirs(self) -> None:
        try:
            self.path.mkdir(mode=0o755, parents=True, exist_ok=True)
            self.trusted_path.mkdir(mode=0o755, exist_ok=True)
        except OSError as exc:
            raise TrustError(f"cannot create {self.trusted_path}: {exc.strerror}") from None

    # ------------------------------------------------------------ contexts

    def site_state(self) -> tuple:
        """Changes when the site's key or certificate is replaced (`vrfs keygen --force`)."""
        out: list[tuple[int, int, int] | None] = []
        for path in (self.key_path, self.cert_path):
            try:
                st = path.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _context(self, purpose: int, check_dates: bool = True) -> ssl.SSLContext:
        if check_dates:
            self.require_site_key()
        else:
            self.require_site_key(check_dates=False)
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise TrustError(f"cannot load this site's key from {self.path}: {exc}") from None
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """The source's side: presents the site certificate; checks the receiver's
        certificate against the pins itself (vrfs/tls.py), after the handshake."""
        ctx = self._context(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # verified by pin, not by a CA: see check_receiver
        return ctx

    def server_context(self, check_dates: bool = True) -> ssl.SSLContext:
        """The receiver's side: a client certificate is required, and OpenSSL
        accepts only the pinned ones (in date). A fingerprint pin cannot
        authenticate a source: OpenSSL needs the certificate itself."""
        ctx = self._context(ssl.PROTOCOL_TLS_SERVER, check_dates)
        ctx.verify_mode = ssl.CERT_REQUIRED
        certs = [p.certificate.public_bytes(serialization.Encoding.PEM).decode()
                 for p in self.pins() if p.certificate is not None]
        if certs:
            try:
                ctx.load_verify_locations(cadata="".join(certs))
            except ssl.SSLError as exc:
                raise TrustError(f"cannot load the pins of {self.trusted_path}: {exc}") from None
        return ctx

    def usable(self, side: str) -> TlsDir:
        """This directory, checked before a daemon starts: its key is there and in
        date, and the context of `side` ("client" or "server") builds."""
        self.require_site_key()
        if side == "client":
            self.client_context()
        else:
            self.server_context()
        return self

    def check_receiver(self, der: bytes | None) -> Pin:
        """The receiver's certificate, as presented in the handshake: pinned and in date."""
        if not der:
            raise TrustError("the receiver presented no certificate")
        fp = fingerprint(der)
        pin = next((p for p in self.pins() if p.fingerprint == fp), None)
        if pin is None:
            raise TrustError(f"the receiver's certificate {fp} is not pinned in {self.trusted_path}: if it is "
                             f"the DR site's, `vrfs trust add NAME CERT|FINGERPRINT --tls-dir {self.path}`")
        check_validity(load_certificate(der, "the receiver's certificate"),
                       f"the receiver's certificate (pinned as {pin.name})")
        return pin
