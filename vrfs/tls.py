"""TLS on the replication link: the handshakes of both ends over trio streams,
and what their failures mean to an operator.

Both ends authenticate before a single frame is read (vrfs/trust.py says how
peers are pinned). `--insecure` on both ends runs the same protocol over
plain TCP; a receiver tells the two apart by the first byte a peer sends (a
TLS record starts with 0x16, a vrfs frame with "V"), so a mismatch is named
in one log line instead of surfacing as a garbled frame.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import trio
from cryptography import x509

from vrfs import admission

from vrfs.trust import TlsDir, TrustError, check_validity, fingerprint
from vrfs.wire import ProtocolError

log = logging.getLogger("vrfs.tls")

TLS_HANDSHAKE_RECORD = 0x16
CLOSE_TIMEOUT = 2.0  # a graceful close (close_notify) waits for a peer that may never read
LINGER = 1.0  # after refusing a handshake, how long the alert is given to reach the peer


class BulkSSLStream(trio.abc.Stream):
    """A trio.SSLStream that hands over more than one record per receive.

    trio's SSLStream returns one TLS record (at most 16 KiB) per receive_some,
    and each call costs more than decrypting the record: on loopback that
    doubled the wall time of a 2 GiB initial sync against plain TCP. After the
    awaited call, this also decrypts the records already received, without
    awaiting, up to max_bytes. (trio.SSLStream cannot be subclassed.)"""

    def __init__(self, transport: trio.abc.Stream, context: ssl.SSLContext, **kw: object) -> None:
        self.tls = trio.SSLStream(transport, context, **kw)  # type: ignore[arg-type]
        self.transport_stream = transport

    async def do_handshake(self) -> None:
        await self.tls.do_handshake()

    def getpeercert(self, binary_form: bool = False) -> object:
        return self.tls.getpeercert(binary_form)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.tls.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.tls.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.tls.receive_some(max_bytes)
        if not data or max_bytes is None or len(data) >= max_bytes:
            return data
        chunks, total = [data], len(data)
        # trio's own SSLObject; reading from it between trio's calls is what
        # trio does itself, and a record that needs a reply (a key update)
        # leaves it in the outgoing buffer for trio's next call to send.
        ssl_object = self.tls._ssl_object
        while total < max_bytes:
            try:
                more = ssl_object.read(max_bytes - total)
            except ssl.SSLError:  # nothing more received (want read), or an error the next call raises
                break
            if not more:
                break
            chunks.append(more)
            total += len(more)
        return b"".join(chunks) if len(chunks) > 1 else data

    async def receive_into(self, view: memoryview) -> int:
        """receive_some into ``view`` (a large payload's buffer), returning
        how many bytes: the records already received are decrypted straight
        into it (SSLObject.read into a buffer), not into new bytes to copy."""
        data = await self.tls.receive_some(len(view))
        got = len(data)
        view[:got] = data
        if not got:
            return 0
        # As in receive_some: trio's own SSLObject, between trio's calls.
        ssl_object = self.tls._ssl_object
        while got < len(view):
            try:
                # With a buffer, read returns how many bytes it put there (typeshed says bytes).
                more: int = ssl_object.read(len(view) - got, view[got:])  # type: ignore[assignment]
            except ssl.SSLError:  # nothing more received (want read), or an error the next call raises
                break
            if not more:
                break
            got += more
        return got

    async def aclose(self) -> None:
        await self.tls.aclose()


@dataclass(frozen=True)
class Authenticated:
    """What the handshake proved about the receiver, for `vrfs status`."""

    insecure: bool
    pinned_as: str | None = None
    fingerprint: str | None = None

    def describe(self) -> str:
        if self.insecure:
            return "INSECURE: plain TCP, nothing authenticated or encrypted (--insecure)"
        return f"TLS 1.3, receiver pinned as {self.pinned_as}"


class ClientTls:
    """The source's end. Pins are read at every connection, so `vrfs trust add`
    takes effect without a remount."""

    def __init__(self, tls_dir: TlsDir | None) -> None:
        self.dir = tls_dir  # None: --insecure

    async def wrap(self, stream: trio.abc.HalfCloseableStream) -> tuple[trio.abc.Stream, Authenticated]:
        """Handshake, then check the receiver's certificate against the pins.
        Raises TrustError (not pinned, expired) or the transport's errors."""
        if self.dir is None:
            return stream, Authenticated(insecure=True)
        # Key, certificate and pins are files: read in a worker thread, since
        # the source's loop also serves FUSE.
        context = await trio.to_thread.run_sync(self.dir.client_context)
        tls = BulkSSLStream(stream, context, server_hostname=None)
        await tls.do_handshake()
        pin = await trio.to_thread.run_sync(self.dir.check_receiver, tls.tls.getpeercert(binary_form=True))
        return tls, Authenticated(insecure=False, pinned_as=pin.name, fingerprint=pin.fingerprint)

    def explain(self, exc: BaseException, handshook: bool) -> str | None:
        """A failed connection in words, when TLS (or its absence) is the cause.
        ``handshook``: the TLS handshake had completed on our side."""
        if isinstance(exc, TrustError):
            return str(exc)
        if self.dir is None:
            return None
        chain: list[BaseException] = []
        while exc is not None and len(chain) < 8:
            chain.append(exc)
            exc = exc.__cause__  # type: ignore[assignment]
        cause = next((e for e in chain if isinstance(e, (ssl.SSLError, OSError))), chain[-1])
        text = str(cause).upper()
        if not handshook:
            if "WRONG_VERSION" in text or "PACKET_LENGTH" in text or "RECORD_LAYER" in text:
                return "the receiver does not speak TLS: it runs with --insecure (both ends must agree)"
            if "EOF" in text or isinstance(cause, (ConnectionResetError, BrokenPipeError)):
                return ("the receiver closed the connection in the TLS handshake: it runs with --insecure "
                        "(both ends must agree), is not a vrfs receiver, or is at its connection bound")
            return None
        # TLS 1.3: the receiver judges our certificate after our side of the
        # handshake is done, so its verdict arrives as an alert, or as the
        # connection closing, where the WELCOME was due.
        closed = (isinstance(cause, (ssl.SSLError, ConnectionResetError, BrokenPipeError))
                  or any(isinstance(e, ProtocolError) and "closed by peer" in str(e) for e in chain))
        if handshook and closed:
            try:
                mine = self.dir.site_fingerprint()
            except TrustError:
                mine = "?"
            return (f"the receiver refused this site's certificate {mine}: pin it there with "
                    f"`vrfs trust add NAME {self.dir.cert_path}`, NAME being this source's --name "
                    f"(the receiver's log says why)")
        return None


class ServerTls:
    """The receiver's end: authenticates each connection, or refuses it with one
    log line. Its context is rebuilt when the pins change, so `vrfs trust add`
    at the DR site takes effect without a restart."""

    def __init__(self, tls_dir: TlsDir | None, handshake_timeout: float = 30.0) -> None:
        self.dir = tls_dir  # None: --insecure
        self.handshake_timeout = handshake_timeout
        self._context: ssl.SSLContext | None = None
        self._pins_state: tuple | None = None
        self._names: dict[str, list[str]] = {}  # fingerprint -> the names it is pinned under
        self._names_state: tuple | None = None
        self._site: x509.Certificate | None = None  # the certificate the context presents
        self._out_of_date: str | None = None  # why it is, once logged

    def context(self) -> ssl.SSLContext:
        """Rebuilt when the pins change, or the site's key (`vrfs keygen --force`:
        no restart needed). An expired certificate of our own is still
        presented, so that each source can say precisely why it refuses us; we
        say it once here."""
        assert self.dir is not None
        state = (self.dir.state(), self.dir.site_state())
        if self._context is None or state != self._pins_state:
            self._context = self.dir.server_context(check_dates=False)
            self._site = self.dir.site_certificate()
            self._pins_state = state
        self._check_dates()
        return self._context

    def _check_dates(self) -> None:
        assert self.dir is not None and self._site is not None
        try:
            check_validity(self._site, f"this receiver's certificate {self.dir.cert_path}")
        except TrustError as exc:
            if str(exc) != self._out_of_date:
                self._out_of_date = str(exc)
                with _unfiltered():
                    log.error("%s: every source refuses it; `vrfs keygen --force --tls-dir %s`, and pin the new "
                              "certificate at every source", exc, self.dir.path)
        else:
            self._out_of_date = None

    def names_of(self, fp: str) -> list[str]:
        """The names the certificate ``fp`` is pinned under now (pins read again when they changed)."""
        assert self.dir is not None
        state = self.dir.state()
        if state != self._names_state or self._names_state is None:
            names: dict[str, list[str]] = {}
            for pin in self.dir.pins():
                names.setdefault(pin.fingerprint, []).append(pin.name)
            self._names, self._names_state = names, state
        return self._names.get(fp, [])

    def still_pinned(self, name: str, fp: str) -> bool:
        """Whether an established session's certificate is still pinned under its
        name: the receiver asks before each request, so `vrfs trust remove`
        cuts an open session at its next cycle, not only at its next connection."""
        try:
            return self.names_of(fp) == [name]
        except TrustError:
            return False

    async def accept(self, stream: trio.abc.HalfCloseableStream,
                     peer: str) -> tuple[trio.abc.Stream, str | None, str | None] | None:
        """The authenticated stream, the source name pinned for its certificate
        and the certificate's fingerprint (both None when insecure), or None
        when the peer is refused (logged)."""
        with trio.move_on_after(self.handshake_timeout):
            return await self._accept(stream, peer)
        log.warning("%s: refused: no handshake within %g s", peer, self.handshake_timeout)
        return None

    async def _accept(self, stream: trio.abc.HalfCloseableStream,
                      peer: str) -> tuple[trio.abc.Stream, str | None, str | None] | None:
        try:
            first = await _socket(stream).recv(1, socket.MSG_PEEK)
        except OSError as exc:
            log.info("%s: connection lost before its handshake: %s", peer, exc.strerror or exc)
            return None
        if not first:
            return None  # connected and closed: a port probe
        speaks_tls = first[0] == TLS_HANDSHAKE_RECORD
        if self.dir is None:
            if speaks_tls:
                log.warning("%s: refused: a TLS client, and this receiver runs with --insecure (both ends must "
                            "agree)", peer)
                await _linger(stream)
                return None
            return stream, None, None
        if not speaks_tls:
            log.warning("%s: refused: plain TCP (a source started with --insecure?); this receiver requires TLS",
                        peer)
            await _linger(stream)
            return None
        try:
            tls = BulkSSLStream(stream, self.context(), server_side=True)
            await tls.do_handshake()
        except TrustError as exc:
            log.error("%s: refused: %s", peer, exc)
            return None
        except trio.BrokenResourceError as exc:
            log.warning("%s: refused in the TLS handshake: %s", peer, _reason(exc))
            await _linger(stream)
            return None
        fp = fingerprint(tls.tls.getpeercert(binary_form=True) or b"")
        try:
            names = self.names_of(fp)
        except TrustError as exc:
            log.error("%s: refused: %s", peer, exc)
            names = []
        if len(names) > 1:
            log.warning("%s: refused: certificate %s is pinned under several names (%s): one certificate, one "
                        "name; `vrfs trust remove` all but one", peer, fp, ", ".join(names))
        elif not names:
            # OpenSSL took it, so a pinned certificate signed it (site certificates are CAs of themselves,
            # and a pinned CA signs many): that pins no one but the signer. Or its pin went just now.
            log.warning("%s: refused: certificate %s is not pinned (signed by a pinned certificate, which pins "
                        "only itself; or its pin was removed just now)", peer, fp)
        if len(names) != 1:
            await close(tls)
            return None
        return tls, names[0], fp


@contextlib.contextmanager
def _unfiltered() -> Iterator[None]:
    """A line about the receiver itself, not about the connection that found it
    out: not counted among the rate-limited lines of unestablished connections."""
    token = admission.current_slot.set(None)
    try:
        yield
    finally:
        admission.current_slot.reset(token)


def _socket(stream: trio.abc.HalfCloseableStream) -> trio.socket.SocketType:
    """The socket under an accepted stream (a trio.SocketStream, or the
    admission layer's wrapper of one)."""
    return stream.socket  # type: ignore[attr-defined]


async def _linger(stream: trio.abc.HalfCloseableStream) -> None:
    """Let a refused peer read our alert: in TLS 1.3 a client has already sent
    its first message when our verdict on its certificate goes out, and a
    close with that message unread would reset the connection, alert and all."""
    with trio.move_on_after(LINGER):
        try:
            _socket(stream).shutdown(socket.SHUT_WR)
            while await stream.receive_some(65536):
                pass
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _reason(exc: BaseException) -> str:
    cause = exc.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        why = cause.verify_message
        if cause.verify_code in (18, 19, 20):  # self-signed, or not issued by any pinned certificate
            why = "its certificate is not pinned here (`vrfs trust add SOURCE CERT` pins a source)"
        return f"certificate refused: {why}"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause or exc)


async def close(stream: trio.abc.AsyncResource) -> None:
    """Close a link's stream without ever hanging: a graceful TLS close sends
    close_notify, which a peer that stopped reading would never take."""
    with trio.CancelScope(shield=True):
        with trio.move_on_after(CLOSE_TIMEOUT):
            await stream.aclose()
            return
        if isinstance(stream, (trio.SSLStream, BulkSSLStream)):
            await stream.transport_stream.aclose()
