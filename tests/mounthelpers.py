"""Helpers for tests on real vrfs mounts: a `vrfs mount --foreground`
process per mount, ended by its PID; the mount is always removed, lazily if
it must be."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

from servehelpers import REPO, vrfs_command, vrfs_env
from tlshelpers import mount_args
from vrfs.mountinfo import mount_field


def is_mounted(path: Path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8", errors="surrogateescape") as f:
        return any(mount_field(line.split()[1]) == str(path) for line in f)


def vrfs(*args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
    result = subprocess.run(vrfs_command(*args), capture_output=True, text=True, env=vrfs_env(),
                            cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"vrfs {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class Mount:
    def __init__(self, source: Path, mountpoint: Path | None, log_path: Path, *args: str,
                 env: dict[str, str] | None = None) -> None:
        self.source = source
        self.mountpoint = mountpoint or source
        self.log_path = log_path
        self.args = args
        self.env = env or {}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> "Mount":
        log = open(self.log_path, "ab")
        argv = ["mount", str(self.source)]
        if self.mountpoint != self.source:
            argv.append(str(self.mountpoint))
        self.proc = subprocess.Popen(vrfs_command(*argv, "--foreground", *self.args, *mount_args(self.args)), stdout=log,
                                     stderr=log, env=vrfs_env(self.env), cwd=REPO)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if is_mounted(self.mountpoint):
                try:
                    self.status()
                    return self
                except AssertionError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"vrfs mount exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"vrfs mount did not come up:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self, blocks: bool = False) -> list[dict]:
        args = ["status", str(self.mountpoint), "--json"] + (["--blocks"] if blocks else [])
        return json.loads(vrfs(*args).stdout)

    def disk(self, path: str, blocks: bool = False) -> dict:
        for d in self.status(blocks):
            if d["path"] == path:
                return d
        raise AssertionError(f"{path} is not tracked")

    def dirty_blocks(self, path: str) -> set[int]:
        return {i for a, b in self.disk(path, blocks=True)["dirty_ranges"] for i in range(a, b)}

    def umount(self) -> None:
        vrfs("umount", str(self.mountpoint))
        assert self.proc is not None
        assert self.proc.wait(30) == 0, self.log()

    def kill(self) -> None:
        """Crash the daemon: SIGKILL by PID, then remove the dead mount lazily."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)

    def cleanup(self) -> None:
        """Whatever state the test left: no mount, no process."""
        if is_mounted(self.mountpoint):
            if subprocess.run(["fusermount3", "-u", str(self.mountpoint)], capture_output=True).returncode:
                subprocess.run(["fusermount3", "-uz", str(self.mountpoint)], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
