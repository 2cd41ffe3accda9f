"""Mutual TLS between sites, against a real `vrfs serve`: peers that are not
pinned, expired, or claim another source's name are refused before a frame
is read, with one log line; plain TCP only with --insecure on both ends; pins
take effect without a restart; the CLI of keys and pins answers every bad
input with one line."""

from __future__ import annotations

import datetime
import json
import socket
import time
from pathlib import Path

import pytest
import trio
from cryptography.hazmat.primitives.asymmetric import ec

from vrfs.link import Link, LinkError
from vrfs.tls import ClientTls
from vrfs.trust import TlsDir, make_certificate

from mounthelpers import vrfs
from servehelpers import Server, aiter_blocks, connect, disk, free_port, header, tree_digest
from sitehelpers import NAME, Site, fsync_path
from tlshelpers import RECEIVER, receiver_dir, source_dir

pytestmark = pytest.mark.timeout(90)
BS = 65536
DISK = disk(1, "vm1/a.raw", 4 * BS)


def new_site(tmp_path: Path, name: str, *, days: int = 30, expired: bool = False) -> TlsDir:
    tls = TlsDir(tmp_path / f"tls-{name}")
    if expired:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        tls.write_site(key, make_certificate(key, name, now - datetime.timedelta(days=10),
                                             now - datetime.timedelta(days=1)))
    else:
        tls.keygen(name, days=days)
    tls.add(RECEIVER, str(TlsDir(receiver_dir()).cert_path))
    return tls


async def replicate_one(server: Server, source: str, fill: bytes) -> None:
    link = await connect(server, source)
    try:
        await link.send_cycle(header("vm1", 2, DISK), aiter_blocks([(0, i, fill * BS) for i in range(4)]))
    finally:
        await link.aclose()


def log_since(server: Server, start: int) -> str:
    return server.log()[start:]


def wait_log(server: Server, start: int, text: str, wait: float = 10) -> str:
    deadline = time.monotonic() + wait
    while text not in log_since(server, start):
        assert time.monotonic() < deadline, f"no {text!r} in the receiver's log:\n{log_since(server, start)}"
        time.sleep(0.05)
    return log_since(server, start)


@pytest.fixture
def server(tmp_path: Path):
    s = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log").start()
    yield s
    s.stop()


async def test_unpinned_expired_and_renamed_sources_are_refused_before_any_frame(tmp_path: Path,
                                                                               server: Server) -> None:
    await replicate_one(server, "hv1", b"A")  # the real source hv1 (its certificate is pinned as hv1)
    before = tree_digest(tmp_path / "store" / "hv1")

    # A self-signed certificate that nobody pinned.
    stranger = new_site(tmp_path, "stranger")
    start = len(server.log())
    with pytest.raises(LinkError, match="refused this site's certificate"):
        await Link.connect("127.0.0.1", server.port, "hv1", tls=ClientTls(stranger))
    text = wait_log(server, start, "refused in the TLS handshake")
    assert "not pinned here" in text and "connected" not in text, text

    # A pinned certificate that has expired.
    old = new_site(tmp_path, "old", expired=True)
    TlsDir(receiver_dir()).add("old", str(old.cert_path))
    try:
        start = len(server.log())
        old.require_site_key = lambda: None  # type: ignore[method-assign]  # our side would refuse to use it
        with pytest.raises(LinkError, match="refused this site's certificate"):
            await Link.connect("127.0.0.1", server.port, "old", tls=ClientTls(old))
        text = wait_log(server, start, "refused in the TLS handshake")
        assert "expired" in text, text
    finally:
        TlsDir(receiver_dir()).remove("old")

    # A valid, pinned certificate of another source that says HELLO as hv1:
    # it reads no point of hv1's and writes nothing.
    source_dir("hv2")
    start = len(server.log())
    with pytest.raises(LinkError, match="not the name pinned"):
        await Link.connect("127.0.0.1", server.port, "hv1", tls=ClientTls(TlsDir(source_dir("hv2"))))
    text = wait_log(server, start, "not the name pinned")
    assert "'hv2'" in text and "source 'hv1' connected" not in text, text
    assert tree_digest(tmp_path / "store" / "hv1") == before
    assert not (tmp_path / "store" / "hv2").exists()
    assert len(log_since(server, start).strip().splitlines()) <= 2


async def test_source_refuses_an_unpinned_receiver_before_saying_hello(tmp_path: Path) -> None:
    impostor_tls = TlsDir(tmp_path / "impostor")
    impostor_tls.keygen("impostor")
    impostor_tls.add("hv1", str(TlsDir(source_dir("hv1")).cert_path))
    impostor = Server(f"dir:{tmp_path / 'store'}", tmp_path / "serve.log")
    impostor.args = ("--tls-dir", str(impostor_tls.path))
    impostor.start()
    try:
        with pytest.raises(LinkError, match=f"is not pinned in {source_dir('hv1')}/trusted") as caught:
            await connect(impostor, "hv1")
        assert impostor_tls.site_fingerprint() in str(caught.value)
        await trio.sleep(0.3)
        assert "source 'hv1' connected" not in impostor.log()

        # A source may pin its receiver by fingerprint alone.
        by_fp = new_site(tmp_path, "hv1")
        by_fp.add("impostor", impostor_tls.site_fingerprint())
        impostor_tls.remove("hv1")
        impostor_tls.add("hv1", str(by_fp.cert_path))
        link = await Link.connect("127.0.0.1", impostor.port, "hv1", tls=ClientTls(by_fp))
        assert link.security.pinned_as == "impostor"
        await link.aclose()
    finally:
        impostor.stop()


async def test_plain_tcp_needs_insecure_on_both_ends(tmp_path: Path, server: Server) -> None:
    # A plain client (even a well-formed HELLO) at a TLS receiver: refused unread.
    start = len(server.log())
    with pytest.raises(LinkError, match="--insecure"):
        await Link.connect("127.0.0.1", server.port, "hv1", tls=ClientTls(None))
    text = wait_log(server, start, "plain TCP")
    assert "requires TLS" in text and "connected" not in text

    # A TLS client at an insecure receiver: refused, and told why.
    plain = Server(f"dir:{tmp_path / 'plain'}", tmp_path / "plain.log")
    plain.insecure = True
    plain.start()
    try:
        assert "INSECURE" in plain.log()
        with pytest.raises(LinkError, match="insecure"):
            await Link.connect("127.0.0.1", plain.port, "hv1", tls=ClientTls(TlsDir(source_dir("hv1"))))
        text = wait_log(plain, 0, "a TLS client")
        # Both ends insecure: it works, and says so.
        link = await Link.connect("127.0.0.1", plain.port, "hv1", tls=ClientTls(None))
        assert link.security.insecure
        await link.aclose()
    finally:
        plain.stop()


def test_pins_change_without_restart_and_status_shows_the_link(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack).serve().start_mount()
    (site.mnt / "vm1").mkdir()
    img = site.mnt / "vm1" / "a.raw"
    img.write_bytes(b"x" * 200_000)
    fsync_path(img)
    site.wait_converged("over TLS")
    out = vrfs("status", str(site.mnt)).stdout
    assert "TLS 1.3, receiver pinned as dr" in out, out

    # Unpinned at the receiver: the source is refused from its next connection on...
    TlsDir(receiver_dir()).remove(NAME)
    try:
        site.server.stop()
        site.server.start()
        site.wait("refused", lambda st: all("refused this site's certificate" in (d.get("error") or "")
                                            for d in st.values()), timeout=30)
        img.write_bytes(b"y" * 200_000)
        fsync_path(img)
        time.sleep(2)
        assert (site.replica("vm1/a.raw")).read_bytes() == b"x" * 200_000
    finally:
        # ...and pinned again, it converges without restarting either daemon.
        source_dir(NAME)
    site.wait_converged("pinned again", timeout=60)


def test_insecure_mount_says_so(tmp_path, mount_factory, stack) -> None:
    site = Site(tmp_path, mount_factory, stack)
    site.server.insecure = True
    site.serve()
    site.mount = mount_factory(site.src, site.mnt, "--peer", f"127.0.0.1:{site.server.port}", "--name", NAME,
                               "--rpo", "1s", "--insecure")
    (site.mnt / "vm1").mkdir()
    (site.mnt / "vm1" / "a.raw").write_bytes(b"z" * 70_000)
    site.wait_converged("insecure")
    out = vrfs("status", str(site.mnt)).stdout
    assert "INSECURE" in out and "plain TCP" in out, out


def test_keygen_and_trust_commands(tmp_path: Path) -> None:
    d = str(tmp_path / "site")
    r = vrfs("keygen", "--tls-dir", d, "--name", "hv9")
    fp = r.stdout.split("fingerprint ")[1].split()[0]
    assert fp.startswith("sha256:") and len(fp) == 71
    assert (Path(d) / "site.key").stat().st_mode & 0o777 == 0o600
    again = vrfs("keygen", "--tls-dir", d, check=False)
    assert again.returncode == 1 and fp in again.stderr and "--force" in again.stderr

    other = str(tmp_path / "other")
    vrfs("keygen", "--tls-dir", other, "--name", "dr")
    vrfs("trust", "add", "dr", f"{other}/site.crt", "--tls-dir", d)
    vrfs("trust", "add", "dr", f"{other}/site.crt", "--tls-dir", d)  # the same pin again is no error
    colon_fp = ":".join(fp[7:][i:i + 2] for i in range(0, 64, 2)).upper()
    vrfs("trust", "add", "self", colon_fp, "--tls-dir", other)
    listed = json.loads(vrfs("trust", "list", "--json", "--tls-dir", other).stdout)
    assert listed == [{"name": "self", "fingerprint": fp, "certificate": False, "not_after": None}]
    assert "fingerprint only" in vrfs("trust", "list", "--tls-dir", other).stdout

    bad = [
        (["trust", "add", "x", "nonsense"], "neither a certificate file nor a fingerprint"),
        (["trust", "add", "x", f"{d}/site.key"], "is not a certificate"),
        (["trust", "add", "../x", f"{other}/site.crt"], "bad name"),
        (["trust", "add", "dr", fp], "already pinned"),
        (["trust", "add", "dr2", f"{other}/site.crt"], "already pinned as 'dr'"),
        (["trust", "remove", "nobody"], "no peer named 'nobody'"),
        (["keygen", "--days", "0", "--tls-dir", str(tmp_path / "k0")], "--days"),
    ]
    for args, message in bad:
        if "--tls-dir" not in args:
            args = [*args, "--tls-dir", d]
        r = vrfs(*args, check=False)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert r.stderr.startswith("vrfs: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "removed dr" in vrfs("trust", "remove", "dr", "--tls-dir", d).stdout
    assert "no peer is pinned" in vrfs("trust", "list", "--tls-dir", d).stdout


def test_daemons_without_keys_or_pins_say_what_to_do(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    empty = tmp_path / "nokeys"
    port = str(free_port())
    cases = [
        (["serve", "--listen", f"127.0.0.1:{port}", "--store", f"dir:{tmp_path}/s", "--tls-dir", str(empty)],
         "vrfs keygen"),
        (["mount", str(src), "--peer", f"127.0.0.1:{port}", "--tls-dir", str(empty)], "vrfs keygen"),
        (["mount", str(src), "--insecure"], "--insecure needs --peer"),
    ]
    lonely = TlsDir(tmp_path / "lonely")
    lonely.keygen("lonely")
    cases.append((["mount", str(src), "--peer", f"127.0.0.1:{port}", "--tls-dir", str(lonely.path)],
                  "no receiver is pinned"))
    for args, message in cases:
        r = vrfs(*args, check=False, timeout=30)
        assert r.returncode != 0 and message in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_a_port_probe_and_a_slow_handshake_cost_one_line_each(server: Server) -> None:
    start = len(server.log())
    with socket.create_connection(("127.0.0.1", server.port)):
        pass  # connect and close: nothing to log
    time.sleep(0.5)
    assert log_since(server, start).strip() == ""
