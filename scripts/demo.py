"""The body of scripts/demo; see there."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import xxhash

VRFS = [sys.executable, "-m", "vrfs"]


def sh(*cmd: str, **kw) -> subprocess.CompletedProcess:
    print("$", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)


def vrfs(*args: str, quiet: bool = False) -> str:
    if not quiet:
        print("$ vrfs", " ".join(args), flush=True)
    out = subprocess.run(VRFS + list(args), check=True, text=True, capture_output=True).stdout
    if not quiet:
        print(out, end="", flush=True)
    return out


def digest(path: Path) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="vrfs-demo-"))
    datastore, store = work / "vmdks", work / "replicas"
    datastore.mkdir()
    store.mkdir()
    port = free_port()
    mounted = False
    try:
        dr_tls, site_tls = str(work / "tls-dr"), str(work / "tls-site")
        print("# each site makes its key; each pins the other's certificate (mutual TLS, no CA)")
        vrfs("keygen", "--tls-dir", dr_tls, "--name", "dr")
        vrfs("keygen", "--tls-dir", site_tls, "--name", "demo-site")
        vrfs("trust", "add", "demo-site", f"{site_tls}/site.crt", "--tls-dir", dr_tls)
        vrfs("trust", "add", "dr", f"{dr_tls}/site.crt", "--tls-dir", site_tls)
        print(f"# DR site: a receiver with a dir: store in {store}")
        vrfs("serve", "--listen", f"127.0.0.1:{port}", "--store", f"dir:{store}", "--tls-dir", dr_tls)
        print(f"# protected site: the datastore {datastore}, mounted over itself, replicating")
        vrfs("mount", str(datastore), "--peer", f"127.0.0.1:{port}", "--name", "demo-site", "--rpo", "4s",
             "--tls-dir", site_tls)
        mounted = True

        print("# a VM writes its disk through the mount")
        (datastore / "vm1").mkdir()
        disk = datastore / "vm1" / "disk0.qcow2"
        sh("qemu-img", "create", "-q", "-f", "qcow2", str(disk), "1G")
        sh("qemu-io", "-t", "none", "-c", "write -P 0x61 0 16M", "-c", "write -P 0x62 512M 8M",
           "-c", "flush", str(disk), stdout=subprocess.DEVNULL)
        (datastore / "vm1" / "vm1.conf").write_text("memory: 2048\ncores: 2\n")
        vrfs("status", str(datastore))

        print("# waiting until every disk is in sync")
        deadline = time.monotonic() + 120
        while True:
            disks = json.loads(vrfs("status", str(datastore), "--json", quiet=True))
            if disks and all(d["state"] == "in-sync" for d in disks):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"demo: not in sync after 120 s: {disks}")
            time.sleep(0.5)
        vrfs("status", str(datastore))
        vrfs("status", "--store", f"dir:{store}")

        replica = store / "demo-site" / "vm1" / "disk0.qcow2"
        same = digest(replica) == digest(disk)
        print(f"# replica {replica}: {'identical to the source' if same else 'DIFFERS from the source'}")
        sh("qemu-img", "check", str(replica))

        print("# proving it while the VM could keep writing: vrfs verify compares every block")
        vrfs("verify", str(datastore), "--rate", "0")
        print("# at the DR site: the points, and a test failover that replication does not disturb")
        vrfs("points", "--store", f"dir:{store}")
        test = work / "test-failover"
        vrfs("test-failover", "--store", f"dir:{store}", "demo-site/vm1", "--to", str(test))
        sh("qemu-img", "check", str(test / "vm1" / "disk0.qcow2"))
        vrfs("test-failover", "--cleanup", str(test))
        return 0 if same else 1
    finally:
        if mounted:
            subprocess.run(VRFS + ["umount", str(datastore)], check=False)
        pid_file = store / ".vrfs" / "serve.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text())
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                if not pid_file.exists():
                    break
                time.sleep(0.05)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
