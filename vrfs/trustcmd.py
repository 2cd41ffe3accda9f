"""`vrfs keygen` and `vrfs trust`: a site's key and the peers it pins (vrfs/trust.py)."""

from __future__ import annotations

import json
import socket
from typing import Any

from vrfs.errors import EXIT_USAGE, UserError
from vrfs.trust import TlsDir, TrustError, check_pin_name


def keygen_main(args: Any) -> int:
    tls_dir = TlsDir(args.tls_dir)
    name = args.name if args.name is not None else socket.gethostname()
    try:
        check_pin_name(name)
        cert = tls_dir.keygen(name, days=args.days, force=args.force)
        fp = tls_dir.site_fingerprint()
    except TrustError as exc:
        raise UserError(str(exc), EXIT_USAGE if "--days" in str(exc) or "bad name" in str(exc) else 1) from None
    print(f"wrote {tls_dir.key_path} and {tls_dir.cert_path} for {name!r}, valid until "
          f"{cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"fingerprint {fp}")
    print(f"at each peer: vrfs trust add {name} {tls_dir.cert_path}   (a copy of the certificate, or the fingerprint "
          "to pin a receiver)")
    return 0


def trust_main(args: Any) -> int:
    tls_dir = TlsDir(args.tls_dir)
    try:
        if args.trust_command == "add":
            pin = tls_dir.add(args.name, args.peer)
            what = "certificate" if pin.certificate is not None else "fingerprint (enough to pin a receiver; " \
                "a receiver pins a source by its certificate)"
            print(f"pinned {pin.name} as {pin.fingerprint} by its {what}")
        elif args.trust_command == "remove":
            pin = tls_dir.remove(args.name)
            print(f"removed {pin.name} ({pin.fingerprint}): it is refused from its next connection")
        else:
            return _list(tls_dir, args.json)
    except TrustError as exc:
        raise UserError(str(exc), EXIT_USAGE if "bad name" in str(exc) else 1) from None
    return 0


def _list(tls_dir: TlsDir, as_json: bool) -> int:
    pins = tls_dir.pins()
    broken = [b for b in tls_dir.broken_pins() if b != "superseded"] + tls_dir.conflicts()
    if as_json:
        print(json.dumps([{"name": p.name, "fingerprint": p.fingerprint, "certificate": p.certificate is not None,
                           "not_after": p.not_after.isoformat() if p.not_after else None} for p in pins], indent=2))
        return 0
    if not pins:
        print(f"no peer is pinned in {tls_dir.trusted_path}")
    for p in pins:
        until = f"certificate, valid until {p.not_after:%Y-%m-%d}" if p.not_after else "fingerprint only"
        print(f"{p.name:<20} {p.fingerprint}  {until}")
    for b in broken:
        print(f"unusable: {b}")
    return 1 if broken else 0
