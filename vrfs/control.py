"""The control socket of a mount daemon: `vrfs status` and `vrfs umount` ask
it questions. One JSON request line, one JSON answer line.

The socket lives in the runtime directory, not in the datastore (which may be
covered by the mount itself); its path is published through the mount as the
extended attribute ``user.vrfs.control`` of the root directory.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

from vrfs.stepbudget import StepBudget

log = logging.getLogger("vrfs.control")

MAX_REQUEST = 64 << 10
LONG_LIST = 64  # items of an answer's list above which it is encoded in slices


def runtime_dir() -> str:
    base = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR", "/tmp")
    path = os.path.join(base, "vrfs")
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


def socket_path(kind: str = "mount") -> str:
    return os.path.join(runtime_dir(), f"{kind}-{os.getpid()}.sock")


Handler = Callable[[dict], Awaitable[dict]]


async def serve_control(path: str, handler: Handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def one(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                data = b""
                with trio.fail_after(10):
                    while not data.endswith(b"\n") and len(data) < MAX_REQUEST:
                        chunk = await stream.receive_some(MAX_REQUEST)
                        if not chunk:
                            break
                        data += chunk
                request = json.loads(data)
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
                answer = await handler(request)
            except (ValueError, trio.TooSlowError) as exc:
                answer = {"error": f"bad request: {exc}"}
            except Exception as exc:  # a question must never take the daemon down
                log.exception("control request failed")
                answer = {"error": f"internal error: {type(exc).__name__}: {exc}"}
            try:
                await stream.send_all(await _encoded(answer))
            except trio.BrokenResourceError:
                pass

    try:
        await trio.serve_listeners(one, [listener], task_status=task_status)
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass


async def _encoded(answer: dict) -> bytes:
    """json.dumps(answer) + newline, the items of long lists one at a time with
    yields past the step budget: a status of 1,000 disks took 15 ms to encode
    in one step, on the loop that serves FUSE. The text is the same."""
    budget = StepBudget()
    fields = []
    for key, value in answer.items():
        if isinstance(value, list) and len(value) > LONG_LIST:
            items = []
            for item in value:
                items.append(json.dumps(item))
                await budget.pause()
            text = "[" + ", ".join(items) + "]"
        else:
            text = json.dumps(value)
        fields.append(f"{json.dumps(key)}: {text}")
    return ("{" + ", ".join(fields) + "}\n").encode()


def ask(path: str, request: dict, timeout: float = 30.0) -> dict:
    """Blocking client, for the command line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return json.loads(data)
